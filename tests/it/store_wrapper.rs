//! The forwarding base of the test stores that wrap a real [`EventStore`] to inject faults or
//! observe calls (`runtime_support::FaultStore`, `projection_support::TestStore`,
//! `saga_support::SagaFaultStore`): a [`Wrap`] overrides only the calls it changes, and
//! [`Wrapped`] forwards everything else to the real store unchanged. A [`Gate`] holds the calls
//! a wrapper routes through it.

use std::sync::Arc;

use async_trait::async_trait;
use incarnate::{
    AppendRequest, AppendResult, CommandRecord, EventEnvelope, EventStore, KvWrite,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamId, StreamSlice,
};
use tokio::sync::watch;

use crate::support::within;

/// What a wrapping store does around the calls to the real store `inner`. Each method defaults
/// to forwarding the call unchanged. (The calls no wrapper changes, `head`, `watch_head`,
/// `kv_get`, `kv_scan` and `close`, always forward.)
#[async_trait]
pub(crate) trait Wrap: Send + Sync + 'static {
    async fn append(
        &self,
        inner: &dyn EventStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        inner.append(request).await
    }

    /// Whether the wrapped store applies appends in the order they are first polled: not unless
    /// the wrapper says so, since most hold calls at a gate (which releases them in any order).
    fn preserves_append_order(&self, _inner: &dyn EventStore) -> bool {
        false
    }

    async fn read_stream(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        inner.read_stream(stream, from, to, max).await
    }

    async fn highest_sequence(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
    ) -> Result<u64, StoreError> {
        inner.highest_sequence(stream).await
    }

    async fn read_log(
        &self,
        inner: &dyn EventStore,
        from: u64,
        max: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        inner.read_log(from, max).await
    }

    async fn delete_to(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        to_sequence: u64,
    ) -> Result<(), StoreError> {
        inner.delete_to(stream, to_sequence).await
    }

    async fn save_snapshot(
        &self,
        inner: &dyn EventStore,
        snapshot: SnapshotRecord,
    ) -> Result<(), StoreError> {
        inner.save_snapshot(snapshot).await
    }

    async fn latest_snapshot(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        inner.latest_snapshot(stream, criteria).await
    }

    async fn delete_snapshots(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        inner.delete_snapshots(stream, criteria).await
    }

    async fn command_records(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        inner.command_records(stream).await
    }

    async fn kv_commit(
        &self,
        inner: &dyn EventStore,
        writes: Vec<KvWrite>,
    ) -> Result<(), StoreError> {
        inner.kv_commit(writes).await
    }

    async fn flush(&self, inner: &dyn EventStore) -> Result<(), StoreError> {
        inner.flush().await
    }
}

/// A real store with a [`Wrap`] around every call. The runtime gets it by value; the test keeps
/// the other handle on the shared `W` to arm it.
pub(crate) struct Wrapped<W> {
    inner: Arc<dyn EventStore>,
    wrap: Arc<W>,
}

impl<W: Wrap> Wrapped<W> {
    /// Wraps `inner` in `wrap`; also returns the handle the test keeps.
    pub(crate) fn new(inner: impl EventStore, wrap: W) -> (Self, Arc<W>) {
        let wrap = Arc::new(wrap);
        let store = Self {
            inner: Arc::new(inner),
            wrap: wrap.clone(),
        };
        (store, wrap)
    }
}

#[async_trait]
impl<W: Wrap> EventStore for Wrapped<W> {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        self.wrap.append(&*self.inner, request).await
    }

    fn preserves_append_order(&self) -> bool {
        self.wrap.preserves_append_order(&*self.inner)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        self.wrap
            .read_stream(&*self.inner, stream, from, to, max)
            .await
    }

    async fn highest_sequence(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.wrap.highest_sequence(&*self.inner, stream).await
    }

    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        self.wrap.read_log(&*self.inner, from, max).await
    }

    fn head(&self) -> u64 {
        self.inner.head()
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.watch_head()
    }

    async fn delete_to(&self, stream: &StreamId, to_sequence: u64) -> Result<(), StoreError> {
        self.wrap.delete_to(&*self.inner, stream, to_sequence).await
    }

    async fn save_snapshot(&self, snapshot: SnapshotRecord) -> Result<(), StoreError> {
        self.wrap.save_snapshot(&*self.inner, snapshot).await
    }

    async fn latest_snapshot(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        self.wrap
            .latest_snapshot(&*self.inner, stream, criteria)
            .await
    }

    async fn delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        self.wrap
            .delete_snapshots(&*self.inner, stream, criteria)
            .await
    }

    async fn command_records(&self, stream: &StreamId) -> Result<Vec<CommandRecord>, StoreError> {
        self.wrap.command_records(&*self.inner, stream).await
    }

    async fn kv_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.kv_get(table, key).await
    }

    async fn kv_scan(
        &self,
        table: &str,
        from: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.kv_scan(table, from, max).await
    }

    async fn kv_commit(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        self.wrap.kv_commit(&*self.inner, writes).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.wrap.flush(&*self.inner).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

/// A point calls pass through, which a test can hold shut; it counts the calls that reached it.
pub(crate) struct Gate {
    held: watch::Sender<bool>,
    entered: watch::Sender<u64>,
    /// Whether calls that find the gate open go uncounted (see [`Gate::counting_held`]).
    counts_held_only: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            held: watch::channel(false).0,
            entered: watch::channel(0).0,
            counts_held_only: false,
        }
    }
}

impl Gate {
    /// A gate that counts only the calls it held (those that arrived while it was shut).
    pub(crate) fn counting_held() -> Self {
        Self {
            counts_held_only: true,
            ..Self::default()
        }
    }

    /// Calls reaching the gate from now on wait until [`release`](Gate::release).
    pub(crate) fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets every waiting and later call through.
    pub(crate) fn release(&self) {
        self.held.send_replace(false);
    }

    /// How many calls the gate counted so far.
    pub(crate) fn entered(&self) -> u64 {
        *self.entered.borrow()
    }

    /// Waits until the gate counted `n` calls in total.
    pub(crate) async fn wait_entered(&self, n: u64) {
        let mut rx = self.entered.subscribe();
        within(
            &format!("{n} calls to reach the gate"),
            rx.wait_for(|c| *c >= n),
        )
        .await
        .expect("gate counter alive");
    }

    /// Passes the gate: counts the call and waits while the gate is held.
    pub(crate) async fn pass(&self) {
        let mut held = self.held.subscribe();
        if self.counts_held_only && !*held.borrow_and_update() {
            return;
        }
        self.entered.send_modify(|c| *c += 1);
        let _ = held.wait_for(|h| !*h).await;
    }
}
