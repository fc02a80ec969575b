//! A page of the global log whose events are decoded as they are taken.

use super::{EventEnvelope, StoreError};

/// Decodes one stored record, read at `position`.
pub(crate) type DecodeRecord = fn(&[u8], u64) -> Result<EventEnvelope, StoreError>;

/// Up to a page of the global log, from [`EventStore::read_log_page`](super::EventStore::read_log_page),
/// in position order. Iterating it yields each event, decoded only then.
///
/// Why lazily: a reader that reads pages ahead on the blocking pool used to decode them there,
/// so every envelope was allocated on one thread and freed on the one that handled it. With the
/// default allocator those cross-thread frees contended for its locks and cost more than the
/// decoding itself. A page holds the records' bytes in one buffer instead, and the thread that
/// handles an event also allocates and frees it.
#[derive(Debug)]
pub struct LogPage {
    entries: Entries,
}

#[derive(Debug)]
enum Entries {
    /// From a store that reads decoded events (the default of
    /// [`EventStore::read_log_page`](super::EventStore::read_log_page)).
    Decoded(std::vec::IntoIter<EventEnvelope>),
    Encoded {
        /// Every record's bytes, one after another.
        bytes: Vec<u8>,
        /// Per record: position, and its end in `bytes` (it starts where the one before ends).
        index: Vec<(u64, usize)>,
        /// The next record to take.
        next: usize,
        decode: DecodeRecord,
    },
}

impl LogPage {
    /// An empty page that will hold encoded records, decoded by `decode` when taken.
    pub(crate) fn encoded(decode: DecodeRecord, records: usize) -> Self {
        Self {
            entries: Entries::Encoded {
                bytes: Vec::with_capacity(records * 160),
                index: Vec::with_capacity(records),
                next: 0,
                decode,
            },
        }
    }

    /// Adds the record at `position` (after every one already in the page).
    pub(crate) fn push_encoded(&mut self, position: u64, record: &[u8]) {
        if let Entries::Encoded { bytes, index, .. } = &mut self.entries {
            bytes.extend_from_slice(record);
            index.push((position, bytes.len()));
        }
    }

    /// How many events are left to take.
    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Decoded(events) => events.len(),
            Entries::Encoded { index, next, .. } => index.len() - next,
        }
    }

    /// Whether every event has been taken (or there were none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of the last event of the page, taken or not (`None` when it had none).
    pub fn last_position(&self) -> Option<u64> {
        match &self.entries {
            Entries::Decoded(events) => events.as_slice().last().map(|e| e.position),
            Entries::Encoded { index, .. } => index.last().map(|&(position, _)| position),
        }
    }

    /// Drops, without decoding them, the events left at positions up to `position`.
    pub fn skip_through(&mut self, position: u64) {
        match &mut self.entries {
            Entries::Decoded(events) => {
                let skip = events
                    .as_slice()
                    .iter()
                    .take_while(|e| e.position <= position)
                    .count();
                if skip > 0 {
                    events.nth(skip - 1);
                }
            }
            Entries::Encoded { index, next, .. } => {
                *next += index[*next..]
                    .iter()
                    .take_while(|&&(p, _)| p <= position)
                    .count();
            }
        }
    }
}

impl Default for LogPage {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl From<Vec<EventEnvelope>> for LogPage {
    fn from(events: Vec<EventEnvelope>) -> Self {
        Self {
            entries: Entries::Decoded(events.into_iter()),
        }
    }
}

impl Iterator for LogPage {
    type Item = Result<EventEnvelope, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.entries {
            Entries::Decoded(events) => events.next().map(Ok),
            Entries::Encoded {
                bytes,
                index,
                next,
                decode,
            } => {
                let &(position, end) = index.get(*next)?;
                let start = match next.checked_sub(1) {
                    Some(before) => index[before].1,
                    None => 0,
                };
                *next += 1;
                Some(decode(&bytes[start..end], position))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len(), Some(self.len()))
    }
}

impl ExactSizeIterator for LogPage {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StreamId;

    fn envelope(position: u64) -> EventEnvelope {
        EventEnvelope {
            event_id: uuid::Uuid::nil(),
            stream: StreamId::new("t", "a"),
            sequence: position,
            position,
            timestamp_micros: 0,
            event_type: "E".into(),
            schema_version: 1,
            causation: Default::default(),
            payload: vec![position as u8; position as usize],
        }
    }

    fn decode(bytes: &[u8], position: u64) -> Result<EventEnvelope, StoreError> {
        if bytes.len() as u64 != position {
            return Err(StoreError::Storage(format!(
                "{position}: {} bytes",
                bytes.len()
            )));
        }
        Ok(envelope(position))
    }

    fn positions(page: LogPage) -> Result<Vec<u64>, StoreError> {
        page.map(|e| e.map(|e| e.position)).collect()
    }

    #[test]
    fn encoded_records_come_back_whole_in_order_and_skip_without_decoding() -> Result<(), StoreError>
    {
        let mut page = LogPage::encoded(decode, 4);
        for position in [3, 5, 6, 9] {
            page.push_encoded(position, &envelope(position).payload);
        }
        assert_eq!((page.len(), page.last_position()), (4, Some(9)));
        page.skip_through(5);
        assert_eq!((page.len(), page.last_position()), (2, Some(9)));
        assert_eq!(positions(page)?, vec![6, 9]);
        Ok(())
    }

    #[test]
    fn decoded_pages_skip_and_iterate_alike() -> Result<(), StoreError> {
        let mut page = LogPage::from(vec![envelope(2), envelope(4), envelope(7)]);
        page.skip_through(4);
        assert_eq!(page.last_position(), Some(7));
        assert_eq!(positions(page)?, vec![7]);
        let mut page = LogPage::default();
        page.skip_through(10);
        assert!(page.is_empty() && page.last_position().is_none());
        Ok(())
    }
}
