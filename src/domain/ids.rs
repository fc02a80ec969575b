use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The identity of one aggregate instance within its aggregate type.
///
/// Cheap to clone (a shared string). Any string works; numbers and UUIDs convert via `From`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AggregateId(Arc<str>);

impl AggregateId {
    /// Creates an id from anything string-like.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for AggregateId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for AggregateId {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl From<&String> for AggregateId {
    fn from(s: &String) -> Self {
        Self::new(s)
    }
}

impl From<uuid::Uuid> for AggregateId {
    fn from(u: uuid::Uuid) -> Self {
        Self::new(u.to_string())
    }
}

impl From<u64> for AggregateId {
    fn from(n: u64) -> Self {
        Self::new(n.to_string())
    }
}

impl From<&AggregateId> for AggregateId {
    fn from(id: &AggregateId) -> Self {
        id.clone()
    }
}

/// One event stream: the events of one aggregate instance, named by its stable aggregate type
/// tag and its id. Streams of different types never mix even when their ids are equal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    /// The aggregate type's stable tag ([`Aggregate::TYPE`](crate::Aggregate::TYPE)).
    pub aggregate_type: Arc<str>,
    /// The instance id.
    pub aggregate_id: AggregateId,
}

impl StreamId {
    /// Names the stream of `aggregate_type` / `aggregate_id`.
    pub fn new(aggregate_type: impl AsRef<str>, aggregate_id: impl Into<AggregateId>) -> Self {
        Self {
            aggregate_type: Arc::from(aggregate_type.as_ref()),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}
