//! The local runner: a run is the first container's `command` + `args` as a process group on
//! the hub's machine, with the container's plain `env` values and Shoal's own variables. Like a
//! Kubernetes Job it retries a failed attempt up to `backoffLimit` times with exponential
//! backoff, and stops everything — the whole process group, children included — when
//! `activeDeadlineSeconds` passes or the run is cancelled (`concurrencyPolicy: Replace`,
//! shutdown). Output (stdout and stderr together) is kept per attempt, capped in size.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use futures::future::BoxFuture;

use super::runner::{Attempt, Ending, RunOutcome, Runner, cancelled};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// For the whole run, all attempts together.
    pub active_deadline: Option<Duration>,
    /// Retries after the first attempt.
    pub backoff_limit: u32,
    /// First retry delay, doubling up to six minutes (Kubernetes: 10 s).
    pub backoff_base: Duration,
    /// Bytes of output kept per attempt.
    pub log_limit: u64,
    /// After SIGTERM, how long before SIGKILL.
    pub grace: Duration,
}

impl Runner for RunSpec {
    fn run(
        self: Box<Self>,
        log_dir: PathBuf,
        cancel: watch::Receiver<bool>,
    ) -> BoxFuture<'static, RunOutcome> {
        Box::pin(async move {
            let _ = tokio::fs::create_dir_all(log_dir.join("artifacts")).await;
            run(&self, &log_dir, cancel).await
        })
    }
}

/// Runs `spec`, writing attempt logs under `log_dir`, until it ends or `cancel` turns true.
pub async fn run(spec: &RunSpec, log_dir: &Path, mut cancel: watch::Receiver<bool>) -> RunOutcome {
    let started = tokio::time::Instant::now();
    let deadline = spec.active_deadline.map(|d| started + d);
    let mut attempts = Vec::new();
    if spec.argv.is_empty() {
        return RunOutcome {
            ending: Ending::StartFailed("empty command".into()),
            attempts,
        };
    }
    if let Err(e) = tokio::fs::create_dir_all(log_dir).await {
        return RunOutcome {
            ending: Ending::StartFailed(format!("log folder {}: {e}", log_dir.display())),
            attempts,
        };
    }
    for attempt in 0..=spec.backoff_limit {
        if attempt > 0 {
            let wake = tokio::time::Instant::now() + backoff_delay(spec.backoff_base, attempt);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = sleep_until_opt(deadline) => return RunOutcome { ending: Ending::DeadlineExceeded, attempts },
                _ = cancelled(&mut cancel) => return RunOutcome { ending: Ending::Cancelled, attempts },
            }
        }
        let log = log_dir.join(format!("attempt-{}.log", attempt + 1));
        let mut child = match command(spec).spawn() {
            Ok(c) => c,
            Err(e) => {
                return RunOutcome {
                    ending: Ending::StartFailed(format!("cannot start {:?}: {e}", spec.argv[0])),
                    attempts,
                };
            }
        };
        let pgid = child.id();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let logger = tokio::spawn(capture(out, err, log.clone(), spec.log_limit));
        let stop = tokio::select! {
            status = child.wait() => {
                let _ = logger.await;
                let exit_code = status.ok().and_then(|s| s.code());
                attempts.push(Attempt { exit_code, log });
                if exit_code == Some(0) {
                    return RunOutcome { ending: Ending::Succeeded, attempts };
                }
                continue;
            }
            _ = sleep_until_opt(deadline) => Ending::DeadlineExceeded,
            _ = cancelled(&mut cancel) => Ending::Cancelled,
        };
        if let Some(pgid) = pgid {
            kill_group(pgid, spec.grace, &mut child).await;
        }
        let _ = logger.await;
        attempts.push(Attempt {
            exit_code: None,
            log,
        });
        return RunOutcome {
            ending: stop,
            attempts,
        };
    }
    RunOutcome {
        ending: Ending::Failed,
        attempts,
    }
}

/// The wait before retry `attempt` (1 for the first): `base`, doubling, at most six minutes.
fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << (attempt - 1).min(10))
        .min(Duration::from_secs(360))
}

/// One attempt's process: its own group, stdin closed, output piped, killed when dropped.
fn command(spec: &RunSpec) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    cmd
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM to the whole group, SIGKILL after `grace`.
async fn kill_group(pgid: u32, grace: Duration, child: &mut tokio::process::Child) {
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .arg(sig)
            .arg("--")
            .arg(format!("-{pgid}"))
            .status();
    };
    signal("-TERM");
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal("-KILL");
        let _ = child.wait().await;
    } else {
        // The leader is gone; stragglers in its group are not waited for, only killed.
        signal("-KILL");
    }
}

/// Copies stdout and stderr into `path` until both close, keeping the first `limit` bytes.
async fn capture(
    mut out: impl AsyncRead + Unpin,
    mut err: impl AsyncRead + Unpin,
    path: PathBuf,
    limit: u64,
) {
    let Ok(mut file) = tokio::fs::File::create(&path).await else {
        return;
    };
    let (mut b1, mut b2) = (vec![0u8; 8192], vec![0u8; 8192]);
    let (mut out_open, mut err_open) = (true, true);
    let mut written = 0u64;
    let mut dropped = 0u64;
    while out_open || err_open {
        tokio::select! {
            r = out.read(&mut b1), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => keep(&mut file, &b1[..n], &mut written, &mut dropped, limit).await,
            },
            r = err.read(&mut b2), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => keep(&mut file, &b2[..n], &mut written, &mut dropped, limit).await,
            },
        }
    }
    if dropped > 0 {
        let _ = file
            .write_all(
                format!(
                    "\n[shoal: output truncated: {dropped} more bytes not kept (limit {limit})]\n"
                )
                .as_bytes(),
            )
            .await;
    }
    let _ = file.flush().await;
}

async fn keep(
    file: &mut tokio::fs::File,
    data: &[u8],
    written: &mut u64,
    dropped: &mut u64,
    limit: u64,
) {
    let room = limit.saturating_sub(*written) as usize;
    let take = room.min(data.len());
    if take > 0 {
        let _ = file.write_all(&data[..take]).await;
        *written += take as u64;
    }
    *dropped += (data.len() - take) as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> RunSpec {
        RunSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("SHOAL_RUN_ID".into(), "run-42".into())],
            working_dir: None,
            active_deadline: None,
            backoff_limit: 0,
            backoff_base: Duration::from_millis(50),
            log_limit: 1 << 20,
            grace: Duration::from_millis(500),
        }
    }

    fn never() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    /// Polls `cond` every 5 ms until it holds; panics naming `what` after `timeout`.
    async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether process `pid` has ended: gone, or a zombie nobody reaped yet.
    fn ended(pid: &str) -> bool {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        state.is_empty() || state.contains(") Z ")
    }

    #[tokio::test]
    async fn success_keeps_both_streams_and_sees_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            &spec("echo out; echo err >&2; echo $SHOAL_RUN_ID"),
            dir.path(),
            never(),
        )
        .await;
        assert_eq!(out.ending, Ending::Succeeded);
        assert_eq!(out.attempts.len(), 1);
        let log = std::fs::read_to_string(&out.attempts[0].log).unwrap();
        for line in ["out", "err", "run-42"] {
            assert!(log.contains(line), "{log}");
        }
    }

    #[tokio::test]
    async fn failures_retry_up_to_the_backoff_limit() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            &RunSpec {
                backoff_limit: 2,
                ..spec("echo try; exit 3")
            },
            dir.path(),
            never(),
        )
        .await;
        assert_eq!(out.ending, Ending::Failed);
        assert_eq!(
            out.attempts.iter().map(|a| a.exit_code).collect::<Vec<_>>(),
            vec![Some(3); 3]
        );
        assert!(dir.path().join("attempt-3.log").exists());
    }

    #[tokio::test]
    async fn a_later_attempt_can_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("seen");
        let script = format!(
            "if [ -e {m} ]; then exit 0; else touch {m}; exit 1; fi",
            m = marker.display()
        );
        let out = run(
            &RunSpec {
                backoff_limit: 3,
                ..spec(&script)
            },
            &dir.path().join("logs"),
            never(),
        )
        .await;
        assert_eq!(out.ending, Ending::Succeeded);
        assert_eq!(out.attempts.len(), 2);
    }

    #[tokio::test]
    async fn the_deadline_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let s = RunSpec {
            active_deadline: Some(Duration::from_millis(700)),
            backoff_limit: 5,
            ..spec(&script)
        };
        let out = run(&s, &dir.path().join("logs"), never()).await;
        assert_eq!(out.ending, Ending::DeadlineExceeded);
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        // SIGKILL was sent to the group before `run` returned; its delivery is asynchronous.
        wait_for(
            "the background child to end",
            Duration::from_secs(10),
            || ended(&pid),
        )
        .await;
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "the background child {pid} is gone: {state}"
        );
    }

    #[tokio::test]
    async fn cancel_stops_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = watch::channel(false);
        // The run says when it is under way (its pid), so the cancel hits a running process.
        let pidfile = dir.path().join("run.pid");
        let s = spec(&format!(
            "echo $$ > {p}.tmp && mv {p}.tmp {p}; sleep 30",
            p = pidfile.display()
        ));
        let logs = dir.path().join("logs");
        let handle = tokio::spawn(async move { run(&s, &logs, rx).await });
        wait_for("the run to start", Duration::from_secs(10), || {
            pidfile.exists()
        })
        .await;
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        tx.send(true).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.ending, Ending::Cancelled);
        assert_eq!(out.attempts.len(), 1);
        assert_eq!(out.attempts[0].exit_code, None, "stopped, not exited");
        assert!(ended(&pid), "the cancelled process {pid} is gone");
    }

    #[tokio::test]
    async fn output_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunSpec {
            log_limit: 1000,
            ..spec("head -c 100000 /dev/zero | tr '\\0' x")
        };
        let out = run(&s, dir.path(), never()).await;
        let log = std::fs::read_to_string(&out.attempts[0].log).unwrap();
        assert!(log.starts_with(&"x".repeat(1000)));
        assert!(
            log.contains("99000 more bytes not kept"),
            "{}",
            &log[1000..]
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunSpec {
            argv: vec!["/nonexistent/prog".into()],
            ..spec("")
        };
        assert!(
            matches!(run(&s, dir.path(), never()).await.ending, Ending::StartFailed(m) if m.contains("/nonexistent/prog"))
        );
    }
}
