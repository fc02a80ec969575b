//! The workloads, one module each. A workload runs one round at a time and returns its samples;
//! the driver repeats it, takes medians and reports. To add one: write a module with a
//! `WORKLOAD` constant and list it in [`all`].

pub(crate) mod activation_flat;
pub(crate) mod buffered_many;
pub(crate) mod durable_hot;
pub(crate) mod durable_many;
pub(crate) mod floor;
pub(crate) mod latency_sync;
pub(crate) mod log_chunks;
pub(crate) mod memory_per_live;
pub(crate) mod node;
pub(crate) mod peer_cqrs_es;
pub(crate) mod projection_catchup;
pub(crate) mod remote_hot;
pub(crate) mod replay_cost;
pub(crate) mod store_append_buffered;
pub(crate) mod store_append_sync;
pub(crate) mod support;

use tokio::runtime::Runtime;

use crate::BoxError;

/// Every workload, in the order they run.
pub(crate) fn all() -> Vec<Workload> {
    vec![
        store_append_sync::WORKLOAD,
        store_append_buffered::WORKLOAD,
        durable_many::WORKLOAD,
        durable_hot::WORKLOAD,
        buffered_many::WORKLOAD,
        latency_sync::WORKLOAD,
        floor::WORKLOAD,
        log_chunks::WORKLOAD,
        activation_flat::WORKLOAD,
        replay_cost::WORKLOAD,
        memory_per_live::WORKLOAD,
        projection_catchup::WORKLOAD,
        peer_cqrs_es::WORKLOAD,
        remote_hot::WORKLOAD,
    ]
}

/// How big a run is.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Rounds per metric (medians are taken over them).
    pub(crate) rounds: usize,
    /// Events (or commands) per round, for workloads that count them.
    pub(crate) events: usize,
    /// The smoke run: each workload scales its own sizes down.
    pub(crate) quick: bool,
}

impl Settings {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                events: 5_000,
                quick,
            }
        } else {
            Self {
                rounds: 5,
                events: 20_000,
                quick,
            }
        }
    }
}

/// Which direction of a figure is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Higher,
    Lower,
}

/// One figure of one round: incarnate's, and the baseline's measured in the same round.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) name: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) better: Better,
    pub(crate) value: f64,
    pub(crate) baseline: Option<f64>,
}

/// Runs round number `round` (from 0) and returns its samples.
pub(crate) type RoundFn = fn(&Runtime, &Settings, usize) -> Result<Vec<Sample>, BoxError>;

/// A named workload.
pub(crate) struct Workload {
    /// The name `--only` selects; also the name of its main metric.
    pub(crate) name: &'static str,
    /// One line for `--list`.
    pub(crate) about: &'static str,
    pub(crate) run_round: RoundFn,
    /// At most this many rounds (0: as many as the settings say), for the heaviest workloads.
    pub(crate) max_rounds: usize,
}
