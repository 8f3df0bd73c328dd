//! One-pass summaries of a stream of values (Welford's algorithm: numerically stable, O(1) memory).

use std::fmt;

/// Count, min, max, mean and variance of the values pushed so far. Non-finite values are
/// ignored and counted apart, so one bad reading cannot poison a whole bucket.
#[derive(Clone, Copy, Default, PartialEq)]
pub struct Summary {
    count: u64,
    non_finite: u64,
    min: f64,
    max: f64,
    mean: f64,
    m2: f64,
}

impl Summary {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value.
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            self.non_finite += 1;
            return;
        }
        self.count += 1;
        if self.count == 1 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// Number of finite values pushed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of NaN or infinite values that were skipped.
    pub fn non_finite(&self) -> u64 {
        self.non_finite
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Population variance.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 0).then(|| self.m2 / self.count as f64)
    }

    pub fn std_dev(&self) -> Option<f64> {
        self.variance().map(f64::sqrt)
    }
}

impl fmt::Debug for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Summary")
            .field("count", &self.count)
            .field("min", &self.min())
            .field("max", &self.max())
            .field("mean", &self.mean())
            .field("std_dev", &self.std_dev())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_figures() {
        let s = Summary::new();
        assert_eq!(s.count(), 0);
        assert_eq!(s.mean(), None);
        assert_eq!(s.min(), None);
    }

    #[test]
    fn matches_two_pass_figures() {
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let mut s = Summary::new();
        xs.iter().for_each(|x| s.push(*x));
        assert_eq!(s.count(), 8);
        assert_eq!(s.min(), Some(2.0));
        assert_eq!(s.max(), Some(9.0));
        assert_eq!(s.mean(), Some(5.0));
        assert!((s.std_dev().unwrap() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn skips_non_finite() {
        let mut s = Summary::new();
        for x in [1.0, f64::NAN, 3.0, f64::INFINITY] {
            s.push(x);
        }
        assert_eq!(s.count(), 2);
        assert_eq!(s.non_finite(), 2);
        assert_eq!(s.mean(), Some(2.0));
    }

    #[test]
    fn stable_with_large_offsets() {
        let mut s = Summary::new();
        for i in 0..1000 {
            s.push(1e9 + f64::from(i % 2));
        }
        assert!((s.variance().unwrap() - 0.25).abs() < 1e-6);
    }
}
