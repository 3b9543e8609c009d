//! The executor: one per worker node. Registers with the driver, keeps a
//! long-lived task stream open (heartbeats and statuses up, stages, tasks
//! and cancels down), runs up to `cores` tasks at once, and serves its map
//! output to reducers (`motorpool.runtime.v1.Executor`).
//!
//! Its directory:
//!
//! ```text
//! <dir>/bundles/<sha256>/        code bundles, fetched once per id, unpacked
//! <dir>/shuffle/<run-id>/        map output (`<attempt>.data` + `.index`), fetched segments
//! <dir>/motorpool_worker.py      the Python worker program
//! ```
//!
//! When the driver goes away the executor drops what it was doing and
//! registers again (as a new executor) once the driver answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;

use crate::auth::{self, Credential};

use super::proto::{self, StageKind, TaskState};
use super::{DriverClient, ExecutorClient};

mod python;
mod service;
mod task;

/// How to run an executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The driver's address (`127.0.0.1:PORT`).
    pub driver: String,
    /// The cluster credential: sent on every call, required on every call served.
    pub credential: Credential,
    /// The executor's working directory (bundle cache, shuffle files).
    pub dir: PathBuf,
    /// Tasks run at once.
    pub cores: usize,
    /// Where to serve shuffle data: loopback, or any address with `tls`. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The certificate to serve TLS with (required beyond loopback).
    pub tls: Option<crate::tls::ServerTls>,
    /// Read map input where it lies when this machine sees the driver's
    /// file (same device and inode); otherwise, or when false, it streams
    /// from the driver (ReadInput).
    pub read_in_place: bool,
}

impl ExecutorConfig {
    /// An executor of `driver` with one task slot per CPU, serving on a free loopback port.
    pub fn new(driver: impl Into<String>, credential: Credential, dir: impl Into<PathBuf>) -> Self {
        ExecutorConfig {
            driver: driver.into(),
            credential,
            dir: dir.into(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            read_in_place: true,
        }
    }
}

/// A cancellation flag tasks can wait on.
#[derive(Clone, Default)]
pub(crate) struct Cancel(Arc<(AtomicBool, Notify)>);

impl Cancel {
    pub(crate) fn cancel(&self) {
        self.0.0.store(true, Ordering::SeqCst);
        self.0.1.notify_waiters();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.0.load(Ordering::SeqCst)
    }

    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

type BundleCell = Arc<tokio::sync::OnceCell<PathBuf>>;

/// Everything an executor's tasks share.
pub(crate) struct ExecState {
    pub dir: PathBuf,
    pub cores: usize,
    pub credential: Credential,
    pub driver_address: String,
    pub address: String,
    pub worker_script: PathBuf,
    pub read_in_place: bool,
    id: Mutex<String>,
    driver: Mutex<Option<DriverClient>>,
    status_tx: Mutex<Option<mpsc::UnboundedSender<proto::TaskStatus>>>,
    bundles: Mutex<HashMap<String, BundleCell>>,
    stages: Mutex<HashMap<(String, u32), Arc<proto::StageDef>>>,
    running: Mutex<HashMap<u64, Cancel>>,
    pools: Mutex<HashMap<String, Arc<python::Pool>>>,
    peers: Mutex<HashMap<String, ExecutorClient>>,
    slots: Arc<Semaphore>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExecState {
    pub(crate) fn id(&self) -> String {
        lock(&self.id).clone()
    }

    pub(crate) fn driver(&self) -> anyhow::Result<DriverClient> {
        lock(&self.driver)
            .clone()
            .context("not connected to the driver")
    }

    pub(crate) fn shuffle_dir(&self, run_id: &str) -> PathBuf {
        self.dir.join("shuffle").join(run_id)
    }

    /// A client of the executor at `address`, connected once and reused.
    pub(crate) async fn peer(&self, address: &str) -> anyhow::Result<ExecutorClient> {
        if let Some(c) = lock(&self.peers).get(address) {
            return Ok(c.clone());
        }
        let c = super::connect_executor(address, &self.credential).await?;
        lock(&self.peers).insert(address.to_string(), c.clone());
        Ok(c)
    }

    pub(crate) fn forget_peer(&self, address: &str) {
        lock(&self.peers).remove(address);
    }

    /// The unpacked bundle `id`, fetched from the driver the first time.
    pub(crate) async fn bundle(&self, id: &str) -> anyhow::Result<PathBuf> {
        if !super::bundle::is_bundle_id(id) {
            anyhow::bail!("not a bundle id: {id:?}");
        }
        let cell = lock(&self.bundles)
            .entry(id.to_string())
            .or_default()
            .clone();
        let path = cell
            .get_or_try_init(|| async {
                let dest = self.dir.join("bundles").join(id);
                if dest.is_dir() {
                    return Ok::<PathBuf, anyhow::Error>(dest);
                }
                let mut client = self.driver()?;
                let mut stream = client
                    .fetch_bundle(proto::FetchBundleRequest {
                        bundle_id: id.to_string(),
                    })
                    .await
                    .context("cannot fetch the job's code bundle")?
                    .into_inner();
                let mut bytes = Vec::new();
                while let Some(chunk) = stream
                    .message()
                    .await
                    .context("cannot fetch the job's code bundle")?
                {
                    bytes.extend_from_slice(&chunk.data);
                }
                let id = id.to_string();
                tokio::task::spawn_blocking(move || {
                    if super::bundle::sha256_hex(&bytes) != id {
                        anyhow::bail!("the code bundle {id} arrived corrupted");
                    }
                    let tmp = dest.with_extension(format!("tmp-{:08x}", fastrand::u32(..)));
                    super::bundle::unpack(&bytes, &tmp)?;
                    if let Err(e) = std::fs::rename(&tmp, &dest) {
                        let _ = std::fs::remove_dir_all(&tmp);
                        if !dest.is_dir() {
                            return Err(e).context("cannot store the code bundle");
                        }
                    }
                    Ok(dest)
                })
                .await
                .context("the bundle unpacker failed")?
            })
            .await?;
        Ok(path.clone())
    }

    /// The Python workers of a run.
    pub(crate) fn pool(&self, def: &proto::StageDef, bundle: &Path) -> Arc<python::Pool> {
        lock(&self.pools)
            .entry(def.run_id.clone())
            .or_insert_with(|| {
                Arc::new(python::Pool::new(
                    self.worker_script.clone(),
                    bundle.to_path_buf(),
                    def.env.clone().into_iter().collect(),
                ))
            })
            .clone()
    }

    fn send_status(&self, st: proto::TaskStatus) {
        if let Some(tx) = lock(&self.status_tx).as_ref() {
            let _ = tx.send(st);
        }
    }

    fn on_driver_message(self: &Arc<Self>, msg: proto::DriverMessage) {
        {
            let mut stages = lock(&self.stages);
            for def in msg.stages {
                stages.insert((def.run_id.clone(), def.stage_id), Arc::new(def));
            }
        }
        for aid in msg.cancel {
            if let Some(c) = lock(&self.running).get(&aid) {
                c.cancel();
            }
        }
        for spec in msg.tasks {
            self.start_task(spec);
        }
        for run in msg.finished_runs {
            self.forget_run(&run);
        }
    }

    fn forget_run(&self, run: &str) {
        lock(&self.stages).retain(|(r, _), _| r != run);
        lock(&self.pools).remove(run);
        if super::safe_id(run).is_ok() {
            let dir = self.shuffle_dir(run);
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(dir);
            });
        }
    }

    fn start_task(self: &Arc<Self>, spec: proto::TaskSpec) {
        let def = lock(&self.stages)
            .get(&(spec.run_id.clone(), spec.stage_id))
            .cloned();
        let Some(def) = def else {
            self.send_status(proto::TaskStatus {
                attempt_id: spec.attempt_id,
                state: TaskState::Failed as i32,
                error: format!(
                    "the executor does not know stage {} of run {}",
                    spec.stage_id, spec.run_id
                ),
                exit_code: -1,
                ..Default::default()
            });
            return;
        };
        // A map over an empty partition runs nothing: answer at once, no process, no slot.
        if def.kind == StageKind::Map as i32
            && spec.inline_input.is_none()
            && spec.inputs.iter().all(|r| r.end <= r.start)
        {
            self.send_status(proto::TaskStatus {
                attempt_id: spec.attempt_id,
                state: TaskState::Succeeded as i32,
                exit_code: 0,
                partition_bytes: vec![0; def.reduce_partitions as usize],
                ..Default::default()
            });
            return;
        }
        let cancel = Cancel::default();
        lock(&self.running).insert(spec.attempt_id, cancel.clone());
        let state = self.clone();
        tokio::spawn(async move {
            let aid = spec.attempt_id;
            let permit = tokio::select! {
                p = state.slots.clone().acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            let status = match permit {
                Some(_permit) if !cancel.is_cancelled() => {
                    let started = Instant::now();
                    let mut st = task::run(&state, spec, def, cancel).await;
                    st.duration_us = started.elapsed().as_micros() as u64;
                    st
                }
                _ => proto::TaskStatus {
                    attempt_id: aid,
                    state: TaskState::Cancelled as i32,
                    exit_code: -1,
                    ..Default::default()
                },
            };
            lock(&state.running).remove(&aid);
            state.send_status(status);
        });
    }

    fn cancel_all(&self) {
        for c in lock(&self.running).values() {
            c.cancel();
        }
    }
}

/// A running executor. Dropping it stops the executor (abruptly); prefer [`ExecutorHandle::shutdown`].
pub struct ExecutorHandle {
    address: SocketAddr,
    state: Arc<ExecState>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    main: Option<tokio::task::JoinHandle<()>>,
}

impl ExecutorHandle {
    /// Where it serves shuffle data.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The id the driver gave it; `None` before it registered.
    pub fn executor_id(&self) -> Option<String> {
        Some(self.state.id()).filter(|id| !id.is_empty())
    }

    /// Stops the executor: running tasks are killed, the server stops.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_now();
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
                Ok(served) => served
                    .context("the executor's server task failed")?
                    .context("the executor's gRPC server failed")?,
                Err(_) => server.abort(),
            }
        }
        Ok(())
    }

    fn stop_now(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.state.cancel_all();
        if let Some(m) = self.main.take() {
            m.abort();
        }
        lock(&self.state.pools).clear();
        *lock(&self.state.status_tx) = None;
        *lock(&self.state.driver) = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for ExecutorHandle {
    fn drop(&mut self) {
        self.stop_now();
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// Starts an executor: serves shuffle data on `config.listen` (TLS where required)
/// and registers with the driver in the background (again whenever the
/// driver comes back after a loss).
pub async fn serve(config: ExecutorConfig) -> anyhow::Result<ExecutorHandle> {
    // Before anything else: a listener beyond loopback needs TLS.
    let mut builder = super::server_builder(config.listen, config.tls.as_ref(), "executor")?;
    if config.cores == 0 {
        anyhow::bail!("an executor needs at least one core");
    }
    for sub in ["bundles", "shuffle"] {
        std::fs::create_dir_all(config.dir.join(sub))
            .with_context(|| format!("cannot create {}", config.dir.display()))?;
    }
    let dir = std::path::absolute(&config.dir)
        .with_context(|| format!("cannot resolve {}", config.dir.display()))?;
    let worker_script = dir.join("motorpool_worker.py");
    std::fs::write(&worker_script, python::WORKER_PY)
        .with_context(|| format!("cannot write {}", worker_script.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let state = Arc::new(ExecState {
        dir,
        cores: config.cores,
        credential: config.credential.clone(),
        driver_address: config.driver.clone(),
        address: address.to_string(),
        worker_script,
        read_in_place: config.read_in_place,
        id: Mutex::new(String::new()),
        driver: Mutex::new(None),
        status_tx: Mutex::new(None),
        bundles: Mutex::new(HashMap::new()),
        stages: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        pools: Mutex::new(HashMap::new()),
        peers: Mutex::new(HashMap::new()),
        slots: Arc::new(Semaphore::new(config.cores)),
        stopping: AtomicBool::new(false),
    });
    let svc =
        proto::executor_server::ExecutorServer::new(service::ExecutorService::new(state.clone()))
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
    let main = tokio::spawn(main_loop(state.clone()));
    Ok(ExecutorHandle {
        address,
        state,
        stop: Some(stop_tx),
        server: Some(server),
        main: Some(main),
    })
}

async fn main_loop(state: Arc<ExecState>) {
    let mut quiet_failures = 0u32;
    while !state.stopping.load(Ordering::SeqCst) {
        let result = session(&state).await;
        // Whatever ran belonged to that registration.
        state.cancel_all();
        *lock(&state.status_tx) = None;
        *lock(&state.driver) = None;
        lock(&state.stages).clear();
        lock(&state.pools).clear();
        if state.stopping.load(Ordering::SeqCst) {
            return;
        }
        match result {
            Ok(registered) => {
                if registered {
                    eprintln!(
                        "motorpool executor: the driver closed the task stream; registering again"
                    );
                }
            }
            Err(e) => {
                if quiet_failures.is_multiple_of(20) {
                    eprintln!("motorpool executor: {e:#}; retrying");
                }
                quiet_failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250 + fastrand::u64(..250))).await;
    }
}

/// One registration: register, open the task stream, serve it until it ends.
/// Ok(true) when the driver ended it.
async fn session(state: &Arc<ExecState>) -> anyhow::Result<bool> {
    let mut client = super::connect_driver(&state.driver_address, &state.credential).await?;
    let reg = client
        .register_executor(proto::RegisterExecutorRequest {
            address: state.address.clone(),
            cores: state.cores as u32,
            pid: std::process::id(),
            version: super::VERSION.to_string(),
        })
        .await
        .context("the driver refused to register this executor")?
        .into_inner();
    let id = reg.executor_id.clone();
    *lock(&state.id) = id.clone();
    *lock(&state.driver) = Some(client.clone());
    let (status_tx, mut status_rx) = mpsc::unbounded_channel::<proto::TaskStatus>();
    *lock(&state.status_tx) = Some(status_tx);
    let (out_tx, out_rx) = mpsc::channel::<proto::ExecutorMessage>(64);
    out_tx
        .send(proto::ExecutorMessage {
            msg: Some(proto::executor_message::Msg::Hello(proto::Hello {
                executor_id: id.clone(),
            })),
        })
        .await
        .context("the task stream closed")?;
    let interval = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.clamp(50, 60_000)));
    let pump_state = state.clone();
    let pump = tokio::spawn(async move {
        let mut beat = tokio::time::interval(interval);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                _ = beat.tick() => {
                    let held = lock(&pump_state.running).len();
                    let running = held.min(pump_state.cores);
                    proto::executor_message::Msg::Heartbeat(proto::Heartbeat {
                        running: running as u32,
                        queued: (held - running) as u32,
                    })
                }
                st = status_rx.recv() => {
                    let Some(st) = st else { return };
                    let mut statuses = vec![st];
                    while statuses.len() < 4096 {
                        match status_rx.try_recv() {
                            Ok(st) => statuses.push(st),
                            Err(_) => break,
                        }
                    }
                    proto::executor_message::Msg::Statuses(proto::StatusBatch { statuses })
                }
            };
            if out_tx
                .send(proto::ExecutorMessage { msg: Some(msg) })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let result = async {
        let mut inbound = client
            .task_stream(ReceiverStream::new(out_rx))
            .await
            .context("the driver refused the task stream")?
            .into_inner();
        eprintln!(
            "motorpool executor {id}: registered with the driver at {} ({} cores, shuffle on {})",
            state.driver_address, state.cores, state.address
        );
        while let Some(msg) = inbound.message().await.context("the task stream broke")? {
            state.on_driver_message(msg);
        }
        Ok(true)
    }
    .await;
    pump.abort();
    result
}
