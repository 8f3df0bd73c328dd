//! `shoal-ml`: train the device-health anomaly detector on a Shoal dataset, export it as ONNX,
//! and track it in MLflow.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use shoal_ml::dataset::{self, Manifest};
use shoal_ml::mlflow::{Metric, Mlflow, MlflowError, RunInfo};
use shoal_ml::serve::source::Source;
use shoal_ml::store::Location;
use shoal_ml::train::{
    Choice, DEFAULT_FEATURES, DEFAULT_TARGET, Model, Report, Survey, TrainConfig, Trainer,
};

/// Exit code when the model was trained and written but MLflow could not record it
/// (EX_TEMPFAIL: a scheduled job's retry will try again).
const EXIT_NOT_LOGGED: u8 = 75;
/// Exit code for bad input (EX_DATAERR).
const EXIT_BAD_INPUT: u8 = 65;

#[derive(Parser)]
#[command(
    name = "shoal-ml",
    version,
    about = "Train, export and track Shoal's models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the anomaly detector (expected temperature from load, clocks and GPU activity) on
    /// a dataset written by `shoal datasets export`; writes model.onnx, model.json,
    /// metrics.json and MLmodel to --out, and logs the run to MLflow when a tracking server is
    /// given.
    Train(Box<TrainArgs>),
    /// Serve models over the Open Inference Protocol (KServe V2), REST and gRPC, on an ONNX
    /// runtime. Any V2 client works (tritonclient, curl):
    ///   shoal-ml serve --model ./model
    ///   curl -d '{"inputs":[…]}' http://127.0.0.1:8000/v2/models/model/infer
    Serve(ServeArgs),
    /// Score readings with a trained model: reads {"features": [[…]], "observed": […]} (JSON)
    /// and prints {"expected": […], "score": […]}.
    Score {
        /// The --out folder of a training run (its model.json).
        #[arg(long)]
        model: PathBuf,
        /// The readings; "-" for standard input.
        #[arg(long, default_value = "-")]
        input: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A model to serve, as [NAME[:VERSION]=]SOURCE; SOURCE is a training run's --out folder
    /// (its model.onnx), an .onnx file, s3://BUCKET/PREFIX (its model.onnx) or a registered
    /// model, mlflow:/models/NAME/VERSION (VERSION: a number or latest). NAME defaults to the
    /// registered, folder's or file's name, VERSION to the registered one or 1. Repeatable:
    /// several models, and several versions of one, side by side.
    #[arg(
        long = "model",
        required = true,
        value_name = "[NAME[:VERSION]=]SOURCE"
    )]
    models: Vec<String>,
    /// MLflow tracking server for mlflow:/models/… sources.
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    mlflow_tracking_uri: Option<String>,
    /// Address for REST (/v2/...).
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_listen: String,
    /// Address for gRPC (inference.GRPCInferenceService).
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc_listen: String,
    /// Listen on addresses other than loopback although the server has no authentication yet
    /// (only behind something that authenticates every request).
    #[arg(long)]
    insecure_no_auth: bool,
}

/// The server has no authentication yet: loopback addresses only, unless the operator says
/// something in front of it authenticates.
fn refuse_exposed(addr: &str, insecure: bool) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("invalid listen address {addr:?}: {e}"))?
        .collect();
    if insecure || resolved.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr}: the model server has no authentication yet, so anyone \
         who can reach it could use and probe the models. Listen on 127.0.0.1, or pass \
         --insecure-no-auth if something in front of it authenticates every request"
    ))
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The dataset: a folder, file:///…, or s3://BUCKET/PREFIX (see `shoal datasets export`).
    #[arg(long, env = "SHOAL_DATASET_URI")]
    dataset: String,
    /// Where the model and its report go.
    #[arg(long, env = "SHOAL_ARTIFACTS_DIR", default_value = "./model")]
    out: PathBuf,
    /// Column to predict; "auto": the first the dataset holds of temperature_celsius,
    /// gpu_temperature_celsius, load1, memory_used_bytes (on at least half its rows, varying).
    #[arg(long, default_value = "auto")]
    target: String,
    /// Columns to predict from, comma-separated (a missing value counts as 0). Default: for
    /// a temperature, the load, clock and GPU columns; otherwise the other metrics the dataset
    /// holds.
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
    /// Share of rows held out for evaluation (chosen by a hash of device, seq and seed).
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Seed of the held-out split: the same seed and data give the same model.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Ridge penalty on the standardised weights.
    #[arg(long, default_value_t = 1e-3)]
    ridge: f64,
    /// Score above which a reading counts as anomalous.
    #[arg(long, default_value_t = 3.0)]
    threshold: f64,
    /// MLflow tracking server (http://HOST:PORT); without one nothing is sent anywhere.
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    mlflow_tracking_uri: Option<String>,
    /// MLflow experiment.
    #[arg(long, env = "MLFLOW_EXPERIMENT_NAME", default_value = "shoal")]
    experiment: String,
    /// Model Registry name the model is registered under.
    #[arg(long, default_value = "shoal-anomaly")]
    registered_model: String,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Sign the model's provenance (an in-toto statement in a DSSE envelope,
    /// provenance.dsse.json) with this P-256 key (`shoal keys generate`), and the whole
    /// folder in the OpenSSF model-signing format (model.sig: `model_signing verify key
    /// --signature OUT/model.sig --public_key signing.pub OUT` checks it).
    #[arg(long, env = "SHOAL_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
    /// The model version's provenance tags in MLflow (set once the model is signed).
    #[arg(skip)]
    provenance_tags: Vec<(String, String)>,
    /// The target and features in use, and why (set once the dataset is read).
    #[arg(skip)]
    choice: Option<Choice>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Train(args) => runtime.block_on(train(*args)),
        Command::Score { model, input } => score(&model, &input),
        Command::Serve(args) => serve(args),
    }
}

/// `serve`: exit 65 on a model that does not load, 64 on an address that cannot be bound.
fn serve(args: ServeArgs) -> ExitCode {
    for addr in [&args.http_listen, &args.grpc_listen] {
        if let Err(e) = refuse_exposed(addr, args.insecure_no_auth) {
            return fail(64, e);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let repo = match load_models(&args).await {
            Ok(r) => std::sync::Arc::new(r),
            Err(code) => return code,
        };
        let bind = |a: String| async move {
            tokio::net::TcpListener::bind(&a)
                .await
                .map_err(|e| format!("cannot listen on {a}: {e}"))
        };
        let (http, grpc) = match (bind(args.http_listen).await, bind(args.grpc_listen).await) {
            (Ok(h), Ok(g)) => (h, g),
            (Err(e), _) | (_, Err(e)) => return fail(64, e),
        };
        let addr =
            |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            json!({ "http": addr(&http), "grpc": addr(&grpc), "models": repo.names() })
        );
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match shoal_ml::serve::run(repo, http, grpc, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        }
    })
}

/// Every `--model`, fetched and loaded; `Err`: exit 64 (bad spec) or 65 (does not load).
async fn load_models(args: &ServeArgs) -> Result<shoal_ml::serve::repo::Repository, ExitCode> {
    use shoal_ml::serve::model::LoadedModel;
    let repo = shoal_ml::serve::repo::Repository::default();
    for spec in &args.models {
        let (label, source) = model_spec(spec).map_err(|e| fail(64, e))?;
        let fetched = source
            .fetch(args.mlflow_tracking_uri.as_deref())
            .await
            .map_err(|e| fail(EXIT_BAD_INPUT, e))?;
        let (name, version) = match label {
            Some((n, Some(v))) => (n, v),
            Some((n, None)) => (n, fetched.version.unwrap_or_else(|| "1".into())),
            None => (
                source.default_name(),
                fetched.version.unwrap_or_else(|| "1".into()),
            ),
        };
        let model = LoadedModel::from_bytes(&fetched.onnx)
            .map_err(|reason| fail(EXIT_BAD_INPUT, format!("cannot load {spec}: {reason}")))?;
        repo.put(&name, &version, model);
    }
    Ok(repo)
}

/// `[NAME[:VERSION]=]SOURCE` → (the label, if given, with its version, if given; the source).
#[allow(clippy::type_complexity)]
fn model_spec(spec: &str) -> Result<(Option<(String, Option<String>)>, Source), String> {
    // "=" may appear in an S3 key or a path; a label comes first and has no "/".
    let (label, source) = match spec.split_once('=') {
        Some((l, s)) if !l.contains('/') => (Some(l), s),
        _ => (None, spec),
    };
    let source = Source::parse(source)?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let label = label.map(|l| match l.split_once(':') {
        Some((n, v)) => (n.to_string(), Some(v.to_string())),
        None => (l.to_string(), None),
    });
    let bad = match &label {
        Some((n, v)) => !valid(n) || v.as_deref().is_some_and(|v| !valid(v)),
        None => !valid(&source.default_name()),
    };
    if bad {
        return Err(format!(
            "invalid model {spec:?}: NAME and VERSION are letters, digits, '.', '_' or '-'"
        ));
    }
    Ok((label, source))
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "shoal-ml: {message}");
    ExitCode::from(code)
}

/// The MLflow side of a training run; the first error stops tracking (training goes on).
struct Tracker {
    client: Mlflow,
    run: Option<RunInfo>,
    error: Option<MlflowError>,
}

impl Tracker {
    async fn attempt<T>(
        &mut self,
        op: impl AsyncFnOnce(&Mlflow, &RunInfo) -> Result<T, MlflowError>,
    ) -> Option<T> {
        if self.error.is_some() {
            return None;
        }
        let run = self.run.as_ref()?;
        match op(&self.client, run).await {
            Ok(v) => Some(v),
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

async fn start_tracking(
    client: Mlflow,
    args: &TrainArgs,
    manifest: &Manifest,
    digest: &str,
) -> Tracker {
    let mut tracker = Tracker {
        client,
        run: None,
        error: None,
    };
    let c = tracker.client.clone();
    let started = async {
        let experiment = c.experiment(&args.experiment).await?;
        let shoal_run = std::env::var("SHOAL_RUN_ID").ok();
        if let Some(id) = &shoal_run {
            // An earlier attempt of this scheduled run that could not finish its MLflow run:
            // say so there rather than leave it RUNNING forever.
            for old in c.running_with_tag(&experiment, "shoal.run_id", id).await? {
                c.set_tag(
                    &old,
                    "shoal.superseded",
                    "a later attempt of the same Shoal run",
                )
                .await?;
                c.end_run(&old, "FAILED").await?;
            }
        }
        let mut tags = vec![
            (
                "mlflow.source.name".to_string(),
                "shoal-ml train".to_string(),
            ),
            ("mlflow.source.type".to_string(), "JOB".to_string()),
            ("shoal.dataset_uri".to_string(), args.dataset.clone()),
            ("shoal.dataset_sha256".to_string(), digest.to_string()),
            (
                "shoal.code_version".to_string(),
                format!("shoal-ml {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        if let Some(id) = &shoal_run {
            tags.push(("shoal.run_id".into(), id.clone()));
        }
        if let Ok(job) = std::env::var("SHOAL_JOB") {
            tags.push(("shoal.job".into(), job));
        }
        let name = shoal_run.unwrap_or_else(|| format!("train-{}", &digest[..12]));
        let run = c.create_run(&experiment, &name, &tags).await?;
        let params: Vec<(String, String)> = [
            ("target", args.target.clone()),
            ("features", args.features.join(",")),
            (
                "target_choice",
                args.choice
                    .as_ref()
                    .map_or_else(String::new, |c| c.reason.clone()),
            ),
            ("holdout", args.holdout.to_string()),
            ("seed", args.seed.to_string()),
            ("ridge", args.ridge.to_string()),
            ("threshold", args.threshold.to_string()),
            ("dataset_rows", manifest.rows.to_string()),
            ("dataset_files", manifest.files.len().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        c.log_batch(&run.run_id, &params, &[], &[]).await?;
        Ok::<_, MlflowError>(run)
    }
    .await;
    match started {
        Ok(run) => tracker.run = Some(run),
        Err(e) => tracker.error = Some(e),
    }
    tracker
}

async fn train(mut args: TrainArgs) -> ExitCode {
    // Flags are checked before anything is read (the target as a temperature when "auto").
    if let Err(code) = trainer_and_client(&args) {
        return code;
    }
    if let Some(key) = &args.signing_key
        && let Err(e) = shoal_ml::provenance::SigningKey::load(key)
    {
        return fail(64, format!("invalid signing-key: {e}"));
    }
    let location = match Location::parse(&args.dataset) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let manifest = match dataset::open(&location).await {
        Ok(m) => m,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let choice = match choose_columns(&location, &manifest, &args).await {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", args.dataset)),
    };
    args.target = choice.target.clone();
    args.features = choice.features.clone();
    args.choice = Some(choice);
    let (mut trainer, client) = match trainer_and_client(&args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return fail(73, format!("{}: {e}", args.out.display()));
    }
    let digest = manifest.digest();
    let mut tracker = match client {
        Some(c) => Some(start_tracking(c, &args, &manifest, &digest).await),
        None => None,
    };

    let started = std::time::Instant::now();
    let started_on = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Err(e) = learn(
        &location,
        &manifest,
        &mut trainer,
        tracker.as_mut(),
        args.quiet,
    )
    .await
    {
        return fail(EXIT_BAD_INPUT, e);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (model, report) = match trainer.fit() {
        Ok(x) => x,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", args.dataset)),
    };

    let run_id = tracker
        .as_ref()
        .and_then(|t| t.run.as_ref())
        .map_or("", |r| r.run_id.as_str());
    let (metrics, mut artifacts) =
        match save_model(&args, &manifest, &digest, &model, &report, seconds, run_id) {
            Ok(x) => x,
            Err(code) => return code,
        };
    if let Some(key) = args.signing_key.clone() {
        let build = shoal_ml::provenance::Build {
            dataset_uri: &args.dataset,
            dataset_sha256: &digest,
            arguments: std::env::args().skip(1).collect(),
            builder: std::env::var("SHOAL_HUB_URL").unwrap_or_else(|_| "shoal-ml".into()),
            run_id: std::env::var("SHOAL_RUN_ID").ok(),
            mlflow_run_id: (!run_id.is_empty()).then(|| run_id.to_string()),
            started: started_on,
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let (envelope, statement_sha256, key_id) = match sign_model(&key, &args.out, &build) {
            Ok(x) => x,
            Err(e) => return fail(EXIT_BAD_INPUT, e),
        };
        // MLflow gets the envelope beside the model, and the model version says which
        // statement and key (the tags are set when it is registered).
        artifacts.push(("provenance/provenance.dsse.json".into(), envelope));
        args.provenance_tags = vec![
            ("shoal.provenance.statement_sha256".into(), statement_sha256),
            ("shoal.provenance.key_id".into(), key_id),
        ];
    }
    let summary = json!({
        "out": args.out,
        "rows": report.rows_read,
        "holdout_rmse": report.holdout.rmse,
        "holdout_r2": report.holdout.r2,
        "rows_per_second": metrics["rows_per_second"],
    });
    let Some(tracker) = tracker else {
        let _ = writeln!(std::io::stdout(), "{summary}");
        return ExitCode::SUCCESS;
    };
    log_to_mlflow(
        tracker, &args, &manifest, &digest, &report, seconds, artifacts, summary,
    )
    .await
}

/// The target and features: as given, or chosen from what the dataset holds (one reading
/// pass over it) when the target is "auto" or no features are given.
async fn choose_columns(
    location: &Location,
    manifest: &Manifest,
    args: &TrainArgs,
) -> Result<Choice, String> {
    let target = (args.target != "auto").then_some(args.target.as_str());
    if let Some(t) = target
        && !args.features.is_empty()
    {
        return Ok(Choice {
            target: t.to_string(),
            features: args.features.clone(),
            reason: "target and features as asked".into(),
        });
    }
    let mut survey = Survey::default();
    for entry in &manifest.files {
        let bytes = dataset::fetch(location, entry)
            .await
            .map_err(|e| e.to_string())?;
        dataset::decode(&location.display(&entry.path), bytes, |b| survey.push(b))
            .map_err(|e| e.to_string())?;
    }
    shoal_ml::train::choose(&survey, target, &args.features).map_err(|e| e.to_string())
}

/// The trainer and, when a tracking server is given, its MLflow client; `Err` is exit 64,
/// already explained on stderr.
fn trainer_and_client(args: &TrainArgs) -> Result<(Trainer, Option<Mlflow>), ExitCode> {
    let config = TrainConfig {
        target: if args.target == "auto" {
            DEFAULT_TARGET.into()
        } else {
            args.target.clone()
        },
        features: if args.features.is_empty() {
            DEFAULT_FEATURES.map(String::from).to_vec()
        } else {
            args.features.clone()
        },
        holdout: args.holdout,
        seed: args.seed,
        ridge: args.ridge,
        threshold: args.threshold,
    };
    let trainer = Trainer::new(config).map_err(|e| fail(64, e))?;
    let client = match args
        .mlflow_tracking_uri
        .as_deref()
        .filter(|u| !u.is_empty())
    {
        Some(uri) => Some(Mlflow::new(uri).map_err(|e| fail(64, e))?),
        None => None,
    };
    Ok((trainer, client))
}

/// Writes model.onnx, model.json, metrics.json and MLmodel to `--out`; returns the metrics
/// and the artifacts MLflow gets. `Err` is exit 73, already explained on stderr.
fn save_model(
    args: &TrainArgs,
    manifest: &Manifest,
    digest: &str,
    model: &Model,
    report: &Report,
    seconds: f64,
    run_id: &str,
) -> Result<(serde_json::Value, Artifacts), ExitCode> {
    let onnx = shoal_ml::onnx::export(
        model,
        &[
            ("dataset_uri", args.dataset.as_str()),
            ("dataset_sha256", digest),
        ],
    );
    let metrics = json!({
        "dataset": { "uri": args.dataset, "sha256": digest, "rows": manifest.rows, "files": manifest.files.len() },
        "report": report,
        "model": model,
        "choice": args.choice,
        "seconds": seconds,
        "rows_per_second": report.rows_read as f64 / seconds.max(1e-9),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    let metrics_json = serde_json::to_vec_pretty(&metrics).expect("json");
    let mlflow_model = shoal_ml::mlmodel::files(&model.target, &model.features, run_id);
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("model.onnx", onnx.clone()),
        (
            "model.json",
            serde_json::to_vec_pretty(model).expect("json"),
        ),
        ("metrics.json", metrics_json.clone()),
    ];
    files.extend(
        mlflow_model
            .iter()
            .map(|(name, text)| (*name, text.clone().into_bytes())),
    );
    for (name, bytes) in &files {
        if let Err(e) = std::fs::write(args.out.join(name), bytes) {
            return Err(fail(73, format!("{}: {e}", args.out.join(name).display())));
        }
    }
    let mut artifacts: Artifacts = vec![
        ("model/model.onnx".into(), onnx),
        ("evaluation/metrics.json".into(), metrics_json),
    ];
    artifacts.extend(
        mlflow_model
            .into_iter()
            .map(|(name, text)| (format!("model/{name}"), text.into_bytes())),
    );
    Ok((metrics, artifacts))
}

/// The files a training run uploads to MLflow: path under the run's artifacts, and bytes.
type Artifacts = Vec<(String, Vec<u8>)>;

/// The final metrics, artifacts and registered version in MLflow, and `mlflow.json` saying
/// whether they got there (exit 75 when not: a retry of the job logs them again).
#[allow(clippy::too_many_arguments)]
async fn log_to_mlflow(
    mut tracker: Tracker,
    args: &TrainArgs,
    manifest: &Manifest,
    digest: &str,
    report: &Report,
    seconds: f64,
    artifacts: Artifacts,
    summary: serde_json::Value,
) -> ExitCode {
    let finals = final_metrics(report, seconds, manifest.files.len() as i64);
    tracker
        .attempt(async |c, run| c.log_batch(&run.run_id, &[], &finals, &[]).await)
        .await;
    for (path, bytes) in artifacts {
        tracker
            .attempt(async |c, run| c.upload(run, &path, bytes).await)
            .await;
    }
    tracker
        .attempt(async |c, run| c.end_run(&run.run_id, "FINISHED").await)
        .await;
    let name = args.registered_model.clone();
    let version = tracker
        .attempt(async |c, run| {
            let source = format!("{}/model", run.artifact_uri);
            let mut tags = vec![("shoal.dataset_sha256".to_string(), digest.to_string())];
            tags.extend(args.provenance_tags.iter().cloned());
            c.register(&name, &source, &run.run_id, &tags).await
        })
        .await;
    let run_id = tracker.run.as_ref().map(|r| r.run_id.clone());
    let record = mlflow_record(&tracker, run_id.as_deref(), &name, version.as_deref());
    let _ = std::fs::write(
        args.out.join("mlflow.json"),
        serde_json::to_vec_pretty(&record).expect("json"),
    );
    match tracker.error {
        None => {
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                json!({ "mlflow_run_id": run_id, "registered_model": name, "version": version, "summary": summary })
            );
            ExitCode::SUCCESS
        }
        Some(e) => {
            if let Some(run) = &tracker.run {
                // Best effort, once: the server may be back.
                let quick = tracker
                    .client
                    .clone()
                    .with_retries(1, std::time::Duration::ZERO);
                let _ = quick.end_run(&run.run_id, "FAILED").await;
            }
            fail(
                EXIT_NOT_LOGGED,
                format!(
                    "the model is in {} but MLflow did not record it: {e} (see {}/mlflow.json; a retry of the job logs it again)",
                    args.out.display(),
                    args.out.display()
                ),
            )
        }
    }
}

/// The run's closing metrics, logged at step `last_step` (the number of dataset files).
fn final_metrics(report: &Report, seconds: f64, last_step: i64) -> Vec<Metric> {
    let now = chrono::Utc::now().timestamp_millis();
    [
        ("holdout_rmse", report.holdout.rmse),
        ("holdout_bias", report.holdout.bias),
        ("holdout_r2", report.holdout.r2),
        ("train_rmse", report.train.rmse),
        ("train_r2", report.train.r2),
        (
            "rows_per_second",
            report.rows_read as f64 / seconds.max(1e-9),
        ),
    ]
    .into_iter()
    .map(|(k, v)| Metric {
        key: k.into(),
        value: v,
        step: last_step,
        timestamp_ms: now,
    })
    .collect()
}

/// What `mlflow.json` says: logged (with the registered version) or not (with the error).
fn mlflow_record(
    tracker: &Tracker,
    run_id: Option<&str>,
    name: &str,
    version: Option<&str>,
) -> serde_json::Value {
    match &tracker.error {
        None => json!({
            "status": "logged",
            "tracking_uri": tracker.client.uri(),
            "run_id": run_id,
            "registered_model": name,
            "version": version,
        }),
        Some(e) => json!({
            "status": "not_logged",
            "tracking_uri": tracker.client.uri(),
            "run_id": run_id,
            "error": e.to_string(),
        }),
    }
}

/// Reads every file of the dataset into `trainer` (a progress bar on stderr unless `quiet`),
/// logging the learning curve after each file when tracking; `Err` names the bad file.
async fn learn(
    location: &Location,
    manifest: &Manifest,
    trainer: &mut Trainer,
    mut tracker: Option<&mut Tracker>,
    quiet: bool,
) -> Result<(), String> {
    let progress = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(
            Some(manifest.rows),
            indicatif::ProgressDrawTarget::stderr(),
        )
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "training {bar:30} {human_pos}/{human_len} rows, {per_sec}, eta {eta}",
        )
        .expect("template"),
    );
    for (step, entry) in manifest.files.iter().enumerate() {
        let bytes = match dataset::fetch(location, entry).await {
            Ok(b) => b,
            Err(e) => return Err(e.to_string()),
        };
        let name = location.display(&entry.path);
        if let Err(e) = dataset::decode(&name, bytes, |b| {
            trainer.push(b);
            progress.inc(b.len() as u64);
        }) {
            return Err(e.to_string());
        }
        // The learning curve: fit on everything read so far.
        if let (Some(t), Ok((_, report))) = (tracker.as_deref_mut(), trainer.fit()) {
            let now = chrono::Utc::now().timestamp_millis();
            let metrics = [
                ("train_rmse", report.train.rmse),
                ("holdout_rmse", report.holdout.rmse),
                ("rows_read", report.rows_read as f64),
            ]
            .map(|(k, v)| Metric {
                key: k.into(),
                value: v,
                step: step as i64,
                timestamp_ms: now,
            });
            t.attempt(async |c, run| c.log_batch(&run.run_id, &[], &metrics, &[]).await)
                .await;
        }
    }
    progress.finish_and_clear();
    Ok(())
}

/// This process's peak resident memory (Linux's VmHWM), for the benchmark figures.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Writes `out/provenance.dsse.json`: the statement over the model's files, signed. Returns
/// the envelope's bytes, the statement's SHA-256 and the key's id.
fn sign_model(
    key: &Path,
    out: &Path,
    build: &shoal_ml::provenance::Build<'_>,
) -> Result<(Vec<u8>, String, String), String> {
    use sha2::Digest;
    use shoal_ml::provenance::{ENVELOPE_FILE, SigningKey, statement};
    let key = SigningKey::load(key).map_err(|e| e.to_string())?;
    let statement = statement(out, build).map_err(|e| e.to_string())?;
    let envelope = key.sign(&statement).map_err(|e| e.to_string())?;
    let bytes = serde_json::to_vec_pretty(&envelope).expect("json");
    let path = out.join(ENVELOPE_FILE);
    std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    // The OpenSSF model-signing signature goes last: it covers every file, the envelope too.
    shoal_ml::model_signing::sign_dir(&key, out).map_err(|e| e.to_string())?;
    let payload = serde_json::to_vec(&statement).expect("json");
    let sha = shoal_ml::dataset::hex(&sha2::Sha256::digest(&payload));
    Ok((bytes, sha, key.key_id()))
}

fn score(model_dir: &Path, input: &Path) -> ExitCode {
    let path = model_dir.join("model.json");
    let model: Model = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", path.display())),
    };
    let text = if input.as_os_str() == "-" {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
        s
    } else {
        match std::fs::read_to_string(input) {
            Ok(s) => s,
            Err(e) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", input.display())),
        }
    };
    #[derive(serde::Deserialize)]
    struct Readings {
        features: Vec<Vec<f64>>,
        observed: Vec<f64>,
    }
    let readings: Readings = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("readings: {e}")),
    };
    if readings.features.len() != readings.observed.len() {
        return fail(
            EXIT_BAD_INPUT,
            "readings: features and observed differ in length",
        );
    }
    if let Some((i, row)) = readings
        .features
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != model.features.len())
    {
        return fail(
            EXIT_BAD_INPUT,
            format!(
                "readings: row {i} has {} features, the model takes {} ({})",
                row.len(),
                model.features.len(),
                model.features.join(", ")
            ),
        );
    }
    let expected: Vec<f64> = readings
        .features
        .iter()
        .map(|x| model.expected(x))
        .collect();
    let scores: Vec<f64> = readings
        .features
        .iter()
        .zip(&readings.observed)
        .map(|(x, y)| model.score(x, *y))
        .collect();
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        json!({ "expected": expected, "score": scores })
    );
    ExitCode::SUCCESS
}
