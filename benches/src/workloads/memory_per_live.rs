//! `memory_per_live`: resident memory per live, idle aggregate.
//!
//! Measured in a child process (this binary re-run with `--memory-child N`), so memory freed by
//! earlier workloads and kept by the allocator does not hide the growth. The child builds a
//! runtime on a fresh sled store (buffered, `idle_timeout_ms = 0`, no `max_live`), activates
//! 1,000 warm-up accounts (threads, pools and first allocations), reads its RSS from
//! `/proc/self/statm`, activates N more accounts with `Runtime::state` from 64 concurrent callers
//! (1,000,000 in the full run, 100,000 with `--quick`), checks that all are live, and reads RSS
//! again. The accounts have no events: the state is `Account::default()` (small state), and
//! what is measured is the runtime's own cost per live aggregate (actor, mailbox, address,
//! registry entry, state, version and dedup bookkeeping).
//!
//! Reported: bytes per aggregate = RSS delta / N (lower is better), against the 1,200 B target
//! as the baseline, so ratio = measured / target and <= 1 meets it. A second figure is the
//! activation rate of that load.

use std::process::Command;
use std::time::Instant;

use incarnate::DurabilityMode;
use incarnate_actors::Account;
use tokio::runtime::Runtime;

use super::node::{account_id, runtime_at};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

/// The target, bytes per live aggregate.
const TARGET_BYTES: f64 = 1_200.0;
const WARM_UP: usize = 1_000;
const CALLERS: usize = 64;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "memory_per_live",
    about: "RSS bytes per live idle Account (1,000,000 activated) vs the 1,200 B target",
    run_round,
    max_rounds: 3,
};

fn run_round(_: &Runtime, settings: &Settings, _round: usize) -> Result<Vec<Sample>, BoxError> {
    let n = if settings.quick { 100_000 } else { 1_000_000 };
    let out = Command::new(std::env::current_exe()?)
        .arg("--memory-child")
        .arg(n.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "memory child failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let field = |name: &str| -> Result<f64, BoxError> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("no {name} in the child's output: {stdout}").into())
    };
    let delta = field("rss_delta_bytes")?;
    let rate = field("activations_per_s")?;
    Ok(vec![
        Sample {
            name: WORKLOAD.name,
            unit: "B/aggregate",
            better: Better::Lower,
            value: delta / n as f64,
            baseline: Some(TARGET_BYTES),
        },
        Sample {
            name: "memory_per_live_activations",
            unit: "activations/s",
            better: Better::Higher,
            value: rate,
            baseline: None,
        },
    ])
}

/// Resident bytes of this process (`/proc/self/statm`, 4 KiB pages).
fn rss_bytes() -> Result<u64, BoxError> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or("bad /proc/self/statm")?
        .parse()?;
    Ok(pages * 4096)
}

async fn activate(rt: &incarnate::Runtime, from: usize, to: usize) -> Result<(), BoxError> {
    let mut tasks = Vec::with_capacity(CALLERS);
    for t in 0..CALLERS {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            for n in (from + t..to).step_by(CALLERS) {
                rt.state::<Account>(account_id(n)).await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The child's side: prints `rss_delta_bytes X` and `activations_per_s Y`.
pub(crate) fn child(n: usize) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let rt = runtime_at(dir.path(), DurabilityMode::Buffered, |c| {
        c.runtime.passivation_sweep_ms = 3_600_000;
    })?;
    runtime.block_on(async {
        activate(&rt, 0, WARM_UP).await?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let before = rss_bytes()?;
        let start = Instant::now();
        activate(&rt, WARM_UP, WARM_UP + n).await?;
        let elapsed = start.elapsed();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let after = rss_bytes()?;
        let live = rt.stats::<Account>()?.live;
        if live != WARM_UP + n {
            return Err(format!("{live} live aggregates, expected {}", WARM_UP + n).into());
        }
        println!("rss_delta_bytes {}", after.saturating_sub(before));
        println!("activations_per_s {}", n as f64 / elapsed.as_secs_f64());
        Ok::<(), BoxError>(())
    })?;
    // Exit without stopping a million actors: the process ends here.
    drop(dir);
    std::process::exit(0);
}
