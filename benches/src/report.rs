//! The human table and the JSON-lines file.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;

use serde::Serialize;

use crate::workloads::{Better, Sample};
use crate::BoxError;

/// One reported figure: medians over the rounds.
#[derive(Debug, Clone)]
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) better: Better,
    /// incarnate's median.
    pub(crate) value: f64,
    /// The baseline's median, measured in the same run.
    pub(crate) baseline: Option<f64>,
    /// `value / baseline`.
    pub(crate) ratio: Option<f64>,
    /// `(max - min) / median` of incarnate's rounds.
    pub(crate) spread: f64,
    /// The same for the baseline.
    pub(crate) baseline_spread: Option<f64>,
}

/// The stored form: exactly these fields, one object per line.
#[derive(Serialize)]
struct JsonMetric<'a> {
    name: &'a str,
    value: f64,
    unit: &'a str,
    baseline: Option<f64>,
    ratio: Option<f64>,
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// `12345.6` as `12,346`; small figures keep decimals.
fn human(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x.abs() < 100.0 {
        return format!("{x:.2}");
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn pct(x: f64) -> String {
    format!("±{:.0}%", x * 50.0)
}

/// One round's figure, for the progress output.
pub(crate) fn sample_line(s: &Sample) -> String {
    match s.baseline {
        Some(b) => format!(
            "{} {} {} vs baseline {} ({:.3})",
            s.name,
            human(s.value),
            s.unit,
            human(b),
            s.value / b
        ),
        None => format!("{} {} {}", s.name, human(s.value), s.unit),
    }
}

/// One summary line.
pub(crate) fn line(m: &Metric) -> String {
    match (m.baseline, m.ratio) {
        (Some(b), Some(r)) => format!(
            "{}: {} {} vs baseline {} (ratio {:.3})",
            m.name,
            human(m.value),
            m.unit,
            human(b),
            r
        ),
        _ => format!("{}: {} {}", m.name, human(m.value), m.unit),
    }
}

/// The human table. Spread is half the range of the rounds relative to the median.
pub(crate) fn table(metrics: &[Metric], rounds: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>12} {:>12} {:>7}  {:<10} {:>8} {:>8}",
        "metric", "incarnate", "baseline", "ratio", "unit", "spread", "b.spread"
    );
    let _ = writeln!(out, "{}", "-".repeat(88));
    for m in metrics {
        let mark = match m.better {
            Better::Higher => "",
            Better::Lower => " (lower is better)",
        };
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:>12} {:>7}  {:<10} {:>8} {:>8}{}",
            m.name,
            human(m.value),
            m.baseline.map_or_else(|| "-".into(), human),
            m.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            m.unit,
            pct(m.spread),
            m.baseline_spread.map_or_else(|| "-".into(), pct),
            mark,
        );
    }
    let _ = writeln!(
        out,
        "medians of {rounds} rounds; ratio = median of the per-round incarnate / baseline (higher is better unless marked)"
    );
    out
}

/// Writes one JSON object per metric per line: `{"name","value","unit","baseline","ratio"}`.
pub(crate) fn write_json_lines(path: &Path, metrics: &[Metric]) -> Result<(), BoxError> {
    let mut out = BufWriter::new(File::create(path)?);
    for m in metrics {
        let json = JsonMetric {
            name: m.name,
            value: round_to(m.value, 2),
            unit: m.unit,
            baseline: m.baseline.map(|b| round_to(b, 2)),
            ratio: m.ratio.map(|r| round_to(r, 4)),
        };
        serde_json::to_writer(&mut out, &json)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_numbers() {
        assert_eq!(human(12_345.6), "12,346");
        assert_eq!(human(1_234_567.0), "1,234,567");
        assert_eq!(human(999.4), "999");
        assert_eq!(human(0.5), "0.50");
    }
}
