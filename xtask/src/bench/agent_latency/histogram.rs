//! The agent's Prometheus histograms as read from `/metrics`: parsed, subtracted
//! (what came between two scrapes), added, and read as quantiles the way
//! `histogram_quantile` does.

use std::collections::BTreeMap;

use super::as_f64;

/// A Prometheus histogram: cumulative counts by upper bound (seconds, `+Inf` last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// The histogram `name` from a text exposition page; empty when absent.
    pub fn parse(page: &str, name: &str) -> Self {
        let mut histogram = Histogram::default();
        let bucket = format!("{name}_bucket{{le=\"");
        for line in page.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(bound) = series.strip_prefix(&bucket) {
                let bound = bound.trim_end_matches("\"}");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().unwrap_or(f64::NAN)
                };
                if let Ok(count) = value.parse() {
                    histogram.buckets.push((bound, count));
                }
            } else if series == format!("{name}_sum") {
                histogram.sum = value.parse().unwrap_or(0.0);
            } else if series == format!("{name}_count") {
                histogram.count = value.parse().unwrap_or(0);
            }
        }
        histogram
    }

    /// What was observed between `earlier` and this scrape of the same histogram.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before: BTreeMap<u64, u64> = earlier
            .buckets
            .iter()
            .map(|(bound, count)| (bound.to_bits(), *count))
            .collect();
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(bound, count)| {
                    let earlier = before.get(&bound.to_bits()).copied().unwrap_or(0);
                    (*bound, count.saturating_sub(earlier))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Adds the observations of `other` (same buckets).
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.iter().map(|(bound, _)| (*bound, 0)).collect();
        }
        for ((_, count), (_, more)) in self.buckets.iter_mut().zip(&other.buckets) {
            *count += more;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// The `q` quantile (seconds), linear within its bucket, and that bucket's bounds;
    /// in the `+Inf` bucket, the last finite bound (a floor).
    pub fn quantile(&self, q: f64) -> Option<(f64, (f64, f64))> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * as_f64(total);
        let (mut lower, mut below) = (0.0, 0);
        for &(bound, cumulative) in &self.buckets {
            if as_f64(cumulative) >= rank {
                if bound.is_infinite() {
                    return Some((lower, (lower, bound)));
                }
                let in_bucket = as_f64(cumulative - below);
                let fraction = (rank - as_f64(below)) / in_bucket;
                return Some((lower + (bound - lower) * fraction, (lower, bound)));
            }
            (lower, below) = (bound, cumulative);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP egret_programming_latency_seconds From a change's arrival to the kernel.
# TYPE egret_programming_latency_seconds histogram
egret_programming_latency_seconds_sum 0.12
egret_programming_latency_seconds_count 10
egret_programming_latency_seconds_bucket{le=\"0.005\"} 0
egret_programming_latency_seconds_bucket{le=\"0.01\"} 4
egret_programming_latency_seconds_bucket{le=\"0.02\"} 9
egret_programming_latency_seconds_bucket{le=\"+Inf\"} 10
egret_reconcile_duration_seconds_count 3
";

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_rank() {
        let histogram = Histogram::parse(PAGE, "egret_programming_latency_seconds");
        assert_eq!(histogram.count, 10);
        assert_eq!(histogram.buckets.len(), 4);
        // Rank 5 of 10: the first of five observations in (0.01, 0.02].
        let (p50, bucket) = histogram.quantile(0.5).unwrap();
        assert!((p50 - 0.012).abs() < 1e-9, "{p50}");
        assert_eq!(bucket, (0.01, 0.02));
        // Rank 9.9: in the +Inf bucket, so only a floor can be said.
        let (p99, bucket) = histogram.quantile(0.99).unwrap();
        assert!((p99 - 0.02).abs() < 1e-9 && bucket.1.is_infinite());
    }

    #[test]
    fn deltas_count_only_what_came_between_two_scrapes() {
        let before = Histogram::parse(PAGE, "egret_programming_latency_seconds");
        let after = Histogram::parse(
            &PAGE
                .replace("count 10", "count 11")
                .replace("0.12", "0.15")
                .replace("\"0.02\"} 9", "\"0.02\"} 10")
                .replace("\"+Inf\"} 10", "\"+Inf\"} 11"),
            "egret_programming_latency_seconds",
        );
        let delta = after.since(&before);
        assert_eq!(delta.count, 1);
        assert_eq!(
            delta.buckets,
            vec![(0.005, 0), (0.01, 0), (0.02, 1), (f64::INFINITY, 1)]
        );
        let (p99, bucket) = delta.quantile(0.99).unwrap();
        assert_eq!(bucket, (0.01, 0.02));
        assert!(p99 > 0.01 && p99 <= 0.02);
        let mut total = Histogram::default();
        total.add(&delta);
        total.add(&delta);
        assert_eq!(total.count, 2);
        assert_eq!(total.buckets[2], (0.02, 2));
    }
}
