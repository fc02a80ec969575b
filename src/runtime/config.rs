//! Runtime settings: built in code or loaded from TOML (`config/default.toml` documents every
//! key with its default).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{Durability, SledStoreConfig};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys or wrong types.
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything the runtime can be told.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Threads, limits and timeouts of the actor runtime.
    pub runtime: RuntimeSettings,
    /// Which store to open and how.
    pub store: StoreSettings,
    /// Per-aggregate-type settings: `default` applies to every type, a type's own table
    /// (keyed by its `Aggregate::TYPE`) overrides it key by key.
    pub aggregates: AggregateTables,
}

/// The `[aggregates]` tables. (No `deny_unknown_fields` here: serde cannot combine it with
/// `flatten`; each override table still rejects unknown keys.)
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AggregateTables {
    /// Settings for every aggregate type.
    pub default: AggregateSettings,
    /// Overrides per aggregate type, keyed by type tag.
    #[serde(flatten)]
    pub overrides: HashMap<String, AggregateOverrides>,
}

/// The `[runtime]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Actor threads (actix arbiters); 0 means one per core.
    pub arbiters: usize,
    /// Activations allowed to load from the store at once.
    pub max_concurrent_recoveries: usize,
    /// How long a caller waits for a command's reply before `Timeout`, in milliseconds.
    pub command_timeout_ms: u64,
    /// How often idle and surplus actors are looked for, in milliseconds.
    pub passivation_sweep_ms: u64,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            arbiters: 0,
            max_concurrent_recoveries: 64,
            command_timeout_ms: 30_000,
            passivation_sweep_ms: 1_000,
        }
    }
}

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The embedded sled store (durable).
    Sled,
    /// The in-memory store (nothing survives the process).
    Memory,
}

/// When acknowledged writes are durable, as written in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityMode {
    /// Flushed and fsynced before the reply.
    Sync,
    /// Flushed and fsynced every `flush_interval_ms`.
    Buffered,
}

/// The `[store]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `sled` or `memory`.
    pub backend: Backend,
    /// The sled database directory.
    pub path: PathBuf,
    /// `sync` or `buffered`.
    pub durability: DurabilityMode,
    /// In `buffered` mode, the flush period (the crash-loss window), in milliseconds.
    pub flush_interval_ms: u64,
    /// The most writes grouped into one commit.
    pub max_batch: usize,
    /// sled's page cache, in MiB.
    pub cache_capacity_mb: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Sled,
            path: PathBuf::from("data/incarnate"),
            durability: DurabilityMode::Sync,
            flush_interval_ms: 100,
            max_batch: 4096,
            cache_capacity_mb: 256,
        }
    }
}

impl StoreSettings {
    /// The sled configuration these settings describe.
    pub fn sled_config(&self) -> SledStoreConfig {
        let mut config = SledStoreConfig::new(&self.path);
        config.durability = match self.durability {
            DurabilityMode::Sync => Durability::Sync,
            DurabilityMode::Buffered => Durability::Buffered {
                flush_interval_ms: self.flush_interval_ms,
            },
        };
        config.max_batch = self.max_batch;
        config.cache_capacity_bytes = self.cache_capacity_mb.saturating_mul(1024 * 1024);
        config
    }
}

/// Settings of one aggregate type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregateSettings {
    /// Work items (commands, state reads) an actor queues before callers get `Overloaded`.
    pub mailbox_capacity: usize,
    /// Queued commands decided together and persisted in one atomic append.
    pub max_batch_commands: usize,
    /// Appends of one aggregate in flight at once: while one is being stored, the next commands
    /// are decided against its outcome and sent behind it (1 = one at a time).
    pub max_appends_in_flight: usize,
    /// An actor idle this long is passivated, in milliseconds; 0 keeps actors forever.
    pub idle_timeout_ms: u64,
    /// Live actors of this type before the least recently used are passivated; 0 = no limit.
    pub max_live: usize,
    /// Take a snapshot each time the version crosses a multiple of this; 0 = never.
    pub snapshot_every: u64,
    /// Snapshots kept per aggregate (older ones are deleted).
    pub snapshot_keep: u64,
    /// Also delete the events covered by the oldest kept snapshot.
    pub delete_events_on_snapshot: bool,
    /// Command ids remembered per aggregate for idempotent retries.
    pub dedup_window: usize,
}

impl Default for AggregateSettings {
    fn default() -> Self {
        Self {
            mailbox_capacity: 1024,
            max_batch_commands: 256,
            max_appends_in_flight: 4,
            idle_timeout_ms: 120_000,
            max_live: 0,
            snapshot_every: 100,
            snapshot_keep: 2,
            delete_events_on_snapshot: false,
            dedup_window: 128,
        }
    }
}

/// A type's overrides: each key left out falls back to `[aggregates.default]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregateOverrides {
    /// See [`AggregateSettings::mailbox_capacity`].
    pub mailbox_capacity: Option<usize>,
    /// See [`AggregateSettings::max_batch_commands`].
    pub max_batch_commands: Option<usize>,
    /// See [`AggregateSettings::max_appends_in_flight`].
    pub max_appends_in_flight: Option<usize>,
    /// See [`AggregateSettings::idle_timeout_ms`].
    pub idle_timeout_ms: Option<u64>,
    /// See [`AggregateSettings::max_live`].
    pub max_live: Option<usize>,
    /// See [`AggregateSettings::snapshot_every`].
    pub snapshot_every: Option<u64>,
    /// See [`AggregateSettings::snapshot_keep`].
    pub snapshot_keep: Option<u64>,
    /// See [`AggregateSettings::delete_events_on_snapshot`].
    pub delete_events_on_snapshot: Option<bool>,
    /// See [`AggregateSettings::dedup_window`].
    pub dedup_window: Option<usize>,
}

impl AggregateOverrides {
    fn over(&self, base: &AggregateSettings) -> AggregateSettings {
        AggregateSettings {
            mailbox_capacity: self.mailbox_capacity.unwrap_or(base.mailbox_capacity),
            max_batch_commands: self.max_batch_commands.unwrap_or(base.max_batch_commands),
            max_appends_in_flight: self
                .max_appends_in_flight
                .unwrap_or(base.max_appends_in_flight),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(base.idle_timeout_ms),
            max_live: self.max_live.unwrap_or(base.max_live),
            snapshot_every: self.snapshot_every.unwrap_or(base.snapshot_every),
            snapshot_keep: self.snapshot_keep.unwrap_or(base.snapshot_keep),
            delete_events_on_snapshot: self
                .delete_events_on_snapshot
                .unwrap_or(base.delete_events_on_snapshot),
            dedup_window: self.dedup_window.unwrap_or(base.dedup_window),
        }
    }
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The effective settings of aggregate type `type_tag`.
    pub fn aggregate(&self, type_tag: &str) -> AggregateSettings {
        match self.aggregates.overrides.get(type_tag) {
            Some(o) => o.over(&self.aggregates.default),
            None => self.aggregates.default.clone(),
        }
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.runtime.max_concurrent_recoveries == 0 {
            return invalid("runtime.max_concurrent_recoveries", "must be at least 1");
        }
        if self.runtime.passivation_sweep_ms == 0 {
            return invalid("runtime.passivation_sweep_ms", "must be at least 1");
        }
        if self.store.max_batch == 0 {
            return invalid("store.max_batch", "must be at least 1");
        }
        let types = std::iter::once(self.aggregates.default.clone()).chain(
            self.aggregates
                .overrides
                .values()
                .map(|o| o.over(&self.aggregates.default)),
        );
        for a in types {
            if a.mailbox_capacity == 0 || a.mailbox_capacity > 1 << 24 {
                return invalid("aggregates.mailbox_capacity", "must be in 1..=16777216");
            }
            if a.max_batch_commands == 0 {
                return invalid("aggregates.max_batch_commands", "must be at least 1");
            }
            if a.max_appends_in_flight == 0 || a.max_appends_in_flight > 64 {
                return invalid("aggregates.max_appends_in_flight", "must be in 1..=64");
            }
            if a.snapshot_keep == 0 {
                return invalid("aggregates.snapshot_keep", "must be at least 1");
            }
        }
        Ok(())
    }

    pub(crate) fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.runtime.command_timeout_ms)
    }
}
