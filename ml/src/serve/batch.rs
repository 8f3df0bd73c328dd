//! Dynamic batching. Requests for one model version that arrive while it is running queue up;
//! the next run takes all of them at once, stacked along their first dimension, and each
//! request gets its own rows back. There is no timer: an idle model runs a request at once
//! (no latency added), a busy one batches exactly what queued during its previous run — the
//! store writer's group commit, applied to inference.
//!
//! Only models whose every input and output takes any number of rows (`[-1, …]`) are
//! stacked; requests whose other dimensions differ wait for a later run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;
use tract_onnx::prelude::*;

use super::model::{Data, LoadedModel, ModelError, NamedTensor, to_tensor};

/// Most rows stacked into one run.
pub const MAX_BATCH_ROWS: usize = 8192;

/// A model version's queue and its counters.
#[derive(Default)]
pub struct Batcher {
    queue: Mutex<Queue>,
    stats: Stats,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    busy: bool,
}

struct Job {
    /// Checked, in the model's input order.
    inputs: Vec<NamedTensor>,
    rows: usize,
    reply: oneshot::Sender<Result<Vec<NamedTensor>, ModelError>>,
}

impl Job {
    fn stacks_with(&self, other: &Job) -> bool {
        self.inputs
            .iter()
            .zip(&other.inputs)
            .all(|(a, b)| a.shape[1..] == b.shape[1..])
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    failures: AtomicU64,
    rows: AtomicU64,
    executions: AtomicU64,
    compute_ns: AtomicU64,
    last_ms: AtomicI64,
}

/// What a model version has done: the Triton statistics extension's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Requests answered with outputs.
    pub success: u64,
    /// Requests whose run failed.
    pub fail: u64,
    /// Rows inferred (a request of N rows counts N).
    pub inference_count: u64,
    /// Runs of the model (a stacked run counts once).
    pub execution_count: u64,
    /// Time spent in the runtime, in nanoseconds.
    pub compute_ns: u64,
    /// When the last run finished, in ms since the epoch (0: never).
    pub last_inference: i64,
}

impl Batcher {
    pub fn counters(&self) -> Counters {
        let s = &self.stats;
        Counters {
            success: s.requests.load(Ordering::Relaxed),
            fail: s.failures.load(Ordering::Relaxed),
            inference_count: s.rows.load(Ordering::Relaxed),
            execution_count: s.executions.load(Ordering::Relaxed),
            compute_ns: s.compute_ns.load(Ordering::Relaxed),
            last_inference: s.last_ms.load(Ordering::Relaxed),
        }
    }
}

/// Runs `model` on `inputs`, stacked with whatever else is queued for it.
pub async fn infer(
    model: Arc<LoadedModel>,
    inputs: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, ModelError> {
    let inputs = model.validate(&inputs)?;
    let rows = if model.batchable() {
        inputs.first().map_or(0, |t| t.shape[0] as usize)
    } else {
        0
    };
    let (reply, answer) = oneshot::channel();
    let start = {
        let mut q = model.batcher.queue.lock().expect("batch queue");
        q.jobs.push_back(Job {
            inputs,
            rows,
            reply,
        });
        !std::mem::replace(&mut q.busy, true)
    };
    if start {
        let runner = model.clone();
        tokio::task::spawn_blocking(move || drain(&runner));
    }
    answer
        .await
        .map_err(|_| ModelError::Runtime("the model's runner stopped".into()))?
}

/// Runs queued jobs until none is left.
fn drain(model: &LoadedModel) {
    let batchable = model.batchable();
    loop {
        let jobs = {
            let mut q = model.batcher.queue.lock().expect("batch queue");
            let Some(first) = q.jobs.pop_front() else {
                q.busy = false;
                return;
            };
            let mut rows = first.rows;
            let mut jobs = vec![first];
            while let Some(next) = q.jobs.front()
                && batchable
                && rows + next.rows <= MAX_BATCH_ROWS
                && next.stacks_with(&jobs[0])
            {
                rows += next.rows;
                jobs.push(q.jobs.pop_front().expect("peeked"));
            }
            jobs
        };
        run_stacked(model, jobs);
    }
}

/// One run for `jobs`, each answered with its own rows of every output.
fn run_stacked(model: &LoadedModel, mut jobs: Vec<Job>) {
    let started = Instant::now();
    let total: usize = jobs.iter().map(|j| j.rows).sum();
    let result = if jobs.len() == 1 {
        let inputs: TVec<TValue> = jobs[0].inputs.iter().map(|t| to_tensor(t).into()).collect();
        model.run(inputs).map(|outputs| vec![outputs])
    } else {
        let stacked = (0..model.inputs.len())
            .map(|i| {
                let mut shape = jobs[0].inputs[i].shape.clone();
                shape[0] = total as i64;
                let data = Data::concat(jobs.iter().map(|j| &j.inputs[i].data));
                let first = &jobs[0].inputs[i];
                to_tensor(&NamedTensor {
                    name: first.name.clone(),
                    shape,
                    data,
                })
                .into()
            })
            .collect();
        model
            .run(stacked)
            .and_then(|outputs| split(&outputs, &jobs, total))
    };
    let s = &model.batcher.stats;
    s.executions.fetch_add(1, Ordering::Relaxed);
    s.compute_ns
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    s.last_ms
        .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    match result {
        Ok(per_job) => {
            s.requests.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            s.rows.fetch_add(
                jobs.iter().map(|j| j.rows.max(1) as u64).sum(),
                Ordering::Relaxed,
            );
            for (job, outputs) in jobs.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(outputs));
            }
        }
        Err(e) => {
            s.failures.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            let message = e.to_string();
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(ModelError::Runtime(message.clone())));
            }
        }
    }
}

/// Each job's rows of every stacked output.
fn split(
    outputs: &[NamedTensor],
    jobs: &[Job],
    total: usize,
) -> Result<Vec<Vec<NamedTensor>>, ModelError> {
    if let Some(odd) = outputs
        .iter()
        .find(|o| o.shape.first() != Some(&(total as i64)))
    {
        return Err(ModelError::Runtime(format!(
            "output {:?} has shape {:?} for {total} stacked rows",
            odd.name, odd.shape
        )));
    }
    let mut offset = 0;
    Ok(jobs
        .iter()
        .map(|job| {
            let mine = outputs
                .iter()
                .map(|o| {
                    let per_row = o.data.len().checked_div(total).unwrap_or(0);
                    let mut shape = o.shape.clone();
                    shape[0] = job.rows as i64;
                    NamedTensor {
                        name: o.name.clone(),
                        shape,
                        data: o
                            .data
                            .slice(offset * per_row..(offset + job.rows) * per_row),
                    }
                })
                .collect();
            offset += job.rows;
            mine
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Model;

    fn loaded() -> Arc<LoadedModel> {
        let model = Model {
            target: "temperature_celsius".into(),
            features: vec!["load1".into(), "cpu_percent".into()],
            weights: vec![2.5, 0.125],
            intercept: 41.0,
            sigma: 1.5,
            threshold: 4.0,
        };
        Arc::new(LoadedModel::from_bytes(&crate::onnx::export(&model, &[])).unwrap())
    }

    /// `rows` rows whose values depend on `i`.
    fn request(i: usize, rows: usize) -> Vec<NamedTensor> {
        let f: Vec<f64> = (0..rows * 2).map(|j| (i * 7 + j) as f64 * 0.5).collect();
        let o: Vec<f64> = (0..rows).map(|j| 40.0 + (i + j) as f64).collect();
        vec![
            NamedTensor {
                name: "features".into(),
                shape: vec![rows as i64, 2],
                data: Data::Fp64(f),
            },
            NamedTensor {
                name: "observed".into(),
                shape: vec![rows as i64, 1],
                data: Data::Fp64(o),
            },
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_during_a_run_share_the_next_run_and_get_their_own_rows() {
        let m = loaded();
        // As if a run were under way: requests queue behind it.
        m.batcher.queue.lock().unwrap().busy = true;
        let sizes = [1, 3, 2, 1, 5, 1, 4, 2];
        let pending: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &rows)| tokio::spawn(infer(m.clone(), request(i, rows))))
            .collect();
        while m.batcher.queue.lock().unwrap().jobs.len() < sizes.len() {
            tokio::task::yield_now().await;
        }
        let runner = m.clone();
        tokio::task::spawn_blocking(move || drain(&runner));
        for (i, (p, &rows)) in pending.into_iter().zip(&sizes).enumerate() {
            let got = p.await.unwrap().unwrap();
            let alone = m.infer(&request(i, rows)).unwrap();
            assert_eq!(got, alone, "request {i}");
            assert_eq!(got[1].shape, vec![rows as i64, 1]);
        }
        let c = m.counters();
        assert_eq!(c.execution_count, 1, "{c:?}");
        assert_eq!(c.success, sizes.len() as u64);
        assert_eq!(c.inference_count, sizes.iter().sum::<usize>() as u64);
        // The runner lets go once it finds the queue empty (just after the last answer).
        let began = std::time::Instant::now();
        while m.batcher.queue.lock().unwrap().busy {
            assert!(began.elapsed().as_secs() < 10, "the runner let go");
            tokio::task::yield_now().await;
        }
        // A bad request is refused alone, before it can join a run.
        let mut bad = request(0, 2);
        bad[0].shape = vec![2, 3];
        assert!(infer(m.clone(), bad).await.is_err());
        assert!(infer(m.clone(), request(9, 1)).await.is_ok());
        assert_eq!(m.counters().execution_count, 2);
    }
}
