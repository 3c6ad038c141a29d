//! Percentiles of a sample, nearest-rank: the one statistics helper of the fleet bench.

use serde::Serialize;

/// The figures printed for one distribution (same unit as the samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// The `p`-th percentile (0 to 100) of `sorted` by the nearest-rank rule: the smallest sample
/// with at least `p` % of the samples at or below it. `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p99 and max of `samples` (NaNs dropped); all zero for no samples.
pub fn summarize(mut samples: Vec<f64>) -> Summary {
    samples.retain(|s| !s.is_nan());
    samples.sort_by(f64::total_cmp);
    Summary {
        n: samples.len(),
        p50: percentile(&samples, 50.0).unwrap_or(0.0),
        p99: percentile(&samples, 99.0).unwrap_or(0.0),
        max: samples.last().copied().unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(hundred.iter().rev().copied().collect());
        assert_eq!((s.n, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let two = summarize(vec![f64::NAN, 3.0, 1.0]);
        assert_eq!((two.n, two.p50, two.p99), (2, 1.0, 3.0));
        assert_eq!(summarize(Vec::new()), Summary::default());
    }
}
