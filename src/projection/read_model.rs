//! Read models kept in the store beside the events, written in the same atomic commit as the
//! projector's checkpoint (exactly-once), and the typed table helper over them.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ProjectionError;
use crate::domain::AggregateId;
use crate::store::{EventStore, KvWrite};

/// The writes a projector makes while handling a batch of events, committed atomically with its
/// checkpoint. Reads see the transaction's own writes first, then the store.
pub struct ReadModelTx {
    store: Arc<dyn EventStore>,
    /// Writes of earlier events of this batch: `None` is a deletion.
    batch: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
    /// Writes of the event being handled; discarded if its handler fails.
    event: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
    /// Tables cleared in this batch (reads of them skip the store).
    cleared: Vec<String>,
    extra: Vec<KvWrite>,
}

impl ReadModelTx {
    pub(crate) fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            batch: BTreeMap::new(),
            event: BTreeMap::new(),
            cleared: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The raw value of `key` in `table`, as this transaction sees it.
    pub async fn get_raw(
        &self,
        table: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        let k = (table.to_owned(), key.to_vec());
        if let Some(v) = self.event.get(&k).or_else(|| self.batch.get(&k)) {
            return Ok(v.clone());
        }
        if self.cleared.iter().any(|t| t == table) {
            return Ok(None);
        }
        Ok(self.store.kv_get(table, key).await?)
    }

    /// Sets `key` in `table`.
    pub fn put_raw(&mut self, table: &str, key: Vec<u8>, value: Vec<u8>) {
        self.event.insert((table.to_owned(), key), Some(value));
    }

    /// Deletes `key` from `table`.
    pub fn delete_raw(&mut self, table: &str, key: Vec<u8>) {
        self.event.insert((table.to_owned(), key), None);
    }

    /// Empties `table` (used by rebuilds).
    pub fn clear(&mut self, table: &str) {
        self.batch.retain(|(t, _), _| t != table);
        self.event.retain(|(t, _), _| t != table);
        self.cleared.push(table.to_owned());
    }

    /// Keeps the current event's writes.
    pub(crate) fn keep_event(&mut self) {
        let event = std::mem::take(&mut self.event);
        self.batch.extend(event);
    }

    /// Drops the current event's writes (its handler failed).
    pub(crate) fn discard_event(&mut self) {
        self.event.clear();
    }

    /// Adds a raw write to the commit (checkpoints, dead letters).
    pub(crate) fn push(&mut self, write: KvWrite) {
        self.extra.push(write);
    }

    /// The number of writes to commit so far (a cleared table counts as one).
    pub(crate) fn len(&self) -> usize {
        self.batch.len() + self.event.len() + self.cleared.len() + self.extra.len()
    }

    /// Whether anything is to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.cleared.is_empty() && self.extra.is_empty()
    }

    /// The writes to commit, in order: clears, then the batch's writes, then the extras.
    pub(crate) fn into_writes(mut self) -> Vec<KvWrite> {
        self.keep_event();
        let mut writes: Vec<KvWrite> = self
            .cleared
            .into_iter()
            .map(|table| KvWrite::Clear { table })
            .collect();
        writes.extend(self.batch.into_iter().map(|((table, key), v)| match v {
            Some(value) => KvWrite::Put { table, key, value },
            None => KvWrite::Delete { table, key },
        }));
        writes.extend(self.extra);
        writes
    }
}

/// A key of a [`Table`]: encoded so that byte order is the key's natural order.
pub trait TableKey: Sized {
    /// The key's bytes.
    fn encode_key(&self) -> Vec<u8>;
    /// The key back from its bytes (`None` if they are not a key of this type).
    fn decode_key(bytes: &[u8]) -> Option<Self>;
}

impl TableKey for String {
    fn encode_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl TableKey for AggregateId {
    fn encode_key(&self) -> Vec<u8> {
        self.as_str().as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(AggregateId::new)
    }
}

impl TableKey for u64 {
    fn encode_key(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

impl TableKey for uuid::Uuid {
    fn encode_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        uuid::Uuid::from_slice(bytes).ok()
    }
}

/// A typed key-value table of a read model: `K` keys, `V` values encoded with rmp-serde.
///
/// Projectors write it through their [`ReadModelTx`]; queries read it from the store.
///
/// ```
/// use incarnate::Table;
/// const BALANCES: Table<String, u64> = Table::new("balances");
/// ```
pub struct Table<K, V> {
    name: &'static str,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for Table<K, V> {}

impl<K: TableKey, V: Serialize + DeserializeOwned> Table<K, V> {
    /// The table called `name` (at most 255 bytes, unique in the store).
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _types: PhantomData,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, ProjectionError> {
        rmp_serde::from_slice(bytes)
            .map_err(|e| ProjectionError::Codec(format!("table {}: {e}", self.name)))
    }

    /// The value of `key` as `tx` sees it.
    pub async fn get(&self, tx: &ReadModelTx, key: &K) -> Result<Option<V>, ProjectionError> {
        match tx.get_raw(self.name, &key.encode_key()).await? {
            Some(bytes) => self.decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Sets `key` to `value` in `tx`.
    pub fn put(&self, tx: &mut ReadModelTx, key: &K, value: &V) -> Result<(), ProjectionError> {
        let bytes = rmp_serde::to_vec(value)
            .map_err(|e| ProjectionError::Codec(format!("table {}: {e}", self.name)))?;
        tx.put_raw(self.name, key.encode_key(), bytes);
        Ok(())
    }

    /// Reads `key`, changes it with `f` (starting from `V::default()` if missing) and writes it.
    pub async fn update(
        &self,
        tx: &mut ReadModelTx,
        key: &K,
        f: impl FnOnce(&mut V),
    ) -> Result<(), ProjectionError>
    where
        V: Default,
    {
        let mut value = self.get(tx, key).await?.unwrap_or_default();
        f(&mut value);
        self.put(tx, key, &value)
    }

    /// Deletes `key` in `tx`.
    pub fn delete(&self, tx: &mut ReadModelTx, key: &K) {
        tx.delete_raw(self.name, key.encode_key());
    }

    /// The committed value of `key` (a query: reads what projectors have committed).
    pub async fn load(
        &self,
        store: &dyn EventStore,
        key: &K,
    ) -> Result<Option<V>, ProjectionError> {
        match store.kv_get(self.name, &key.encode_key()).await? {
            Some(bytes) => self.decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `max` committed entries with keys from `from` on, in key order.
    pub async fn scan(
        &self,
        store: &dyn EventStore,
        from: Option<&K>,
        max: usize,
    ) -> Result<Vec<(K, V)>, ProjectionError> {
        let start = from.map(TableKey::encode_key).unwrap_or_default();
        let mut out = Vec::new();
        for (k, v) in store.kv_scan(self.name, &start, max).await? {
            let key = K::decode_key(&k).ok_or_else(|| {
                ProjectionError::Codec(format!("table {}: undecodable key", self.name))
            })?;
            out.push((key, self.decode(&v)?));
        }
        Ok(out)
    }

    /// Every committed entry, in key order.
    pub async fn all(&self, store: &dyn EventStore) -> Result<Vec<(K, V)>, ProjectionError> {
        self.scan(store, None, usize::MAX).await
    }
}
