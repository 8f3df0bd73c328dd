//! The device-health anomaly detector: a linear model of the expected temperature of a device
//! from its load, clocks and GPU activity, fitted by ridge regression on standardised features.
//! A reading is scored by how far the observed temperature is from the expected one, in units
//! of the residual spread seen in training: a board whose fan died, whose heatsink came loose,
//! or that sits in a hot cabinet runs hotter than its load explains, and scores high.
//!
//! Training streams: every row updates sufficient statistics (sums, and the sums of products
//! of the features and target, shifted by the first row for numerical stability), so memory
//! does not depend on the dataset's size. A deterministic hash of `(device_id, seq, seed)`
//! holds out a share of the rows; the held-out RMSE, bias and R² come from the same kind of
//! statistics, so one pass does both.

use serde::{Deserialize, Serialize};

use crate::dataset::{Batch, METRICS, metric_index};

/// What the model predicts.
pub const DEFAULT_TARGET: &str = "temperature_celsius";
/// What it predicts from: a missing signal (a board without a GPU) counts as 0.
pub const DEFAULT_FEATURES: [&str; 7] = [
    "cpu_percent",
    "load1",
    "load5",
    "cpu_frequency_mhz",
    "gpu_utilization_percent",
    "gpu_power_watts",
    "process_count",
];

/// The target chosen when none is given (`--target auto`): the first of these the dataset
/// holds. A temperature where sensors exist; otherwise load, then memory, predicted from the
/// other metrics every Linux device reports.
pub const TARGET_PREFERENCE: [&str; 4] = [
    "temperature_celsius",
    "gpu_temperature_celsius",
    "load1",
    "memory_used_bytes",
];

/// The features of a target other than a temperature, where the dataset holds them.
pub const GENERAL_FEATURES: [&str; 12] = [
    "cpu_percent",
    "load1",
    "load5",
    "load15",
    "memory_used_bytes",
    "swap_used_bytes",
    "net_rx_bytes_per_second",
    "net_tx_bytes_per_second",
    "process_count",
    "cpu_frequency_mhz",
    "gpu_utilization_percent",
    "gpu_power_watts",
];

/// What a dataset holds, per column: how many rows have a value, and its range.
#[derive(Debug, Clone)]
pub struct Survey {
    pub rows: u64,
    pub count: [u64; METRICS.len()],
    pub min: [f64; METRICS.len()],
    pub max: [f64; METRICS.len()],
}

impl Default for Survey {
    fn default() -> Self {
        Self {
            rows: 0,
            count: [0; METRICS.len()],
            min: [f64::INFINITY; METRICS.len()],
            max: [f64::NEG_INFINITY; METRICS.len()],
        }
    }
}

impl Survey {
    pub fn push(&mut self, batch: &Batch) {
        self.rows += batch.len() as u64;
        for (c, column) in batch.columns.iter().enumerate() {
            for v in column.iter().flatten() {
                self.count[c] += 1;
                self.min[c] = self.min[c].min(*v);
                self.max[c] = self.max[c].max(*v);
            }
        }
    }

    /// Held by at least half the rows, and not constant.
    fn usable(&self, name: &str) -> bool {
        metric_index(name).is_some_and(|c| {
            self.count[c] >= 2 && self.count[c] * 2 >= self.rows && self.max[c] > self.min[c]
        })
    }

    fn held(&self, name: &str) -> String {
        let c = metric_index(name).expect("a known column");
        format!("{name} on {} of {} rows", self.count[c], self.rows)
    }
}

/// A target and features chosen from what a dataset holds, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub target: String,
    pub features: Vec<String>,
    pub reason: String,
}

/// Chooses the target (when `target` is `None`) and the features (when `features` is empty)
/// from what `survey` says the dataset holds.
pub fn choose(
    survey: &Survey,
    target: Option<&str>,
    features: &[String],
) -> Result<Choice, TrainError> {
    let (target, mut reason) = match target {
        Some(t) => (t.to_string(), format!("{t} as asked")),
        None => {
            let found = TARGET_PREFERENCE
                .iter()
                .find(|t| survey.usable(t))
                .ok_or_else(|| TrainError::NothingUsable {
                    held: TARGET_PREFERENCE
                        .iter()
                        .map(|t| survey.held(t))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let skipped: Vec<String> = TARGET_PREFERENCE
                .iter()
                .take_while(|t| *t != found)
                .map(|t| survey.held(t))
                .collect();
            let reason = if skipped.is_empty() {
                format!("{} (held by {})", found, survey.held(found))
            } else {
                format!(
                    "{found}, as the dataset holds too little of the others ({}); {}",
                    skipped.join(", "),
                    survey.held(found)
                )
            };
            (found.to_string(), reason)
        }
    };
    metric_index(&target).ok_or_else(|| TrainError::UnknownColumn(target.clone()))?;
    let features: Vec<String> = if !features.is_empty() {
        features.to_vec()
    } else if target.contains("temperature") {
        DEFAULT_FEATURES.iter().map(|s| s.to_string()).collect()
    } else {
        GENERAL_FEATURES
            .iter()
            .filter(|f| **f != target && survey.usable(f))
            .map(|s| s.to_string())
            .collect()
    };
    if features.is_empty() {
        return Err(TrainError::NothingUsable {
            held: format!(
                "{target} but none of its features ({})",
                GENERAL_FEATURES.join(", ")
            ),
        });
    }
    reason.push_str(&format!(", from {}", features.join(", ")));
    Ok(Choice {
        target,
        features,
        reason,
    })
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub target: String,
    pub features: Vec<String>,
    /// Share of rows held out for evaluation, 0 < f < 1.
    pub holdout: f64,
    pub seed: u64,
    /// Ridge penalty on the standardised weights.
    pub ridge: f64,
    /// Score above which a reading is anomalous.
    pub threshold: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            target: DEFAULT_TARGET.into(),
            features: DEFAULT_FEATURES.iter().map(|s| s.to_string()).collect(),
            holdout: 0.2,
            seed: 42,
            ridge: 1e-3,
            threshold: 3.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("unknown column {0:?} (known: {known})", known = METRICS.join(", "))]
    UnknownColumn(String),
    #[error("holdout must be between 0 and 1 (exclusive), got {0}")]
    Holdout(f64),
    #[error(
        "nothing in the dataset to train on: no target with values on at least half the rows \
         that varies ({held}); give --target and --features for what the devices do report"
    )]
    NothingUsable { held: String },
    #[error("no rows with a {target} value to train on ({seen} rows read)")]
    NoTrainingRows { target: String, seen: u64 },
    #[error(
        "no held-out rows: the dataset is too small for a {holdout} holdout ({train} training rows)"
    )]
    NoHeldOutRows { holdout: f64, train: u64 },
}

/// Shifted sums of one subset of rows (training or held out).
#[derive(Debug, Clone)]
struct Moments {
    n: f64,
    sx: Vec<f64>,
    sy: f64,
    sxx: Vec<f64>,
    sxy: Vec<f64>,
    syy: f64,
}

impl Moments {
    fn new(k: usize) -> Self {
        Self {
            n: 0.0,
            sx: vec![0.0; k],
            sy: 0.0,
            sxx: vec![0.0; k * k],
            sxy: vec![0.0; k],
            syy: 0.0,
        }
    }

    #[inline]
    fn push(&mut self, x: &[f64], y: f64) {
        let k = x.len();
        self.n += 1.0;
        self.sy += y;
        self.syy += y * y;
        for i in 0..k {
            let xi = x[i];
            self.sx[i] += xi;
            self.sxy[i] += xi * y;
            let row = &mut self.sxx[i * k..i * k + k];
            for j in i..k {
                row[j] += xi * x[j];
            }
        }
    }

    /// Sum of squared residuals of `y ≈ w·x + b` (all in shifted coordinates).
    fn sse(&self, w: &[f64], b: f64) -> f64 {
        let k = w.len();
        let mut wsxxw = 0.0;
        for i in 0..k {
            for j in 0..k {
                let s = if i <= j {
                    self.sxx[i * k + j]
                } else {
                    self.sxx[j * k + i]
                };
                wsxxw += w[i] * s * w[j];
            }
        }
        let wsx: f64 = w.iter().zip(&self.sx).map(|(a, b)| a * b).sum();
        let wsxy: f64 = w.iter().zip(&self.sxy).map(|(a, b)| a * b).sum();
        let pred2 = wsxxw + 2.0 * b * wsx + self.n * b * b;
        let ypred = wsxy + b * self.sy;
        (self.syy - 2.0 * ypred + pred2).max(0.0)
    }

    /// Sum of residuals.
    fn sum_residual(&self, w: &[f64], b: f64) -> f64 {
        let wsx: f64 = w.iter().zip(&self.sx).map(|(a, b)| a * b).sum();
        self.sy - wsx - self.n * b
    }

    fn variance_y(&self) -> f64 {
        if self.n == 0.0 {
            return 0.0;
        }
        let m = self.sy / self.n;
        (self.syy / self.n - m * m).max(0.0)
    }
}

/// The fitted model, in the raw units of the features.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Model {
    pub target: String,
    pub features: Vec<String>,
    pub weights: Vec<f64>,
    pub intercept: f64,
    /// Residual standard deviation on the training rows: the unit of the score.
    pub sigma: f64,
    pub threshold: f64,
}

impl Model {
    /// Expected target value for one row of features (a missing feature is 0).
    pub fn expected(&self, x: &[f64]) -> f64 {
        let mut acc = 0.0;
        for (w, v) in self.weights.iter().zip(x) {
            acc += w * v;
        }
        acc + self.intercept
    }

    /// |observed − expected| / sigma.
    pub fn score(&self, x: &[f64], observed: f64) -> f64 {
        (observed - self.expected(x)).abs() * (1.0 / self.sigma)
    }
}

/// Evaluation figures for one subset of rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub rows: u64,
    pub rmse: f64,
    /// Mean of observed − expected.
    pub bias: f64,
    pub r2: f64,
}

/// A training run's figures, written as `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub rows_read: u64,
    /// Rows without a target value.
    pub rows_skipped: u64,
    pub train: Evaluation,
    pub holdout: Evaluation,
    pub seed: u64,
    pub holdout_share: f64,
    pub ridge: f64,
}

/// Streaming trainer: push batches, then [`Trainer::fit`].
pub struct Trainer {
    config: TrainConfig,
    target: usize,
    features: Vec<usize>,
    shift: Option<(Vec<f64>, f64)>,
    train: Moments,
    test: Moments,
    read: u64,
    skipped: u64,
    x: Vec<f64>,
}

impl Trainer {
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        if !(config.holdout > 0.0 && config.holdout < 1.0) {
            return Err(TrainError::Holdout(config.holdout));
        }
        let col = |n: &str| metric_index(n).ok_or_else(|| TrainError::UnknownColumn(n.into()));
        let target = col(&config.target)?;
        let features = config
            .features
            .iter()
            .map(|f| col(f))
            .collect::<Result<Vec<_>, _>>()?;
        let k = features.len();
        Ok(Self {
            target,
            x: vec![0.0; k],
            features,
            shift: None,
            train: Moments::new(k),
            test: Moments::new(k),
            read: 0,
            skipped: 0,
            config,
        })
    }

    pub fn rows_read(&self) -> u64 {
        self.read
    }

    /// Adds every row of `batch` to the training or the held-out statistics.
    pub fn push(&mut self, batch: &Batch) {
        let cut = (self.config.holdout * u64::MAX as f64) as u64;
        let salt = mix(self.config.seed);
        let mut last_device: Option<(&str, u64)> = None;
        for i in 0..batch.len() {
            self.read += 1;
            let Some(y) = batch.columns[self.target][i] else {
                self.skipped += 1;
                continue;
            };
            for (slot, &m) in self.x.iter_mut().zip(&self.features) {
                *slot = batch.columns[m][i].unwrap_or(0.0);
            }
            if self.shift.is_none() {
                self.shift = Some((self.x.clone(), y));
            }
            let (shift, yshift) = self.shift.as_ref().expect("set above");
            for (v, s) in self.x.iter_mut().zip(shift) {
                *v -= s;
            }
            let y = y - yshift;
            let device = batch.device_ids[i].as_str();
            let dh = match last_device {
                Some((d, h)) if d == device => h,
                _ => {
                    let h = fnv(device.as_bytes());
                    last_device = Some((device, h));
                    h
                }
            };
            let h = mix(dh ^ salt ^ mix(batch.seqs[i] as u64));
            if h < cut {
                self.test.push(&self.x, y);
            } else {
                self.train.push(&self.x, y);
            }
        }
    }

    /// Fits on what was pushed so far (cheap: can be called after every file for a curve).
    pub fn fit(&self) -> Result<(Model, Report), TrainError> {
        let k = self.features.len();
        let t = &self.train;
        if t.n < 2.0 {
            return Err(TrainError::NoTrainingRows {
                target: self.config.target.clone(),
                seen: self.read,
            });
        }
        if self.test.n < 1.0 {
            return Err(TrainError::NoHeldOutRows {
                holdout: self.config.holdout,
                train: t.n as u64,
            });
        }
        let n = t.n;
        let mean: Vec<f64> = t.sx.iter().map(|s| s / n).collect();
        let ymean = t.sy / n;
        let cov = |i: usize, j: usize| {
            let (a, b) = if i <= j { (i, j) } else { (j, i) };
            t.sxx[a * k + b] / n - mean[i] * mean[j]
        };
        let sd: Vec<f64> = (0..k).map(|i| cov(i, i).max(0.0).sqrt()).collect();
        let used: Vec<usize> = (0..k).filter(|&i| sd[i] > 1e-12).collect();
        let u = used.len();
        let mut a = vec![0.0; u * u];
        let mut rhs = vec![0.0; u];
        for (p, &i) in used.iter().enumerate() {
            for (q, &j) in used.iter().enumerate() {
                a[p * u + q] = cov(i, j) / (sd[i] * sd[j]);
            }
            a[p * u + p] += self.config.ridge;
            rhs[p] = (t.sxy[i] / n - mean[i] * ymean) / sd[i];
        }
        let beta = cholesky_solve(&mut a, &mut rhs, u);
        let mut w = vec![0.0; k];
        for (p, &i) in used.iter().enumerate() {
            w[i] = beta[p] / sd[i];
        }
        let b = ymean - w.iter().zip(&mean).map(|(w, m)| w * m).sum::<f64>();
        let eval = |m: &Moments| {
            let sse = m.sse(&w, b);
            let var = m.variance_y() * m.n;
            Evaluation {
                rows: m.n as u64,
                rmse: (sse / m.n).sqrt(),
                bias: m.sum_residual(&w, b) / m.n,
                r2: if var > 0.0 { 1.0 - sse / var } else { 0.0 },
            }
        };
        let train = eval(t);
        let holdout = eval(&self.test);
        // Back to raw units: the shift moves only the intercept.
        let (xs, ys) = self.shift.as_ref().expect("rows were pushed");
        let intercept = b + ys - w.iter().zip(xs).map(|(w, s)| w * s).sum::<f64>();
        let sigma = if train.rmse > 0.0 { train.rmse } else { 1.0 };
        Ok((
            Model {
                target: self.config.target.clone(),
                features: self.config.features.clone(),
                weights: w,
                intercept,
                sigma,
                threshold: self.config.threshold,
            },
            Report {
                rows_read: self.read,
                rows_skipped: self.skipped,
                train,
                holdout,
                seed: self.config.seed,
                holdout_share: self.config.holdout,
                ridge: self.config.ridge,
            },
        ))
    }
}

/// Solves `A x = b` for a symmetric positive definite `A` (n×n, row-major), in place.
fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) -> Vec<f64> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        let d = d.max(1e-300).sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    b.to_vec()
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(rows: &[(&str, i64, [Option<f64>; 3])]) -> Batch {
        // Columns: cpu_percent, load1, temperature_celsius; the rest empty.
        let mut b = Batch {
            columns: vec![Vec::new(); METRICS.len()],
            ..Batch::default()
        };
        for (d, seq, v) in rows {
            b.device_ids.push(d.to_string());
            b.seqs.push(*seq);
            b.timestamps_ms.push(*seq * 1000);
            for (m, col) in b.columns.iter_mut().enumerate() {
                col.push(match METRICS[m] {
                    "cpu_percent" => v[0],
                    "load1" => v[1],
                    "temperature_celsius" => v[2],
                    _ => None,
                });
            }
        }
        b
    }

    fn config() -> TrainConfig {
        TrainConfig {
            features: vec!["cpu_percent".into(), "load1".into()],
            ridge: 1e-9,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn recovers_a_linear_relation_and_scores_outliers() {
        let mut rows = Vec::new();
        for i in 0..5000i64 {
            let cpu = (i % 97) as f64;
            let load = ((i * 7) % 13) as f64 / 4.0;
            let noise = ((i * 31) % 11) as f64 / 100.0 - 0.05;
            rows.push((
                "pi-1",
                i,
                [
                    Some(cpu),
                    Some(load),
                    Some(40.0 + 0.3 * cpu + 2.0 * load + noise),
                ],
            ));
        }
        let mut t = Trainer::new(config()).unwrap();
        t.push(&batch(&rows));
        let (model, report) = t.fit().unwrap();
        assert!((model.weights[0] - 0.3).abs() < 1e-3, "{model:?}");
        assert!((model.weights[1] - 2.0).abs() < 1e-2, "{model:?}");
        assert!((model.intercept - 40.0).abs() < 0.05, "{model:?}");
        assert!(report.holdout.r2 > 0.99, "{report:?}");
        assert!(
            report.holdout.rows > 800 && report.holdout.rows < 1200,
            "{report:?}"
        );
        // 10 °C hotter than the load explains: far past the threshold.
        assert!(model.score(&[50.0, 1.0], 40.0 + 15.0 + 2.0 + 10.0) > model.threshold);
        assert!(model.score(&[50.0, 1.0], 40.0 + 15.0 + 2.0) < 1.0);
    }

    #[test]
    fn the_seed_decides_the_split_deterministically() {
        let rows: Vec<_> = (0..2000i64)
            .map(|i| {
                (
                    "d",
                    i,
                    [
                        Some(i as f64 % 50.0),
                        Some(1.0),
                        Some(30.0 + (i % 50) as f64),
                    ],
                )
            })
            .collect();
        let run = |seed| {
            let mut t = Trainer::new(TrainConfig { seed, ..config() }).unwrap();
            t.push(&batch(&rows));
            t.fit().unwrap()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7).1.holdout.rows, run(8).1.holdout.rows);
    }

    /// A survey of `rows` rows where each named column has `count` values over a range.
    fn survey(rows: u64, held: &[(&str, u64)]) -> Survey {
        let mut s = Survey {
            rows,
            ..Survey::default()
        };
        for (name, count) in held {
            let c = metric_index(name).unwrap();
            s.count[c] = *count;
            s.min[c] = 0.0;
            s.max[c] = 1.0;
        }
        s
    }

    #[test]
    fn the_target_is_a_temperature_where_sensors_exist_and_load_where_none_do() {
        let pi = survey(
            100,
            &[
                ("temperature_celsius", 100),
                ("cpu_percent", 100),
                ("load1", 100),
            ],
        );
        let c = choose(&pi, None, &[]).unwrap();
        assert_eq!(c.target, "temperature_celsius");
        assert_eq!(c.features.len(), DEFAULT_FEATURES.len());
        // A virtual machine: no thermal sensor, a few stray readings are not enough.
        let vm = survey(
            100,
            &[
                ("temperature_celsius", 3),
                ("cpu_percent", 100),
                ("load1", 100),
                ("load5", 100),
                ("memory_used_bytes", 100),
                ("process_count", 100),
            ],
        );
        let c = choose(&vm, None, &[]).unwrap();
        assert_eq!(c.target, "load1");
        assert_eq!(
            c.features,
            ["cpu_percent", "load5", "memory_used_bytes", "process_count"]
        );
        assert!(
            c.reason.contains("temperature_celsius on 3 of 100 rows"),
            "{}",
            c.reason
        );
        // Given features are kept; nothing usable is refused with what was there.
        let c = choose(&vm, None, &["cpu_percent".into()]).unwrap();
        assert_eq!(c.features, ["cpu_percent"]);
        let empty = survey(100, &[("uptime_seconds", 100)]);
        let e = choose(&empty, None, &[]).unwrap_err().to_string();
        assert!(e.contains("load1 on 0 of 100 rows"), "{e}");
        let only_target = survey(100, &[("load1", 100)]);
        assert!(choose(&only_target, None, &[]).is_err());
    }

    #[test]
    fn rows_without_the_target_are_skipped_and_missing_features_are_zero() {
        let rows = vec![
            ("d", 1, [Some(1.0), None, None]),
            ("d", 2, [Some(2.0), None, Some(31.0)]),
        ];
        let mut t = Trainer::new(config()).unwrap();
        t.push(&batch(&rows));
        assert_eq!(t.rows_read(), 2);
        assert!(t.fit().is_err(), "two rows are not a model");
    }

    #[test]
    fn bad_configuration_is_named() {
        let e = Trainer::new(TrainConfig {
            target: "nope".into(),
            ..TrainConfig::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        assert!(
            Trainer::new(TrainConfig {
                holdout: 1.0,
                ..TrainConfig::default()
            })
            .is_err()
        );
    }
}
