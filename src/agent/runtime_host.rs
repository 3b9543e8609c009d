//! The engine role a node agent hosts: the driver on a driver node, a
//! worker on the others (startup step 4, formation), and the driver node's
//! autotermination watch.
//!
//! This module owns starting, reporting and stopping that role inside the
//! agent's process, through the engine seam ([`crate::engines`]): which
//! engine runs is the cluster's choice, carried in the start request. What
//! autotermination does to the cluster's instances lives in
//! [`super::node`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::Status;

use super::proto;
use super::steps::StepRunner;
use crate::auth::Credential;
use crate::engines::{self, RoleContext, RoleStart, RunningRole};
use crate::proto::roles;
use crate::words::Role;

/// What the agent hosts right now.
struct Hosted {
    engine: String,
    /// The engine's version and settings, as asked.
    options: String,
    cluster: String,
    role: Role,
    /// A worker's driver.
    driver_address: String,
    running: Arc<dyn RunningRole>,
    watch: Option<tokio::task::JoinHandle<()>>,
    health_watch: Option<tokio::task::JoinHandle<()>>,
}

/// Called when the driver's cluster has idled past its autotermination time.
pub type OnIdle = Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Called once when the hosted role stops being whole (a daemon it started
/// died), with what is gone: the node marks itself, so that `plan` shows
/// the drift and `apply` starts the role again.
pub type OnBroken =
    Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// How often a hosted role's health is looked at.
const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

pub struct RuntimeHost {
    dir: PathBuf,
    tls: super::service::RuntimeTls,
    steps: Arc<StepRunner>,
    hosted: Mutex<Option<Hosted>>,
    on_idle: Option<OnIdle>,
    on_broken: Option<OnBroken>,
    /// How long a "minute" of autotermination is (shortened in tests).
    minute: std::time::Duration,
}

/// The engine role a start request asks for (the wire keeps the bundled
/// runtime's words: `driver`, `executor`).
fn requested_role(request: &proto::StartRuntimeRequest) -> Result<RoleStart, Status> {
    match request.role.as_str() {
        roles::DRIVER => Ok(RoleStart::Driver),
        roles::EXECUTOR | "worker" => {
            if request.driver_address.is_empty() {
                return Err(Status::invalid_argument(
                    "an executor needs the driver's address",
                ));
            }
            Ok(RoleStart::Worker {
                driver_address: request.driver_address.clone(),
            })
        }
        other => Err(Status::invalid_argument(format!(
            "unknown runtime role `{other}`"
        ))),
    }
}

impl RuntimeHost {
    pub fn new(
        dir: PathBuf,
        steps: Arc<StepRunner>,
        tls: super::service::RuntimeTls,
    ) -> RuntimeHost {
        RuntimeHost {
            dir,
            tls,
            steps,
            hosted: Mutex::new(None),
            on_idle: None,
            on_broken: None,
            minute: minute_from_env(),
        }
    }

    /// What to do when the hosted driver's cluster idles past its time.
    pub fn with_on_idle(mut self, on_idle: OnIdle) -> RuntimeHost {
        self.on_idle = Some(on_idle);
        self
    }

    /// What to do when the hosted role stops being whole.
    pub fn with_on_broken(mut self, on_broken: OnBroken) -> RuntimeHost {
        self.on_broken = Some(on_broken);
        self
    }

    /// Start (or keep) the cluster's driver or worker role; returns its address.
    ///
    /// The role listens on the agent's IP; when the agent listens on every
    /// address (0.0.0.0), on the IP the caller reached it at (`local_ip`).
    pub async fn start(
        &self,
        request: proto::StartRuntimeRequest,
        local_ip: Option<IpAddr>,
    ) -> Result<String, Status> {
        if request.cluster_credential.is_empty() {
            return Err(Status::invalid_argument(
                "the runtime needs the cluster's credential",
            ));
        }
        let role = requested_role(&request)?;
        let engine_kind = if request.engine.is_empty() {
            engines::DEFAULT_ENGINE
        } else {
            request.engine.as_str()
        };
        let engine = crate::registry::Registry::global()
            .engine_or_error(engine_kind)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut credential = Credential::new(request.cluster_credential.clone());
        if let Some(trust) = &self.tls.trust {
            credential = credential.with_trust(trust.clone());
        }
        let (role_word, driver_address) = match &role {
            RoleStart::Driver => (Role::Driver, String::new()),
            RoleStart::Worker { driver_address } => (Role::Worker, driver_address.clone()),
        };
        let options = format!(
            "{}|{:?}|{}|{}",
            request.engine_version,
            request
                .engine_conf
                .iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
            request.node_cores,
            request.node_memory_mb
        );
        let mut hosted = self.hosted.lock().await;
        // Asked again for what already runs, and runs whole: idempotent.
        if let Some(h) = &*hosted
            && h.engine == engine_kind
            && h.options == options
            && h.cluster == request.cluster
            && h.role == role_word
            && h.driver_address == driver_address
        {
            match h.running.health().await {
                Ok(()) => return Ok(h.running.address()),
                Err(e) => eprintln!(
                    "motorpool agent: the {} of cluster {} is not whole ({e}): starting it again",
                    role.name(),
                    request.cluster
                ),
            }
        }
        if let Some(old) = hosted.take() {
            stop_hosted(old).await;
        }
        let ip = match (self.tls.listen_ip, local_ip) {
            (ip, _) if !ip.is_unspecified() => ip,
            (_, Some(ip)) => ip,
            _ => IpAddr::from([127, 0, 0, 1]),
        };
        let context = RoleContext {
            cluster: request.cluster.clone(),
            credential,
            dir: self.dir.join("runtime"),
            listen: SocketAddr::new(ip, self.tls.runtime_port),
            tls: self.tls.server.clone(),
            cores: request.cores,
            version: request.engine_version.clone(),
            conf: request.engine_conf.clone().into_iter().collect(),
            node_cores: request.node_cores,
            node_memory_mb: request.node_memory_mb,
            minute: self.minute,
        };
        let running = engine
            .start_role(role, context)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let address = running.address();
        let watch = match (&self.on_idle, role_word, request.autotermination_minutes) {
            (Some(on_idle), Role::Driver, minutes) if minutes > 0 => Some(self.watch_idle(
                running.clone(),
                request.cluster.clone(),
                minutes,
                on_idle.clone(),
            )),
            _ => None,
        };
        let health_watch = self
            .on_broken
            .clone()
            .map(|on_broken| Self::watch_health(running.clone(), on_broken));
        let joined = if role_word == Role::Driver {
            address.clone()
        } else {
            driver_address.clone()
        };
        *hosted = Some(Hosted {
            engine: engine_kind.to_string(),
            options,
            cluster: request.cluster.clone(),
            role: role_word,
            driver_address,
            running,
            watch,
            health_watch,
        });
        let wire_role = if role_word == Role::Driver {
            roles::DRIVER
        } else {
            roles::EXECUTOR
        };
        self.steps.set_runtime(wire_role, &joined).await;
        Ok(address)
    }

    /// Watch the driver: once no job has run for `minutes`, call `on_idle`.
    fn watch_idle(
        &self,
        driver: Arc<dyn RunningRole>,
        cluster: String,
        minutes: u32,
        on_idle: OnIdle,
    ) -> tokio::task::JoinHandle<()> {
        let limit = self.minute * minutes;
        tokio::spawn(async move {
            let mut idle_since = tokio::time::Instant::now();
            let tick = (limit / 20).clamp(
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(30),
            );
            loop {
                tokio::time::sleep(tick).await;
                match driver.running_jobs().await {
                    Ok(0) => {
                        if idle_since.elapsed() >= limit {
                            eprintln!(
                                "motorpool agent: cluster {cluster} idle for {minutes} minutes: stopping it"
                            );
                            on_idle(cluster).await;
                            return;
                        }
                    }
                    Ok(_) => idle_since = tokio::time::Instant::now(),
                    Err(_) => return, // the driver stopped
                }
            }
        })
    }

    /// Watch the role: the first time it is not whole, call `on_broken`.
    fn watch_health(
        role: Arc<dyn RunningRole>,
        on_broken: OnBroken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEALTH_INTERVAL).await;
                if let Err(e) = role.health().await {
                    eprintln!("motorpool agent: {e}");
                    on_broken(e.to_string()).await;
                    return;
                }
            }
        })
    }

    /// The engine hosted here and what its role says of itself (empty when
    /// nothing is hosted).
    pub async fn describe(&self) -> (String, std::collections::BTreeMap<String, String>) {
        match &*self.hosted.lock().await {
            Some(h) => (h.engine.clone(), h.running.describe().await),
            None => (String::new(), Default::default()),
        }
    }

    /// The hosted driver's view of its cluster.
    pub async fn driver_status(&self) -> Result<proto::DriverStatusResponse, Status> {
        match &*self.hosted.lock().await {
            Some(h) if h.role == Role::Driver => {
                let workers = h
                    .running
                    .workers()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                // Readiness needs only the workers: a busy driver's run
                // count is not a reason to fail it.
                let running_jobs = h.running.running_jobs().await.unwrap_or(0);
                let load = h.running.load().await.ok().flatten();
                Ok(proto::DriverStatusResponse {
                    executors: workers,
                    running_jobs,
                    load_known: load.is_some(),
                    queued_tasks: load.map_or(0, |l| l.queued_tasks),
                    running_tasks: load.map_or(0, |l| l.running_tasks),
                    slots: load.map_or(0, |l| l.slots),
                })
            }
            _ => Err(Status::failed_precondition("this node hosts no driver")),
        }
    }

    pub async fn stop(&self) {
        let hosted = self.hosted.lock().await.take();
        if let Some(h) = hosted {
            stop_hosted(h).await;
        }
        self.steps.set_runtime("", "").await;
    }
}

async fn stop_hosted(hosted: Hosted) {
    for w in [hosted.watch, hosted.health_watch].into_iter().flatten() {
        w.abort();
        let _ = w.await;
    }
    hosted.running.shutdown().await;
}

/// `MOTORPOOL_MINUTE_MS` shortens a minute (tests of autotermination); one real minute otherwise.
fn minute_from_env() -> std::time::Duration {
    std::env::var("MOTORPOOL_MINUTE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
        .unwrap_or(std::time::Duration::from_secs(60))
}
