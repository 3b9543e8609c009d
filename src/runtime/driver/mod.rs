//! The driver: one per cluster. Takes jobs, plans them, schedules their
//! tasks on executors, keeps their outputs and logs.
//!
//! Layout of its directory:
//!
//! ```text
//! <dir>/driver.json                  where it listens (written by `motorpool driver`)
//! <dir>/bundles/<sha256>.bundle      code bundles, as uploaded
//! <dir>/runs/<run-id>/job.json       what was submitted
//! <dir>/runs/<run-id>/work/          the job directory: unpacked bundle, inputs, outputs
//! <dir>/runs/<run-id>/logs/<task>/   task stdout/stderr (`attempt-1.stderr`, `map-00003.attempt-2.stderr`)
//! <dir>/runs/<run-id>/summary.json   the RunSummary, once the run ended
//! ```
//!
//! The scheduler ([`scheduler`]) is one task that owns all run and executor
//! state and reacts to events (an executor's statuses, a lost stream, a
//! timer tick); the gRPC service ([`service`]) only moves bytes and turns
//! calls into events.
//!
//! A driver that another engine runs beside (Spark) is given that engine's
//! [`EngineTasks`]: how its tasks' command lines are made on this node and
//! what the engine says of itself in `ClusterStatus`. The driver keeps the
//! job's DAG, its runs, logs, retries, timeouts and cancellation either way.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::server::TcpIncoming;

use crate::auth::{self, Credential};

use super::proto;

mod command;
mod scheduler;
mod service;
mod store;

pub(crate) use scheduler::Event;

/// The command line of an engine's task on the driver's node.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The program and its arguments (no shell in between).
    pub argv: Vec<String>,
    /// Set over the run's environment.
    pub env: BTreeMap<String, String>,
}

/// What an engine running beside this driver contributes (Spark: the
/// `spark-submit` of a `spark:` task, its master's address and workers).
#[async_trait::async_trait]
pub trait EngineTasks: Send + Sync {
    /// The command line of a `spark:` task, run in the job directory; Err
    /// says why it cannot run here.
    fn spark_submit(&self, task: &crate::spec::SparkTask) -> Result<Launch, String>;

    /// What `ClusterStatus` reports of the engine (`spark.master`, ...).
    async fn describe(&self) -> BTreeMap<String, String>;
}

/// How to run a driver.
#[derive(Clone)]
pub struct DriverConfig {
    /// Where to listen: loopback, or any address with `tls`. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The cluster credential every call must carry.
    pub credential: Credential,
    /// The certificate to serve TLS with (required beyond loopback).
    pub tls: Option<crate::tls::ServerTls>,
    /// The driver's working directory (bundles, runs, logs).
    pub dir: PathBuf,
    /// How often executors heartbeat.
    pub heartbeat_interval: Duration,
    /// An executor silent this long is lost: its tasks run again elsewhere.
    pub heartbeat_timeout: Duration,
    /// The length of one minute of `timeout_minutes` (tests shorten it).
    pub minute: Duration,
    /// The engine beside this runtime, when there is one.
    pub engine: Option<Arc<dyn EngineTasks>>,
}

impl std::fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverConfig")
            .field("listen", &self.listen)
            .field("dir", &self.dir)
            .field("engine", &self.engine.is_some())
            .finish_non_exhaustive()
    }
}

impl DriverConfig {
    /// A driver on `listen` with the default heartbeat settings (1 s, lost after 5 s).
    pub fn new(
        listen: SocketAddr,
        credential: Credential,
        dir: impl Into<PathBuf>,
    ) -> DriverConfig {
        DriverConfig {
            listen,
            credential,
            tls: None,
            dir: dir.into(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            minute: Duration::from_secs(60),
            engine: None,
        }
    }
}

/// A declared input file of a run that is still being uploaded.
#[derive(Debug, Clone)]
pub(crate) struct StagedInput {
    pub size: u64,
    /// Every byte arrived and the file is closed.
    pub done: bool,
}

/// What the gRPC service needs to know about a live run without asking the scheduler.
#[derive(Debug)]
pub(crate) struct RunFiles {
    pub work: PathBuf,
    /// Declared inputs not yet complete.
    pub staging: HashMap<String, StagedInput>,
    /// The run, waiting for its inputs.
    pub pending_start: Option<Box<scheduler::NewRun>>,
    /// Output directories by stage id (absolute).
    pub outputs: HashMap<u32, PathBuf>,
    /// Declared inputs read where they lie (relative path -> the file).
    pub in_place: BTreeMap<PathBuf, proto::LocalFile>,
}

/// State shared by the service and the scheduler.
pub(crate) struct Shared {
    pub dir: PathBuf,
    /// The engine beside this runtime (Spark), when there is one.
    pub engine: Option<Arc<dyn EngineTasks>>,
    pub events: mpsc::UnboundedSender<Event>,
    pub runs: Mutex<HashMap<String, RunFiles>>,
}

impl Shared {
    pub(crate) fn bundle_path(&self, id: &str) -> PathBuf {
        self.dir.join("bundles").join(format!("{id}.bundle"))
    }

    pub(crate) fn run_dir(&self, run_id: &str) -> PathBuf {
        self.dir.join("runs").join(run_id)
    }

    pub(crate) fn lock_runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunFiles>> {
        // A panic while holding the lock leaves the map usable.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running driver. Dropping it stops the driver (abruptly); prefer [`DriverHandle::shutdown`].
pub struct DriverHandle {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    scheduler: Option<tokio::task::JoinHandle<()>>,
}

impl DriverHandle {
    /// Where the driver listens (`127.0.0.1:PORT`).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The driver's working directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The executors connected now.
    pub async fn executors(&self) -> anyhow::Result<Vec<proto::ExecutorStatus>> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .events
            .send(Event::Status { reply: tx })
            .map_err(|_| anyhow::anyhow!("the driver has stopped"))?;
        Ok(rx.await.context("the driver has stopped")?.executors)
    }

    /// Waits until at least `n` executors are connected.
    pub async fn wait_for_executors(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let have = self.executors().await?.len();
            if have >= n {
                return Ok(());
            }
            if Instant::now() >= end {
                anyhow::bail!("only {have} of {n} executors registered within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the driver: active runs fail, running commands are killed, the server stops.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shared.events.send(Event::Shutdown);
        if let Some(s) = self.scheduler.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
                Ok(served) => served
                    .context("the driver's server task failed")?
                    .context("the driver's gRPC server failed")?,
                Err(_) => server.abort(),
            }
        }
        Ok(())
    }
}

impl Drop for DriverHandle {
    fn drop(&mut self) {
        // The scheduler stops by itself on Shutdown, killing running commands.
        let _ = self.shared.events.send(Event::Shutdown);
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// Starts a driver: binds `config.listen` (TLS where required) and serves until
/// the handle is shut down or dropped.
pub async fn serve(config: DriverConfig) -> anyhow::Result<DriverHandle> {
    // Before anything else: a listener beyond loopback needs TLS.
    let mut builder = super::server_builder(config.listen, config.tls.as_ref(), "driver")?;
    std::fs::create_dir_all(config.dir.join("bundles"))
        .with_context(|| format!("cannot create {}", config.dir.display()))?;
    std::fs::create_dir_all(config.dir.join("runs"))
        .with_context(|| format!("cannot create {}", config.dir.display()))?;
    let dir = std::path::absolute(&config.dir)
        .with_context(|| format!("cannot resolve {}", config.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the listening address")?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        engine: config.engine.clone(),
        events: events_tx,
        runs: Mutex::new(HashMap::new()),
    });
    let scheduler = tokio::spawn(scheduler::run(
        scheduler::Settings {
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            minute: config.minute,
        },
        shared.clone(),
        events_rx,
    ));
    let ticker = shared.events.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(scheduler::TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if ticker.send(Event::Tick).is_err() {
                return;
            }
        }
    });

    let svc = proto::driver_server::DriverServer::new(service::DriverService::new(shared.clone()))
        .max_decoding_message_size(super::MAX_MESSAGE)
        .max_encoding_message_size(super::MAX_MESSAGE);
    let svc = tonic::service::interceptor::InterceptedService::new(
        svc,
        auth::require(config.credential.clone()),
    );
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(builder.add_service(svc).serve_with_incoming_shutdown(
        incoming,
        async {
            let _ = stop_rx.await;
        },
    ));
    Ok(DriverHandle {
        address,
        shared,
        stop: Some(stop_tx),
        server: Some(server),
        scheduler: Some(scheduler),
    })
}
