use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An event of one aggregate type: a value with a stable tag and a schema version.
///
/// The tag ([`event_type`](DomainEvent::event_type)) and the version are stored beside the
/// payload in every envelope, so renaming a Rust type or a module never orphans stored events:
/// only the tag and the serde names of the payload are part of the stored format (pin variant
/// names with `#[serde(rename = "...")]` if you want to rename them in code).
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    /// The stable tag of this event, stored with it (e.g. `"AccountOpened"`).
    fn event_type(&self) -> &'static str;

    /// The schema version written with new events of this tag. Bump it when the payload's shape
    /// changes, and teach [`decode`](DomainEvent::decode) to read the older versions.
    fn schema_version(&self) -> u16 {
        1
    }

    /// Decodes a stored payload written with `event_type` at `schema_version`.
    ///
    /// The default reads the current shape. Override it to upcast: match on the tag and version,
    /// decode the old shape into a type you keep for it, and convert.
    fn decode(
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<Self, rmp_serde::decode::Error> {
        let _ = (event_type, schema_version);
        rmp_serde::from_slice(payload)
    }
}

/// An event-sourced aggregate: a plain value that decides and evolves, with no I/O.
///
/// `Default` is the state before the first event. `handle` validates a command against the
/// current state and returns the events it causes (or a typed rejection); `apply` evolves the
/// state by one event and must not fail: the events are facts that already happened.
///
/// The state is `Serialize + DeserializeOwned` so the runtime can snapshot it; bump
/// [`SNAPSHOT_VERSION`](Aggregate::SNAPSHOT_VERSION) when its shape changes and old snapshots are
/// ignored in favour of a replay.
///
/// ```
/// use incarnate::{Aggregate, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { value: u64 }
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum CounterEvent { Incremented { by: u64 } }
///
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "Incremented" }
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
/// enum CounterError { #[error("increment must be positive")] Zero }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = CounterError;
///
///     fn handle(&self, by: &u64) -> Result<Vec<CounterEvent>, CounterError> {
///         if *by == 0 { return Err(CounterError::Zero); }
///         Ok(vec![CounterEvent::Incremented { by: *by }])
///     }
///
///     fn apply(&mut self, event: &CounterEvent) {
///         match event { CounterEvent::Incremented { by } => self.value += by }
///     }
/// }
///
/// let mut c = Counter::default();
/// for e in c.handle(&3).unwrap() { c.apply(&e); }
/// assert_eq!(c.value, 3);
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Unpin + 'static {
    /// The stable type tag, stored in every event's envelope and stream key.
    const TYPE: &'static str;

    /// The version of the snapshot format of this state.
    const SNAPSHOT_VERSION: u16 = 1;

    /// The commands this aggregate accepts.
    type Command: Debug + Send + Unpin + 'static;

    /// The events it emits and replays.
    type Event: DomainEvent;

    /// Its typed domain rejection. Serializable so an idempotent retry can be answered with the
    /// original rejection after a restart.
    type Error: std::error::Error
        + Serialize
        + DeserializeOwned
        + Clone
        + PartialEq
        + Send
        + Sync
        + 'static;

    /// Decides: the events `command` causes against the current state, or a rejection.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one committed event.
    fn apply(&mut self, event: &Self::Event);
}
