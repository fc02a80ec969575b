//! `incarnate-bench`: the release-mode benchmark suite of incarnate.
//!
//! ```text
//! cargo run --release -p incarnate-bench -- [--quick] [--json FILE] [--only NAME]
//!                                           [--perf-control FIFO]
//! ```
//!
//! Every workload measures incarnate and a raw baseline (usually sled used directly, the ceiling
//! of what incarnate could reach) in the same run, several rounds each, and reports medians and
//! the ratio incarnate / baseline. Absolute figures on a shared VM drift by tens of percent
//! between runs; the ratio, taken within one run, is the figure to track.
//!
//! Workloads live in [`workloads`], one module each; add one there and list it in
//! [`workloads::all`].

mod report;
mod stats;
mod workloads;

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::report::Metric;
use crate::workloads::Settings;

/// A boxed error that can cross tasks and threads.
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// incarnate's benchmark suite: each workload against a raw baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "incarnate-bench", version)]
struct Args {
    /// Fewer events and rounds (3 instead of 5): a smoke run that finishes in seconds.
    #[arg(long)]
    quick: bool,

    /// Also write the metrics to FILE, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Run only the workload named NAME (repeatable). `--list` shows the names.
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,

    /// List the workloads and exit.
    #[arg(long)]
    list: bool,

    /// Run incarnate's side only and report the baselines as 0: for profilers, so a profile
    /// holds nothing but incarnate.
    #[arg(long, hide = true)]
    incarnate_only: bool,

    /// Write `enable` / `disable` to FIFO around each timed command load (of `durable_many`,
    /// `durable_hot`, `buffered_many` and `latency_sync`), for `perf record -D -1
    /// --control=fifo:FIFO`: a profile of the timed phase alone, without the untimed
    /// activation of 10,000 aggregates that precedes it.
    #[arg(long, value_name = "FIFO")]
    perf_control: Option<PathBuf>,

    /// Internal: the child process of `memory_per_live`, activating N aggregates.
    #[arg(long, value_name = "N", hide = true)]
    memory_child: Option<usize>,

    /// Internal: the child process of `peer_cqrs_es` (the cqrs-es side).
    #[arg(long, hide = true)]
    peer_child: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("incarnate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    if let Some(n) = args.memory_child {
        return workloads::memory_per_live::child(n);
    }
    if args.peer_child {
        return workloads::peer_cqrs_es::child();
    }
    let all = workloads::all();
    if args.list {
        for w in &all {
            println!("{:<28} {}", w.name, w.about);
        }
        return Ok(());
    }
    for name in &args.only {
        if !all.iter().any(|w| w.name == name) {
            let known: Vec<&str> = all.iter().map(|w| w.name).collect();
            return Err(format!("unknown workload {name:?}; known: {}", known.join(", ")).into());
        }
    }
    let selected: Vec<_> = all
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|n| n == w.name))
        .collect();

    let settings = Settings::new(args.quick);
    workloads::support::INCARNATE_ONLY
        .store(args.incarnate_only, std::sync::atomic::Ordering::Relaxed);
    if let Some(fifo) = args.perf_control {
        workloads::support::PERF_CONTROL.get_or_init(|| fifo);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    println!(
        "incarnate-bench: {} mode, {} rounds per metric, {} events per store_append round, \
         {} CPUs, load average {}, data in {}",
        if args.quick { "quick" } else { "full" },
        settings.rounds,
        settings.events,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        std::env::temp_dir().display(),
    );

    let started = Instant::now();
    let mut metrics: Vec<Metric> = Vec::new();
    for workload in &selected {
        let t = Instant::now();
        let count = match workload.max_rounds {
            0 => settings.rounds,
            n => n.min(settings.rounds),
        };
        let settings = workloads::Settings {
            rounds: count,
            ..settings.clone()
        };
        let mut rounds = Vec::with_capacity(count);
        for round in 0..count {
            let samples = (workload.run_round)(&runtime, &settings, round)
                .map_err(|e| format!("{} round {round}: {e}", workload.name))?;
            for sample in &samples {
                println!("  round {}: {}", round + 1, report::sample_line(sample));
            }
            rounds.push(samples);
        }
        let summarised = stats::summarise(&rounds);
        for m in &summarised {
            println!("  {}", report::line(m));
        }
        println!(
            "  ({} done in {:.1} s)",
            workload.name,
            t.elapsed().as_secs_f64()
        );
        metrics.extend(summarised);
    }

    println!();
    print!("{}", report::table(&metrics, settings.rounds));
    println!("total {:.1} s", started.elapsed().as_secs_f64());

    if let Some(path) = &args.json {
        report::write_json_lines(path, &metrics)?;
        println!("wrote {} metrics to {}", metrics.len(), path.display());
    }
    Ok(())
}

/// The 1-minute load average (Linux), to tell a quiet machine from a busy one.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}
