//! Medians over rounds.

use crate::report::Metric;
use crate::workloads::Sample;

/// The median of `values` (the mean of the middle two for an even count); `NaN` when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `(max - min) / median` of `values`: how much the rounds disagreed.
pub(crate) fn spread(values: &[f64]) -> f64 {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (max - min) / median(values)
}

/// One metric per sample name, in first-seen order: medians of the value and of the baseline
/// across `rounds`, and the median of the per-round ratios.
pub(crate) fn summarise(rounds: &[Vec<Sample>]) -> Vec<Metric> {
    let mut names: Vec<&Sample> = Vec::new();
    for sample in rounds.iter().flatten() {
        if !names.iter().any(|s| s.name == sample.name) {
            names.push(sample);
        }
    }
    names
        .into_iter()
        .map(|first| {
            let of_name = || rounds.iter().flatten().filter(|s| s.name == first.name);
            let values: Vec<f64> = of_name().map(|s| s.value).collect();
            let baselines: Vec<f64> = of_name().filter_map(|s| s.baseline).collect();
            let value = median(&values);
            let baseline = (!baselines.is_empty()).then(|| median(&baselines));
            // Each round measures both sides back to back, so the ratio is taken per round and
            // its median reported: drift between rounds (a noisy neighbour) cancels out.
            let ratios: Vec<f64> = of_name()
                .filter_map(|s| s.baseline.map(|b| s.value / b))
                .collect();
            Metric {
                name: first.name,
                unit: first.unit,
                better: first.better,
                value,
                baseline,
                ratio: (!ratios.is_empty()).then(|| median(&ratios)),
                spread: spread(&values),
                baseline_spread: (!baselines.is_empty()).then(|| spread(&baselines)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(spread(&[90.0, 100.0, 110.0]), 0.2);
    }

    #[test]
    fn the_ratio_is_the_median_of_per_round_ratios() {
        let round = |value, baseline| {
            vec![Sample {
                name: "m",
                unit: "x/s",
                better: crate::workloads::Better::Higher,
                value,
                baseline: Some(baseline),
            }]
        };
        // Ratios 0.5, 0.5, 2.0; medians of the sides 20 / 20 would say 1.0.
        let m = summarise(&[round(10.0, 20.0), round(20.0, 40.0), round(40.0, 20.0)]);
        assert_eq!(m[0].ratio, Some(0.5));
        assert_eq!((m[0].value, m[0].baseline), (20.0, Some(20.0)));
    }
}
