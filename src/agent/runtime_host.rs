//! The runtime a node agent hosts: the driver on a driver node, an executor
//! on a worker (startup step 4, formation), and the driver node's
//! autotermination watch.
//!
//! This module owns starting, reporting and stopping that runtime inside the
//! agent's process; the runtime itself lives in `crate::runtime`, and what
//! autotermination does to the cluster's instances lives in
//! [`super::autoterminate`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::Status;

use super::proto;
use super::steps::StepRunner;
use crate::auth::Credential;
use crate::runtime::{driver, executor};

/// What the agent hosts right now.
#[derive(Default)]
enum Hosted {
    #[default]
    Nothing,
    Driver {
        cluster: String,
        credential: Credential,
        handle: driver::DriverHandle,
        watch: Option<tokio::task::JoinHandle<()>>,
    },
    Executor {
        cluster: String,
        driver: String,
        handle: executor::ExecutorHandle,
    },
}

/// Called when the driver's cluster has idled past its autotermination time.
pub type OnIdle = Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

pub struct RuntimeHost {
    dir: PathBuf,
    tls: super::service::RuntimeTls,
    steps: Arc<StepRunner>,
    hosted: Mutex<Hosted>,
    on_idle: Option<OnIdle>,
    /// How long a "minute" of autotermination is (shortened in tests).
    minute: std::time::Duration,
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
            hosted: Mutex::new(Hosted::Nothing),
            on_idle: None,
            minute: minute_from_env(),
        }
    }

    /// What to do when the hosted driver's cluster idles past its time.
    pub fn with_on_idle(mut self, on_idle: OnIdle) -> RuntimeHost {
        self.on_idle = Some(on_idle);
        self
    }

    /// Start (or keep) the driver or an executor; returns its address.
    ///
    /// The runtime listens on the agent's IP; when the agent listens on every
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
        let mut credential = Credential::new(request.cluster_credential.clone());
        if let Some(trust) = &self.tls.trust {
            credential = credential.with_trust(trust.clone());
        }
        let mut hosted = self.hosted.lock().await;
        // Asked again for what already runs: idempotent.
        match (&*hosted, request.role.as_str()) {
            (
                Hosted::Driver {
                    cluster, handle, ..
                },
                "driver",
            ) if *cluster == request.cluster => {
                return Ok(handle.address().to_string());
            }
            (
                Hosted::Executor {
                    cluster,
                    driver,
                    handle,
                },
                "executor",
            ) if *cluster == request.cluster && *driver == request.driver_address => {
                return Ok(handle.address().to_string());
            }
            _ => {}
        }
        stop_hosted(std::mem::take(&mut *hosted)).await;
        let ip = match (self.tls.listen_ip, local_ip) {
            (ip, _) if !ip.is_unspecified() => ip,
            (_, Some(ip)) => ip,
            _ => IpAddr::from([127, 0, 0, 1]),
        };
        let listen = SocketAddr::new(ip, 0);
        let (next, address, driver_address) = match request.role.as_str() {
            "driver" => {
                let mut config = driver::DriverConfig::new(
                    listen,
                    credential.clone(),
                    self.dir.join("runtime").join("driver"),
                );
                config.minute = self.minute;
                config.tls = self.tls.server.clone();
                let handle = driver::serve(config)
                    .await
                    .map_err(|e| Status::internal(format!("the driver did not start: {e:#}")))?;
                let address = handle.address().to_string();
                let watch = match (&self.on_idle, request.autotermination_minutes) {
                    (Some(on_idle), minutes) if minutes > 0 => Some(self.watch_idle(
                        &handle,
                        credential.clone(),
                        request.cluster.clone(),
                        minutes,
                        on_idle.clone(),
                    )),
                    _ => None,
                };
                (
                    Hosted::Driver {
                        cluster: request.cluster.clone(),
                        credential,
                        handle,
                        watch,
                    },
                    address.clone(),
                    address,
                )
            }
            "executor" => {
                if request.driver_address.is_empty() {
                    return Err(Status::invalid_argument(
                        "an executor needs the driver's address",
                    ));
                }
                let mut config = executor::ExecutorConfig::new(
                    request.driver_address.clone(),
                    credential,
                    self.dir.join("runtime").join("executor"),
                );
                if request.cores > 0 {
                    config.cores = request.cores as usize;
                }
                config.listen = listen;
                config.tls = self.tls.server.clone();
                let handle = executor::serve(config)
                    .await
                    .map_err(|e| Status::internal(format!("the executor did not start: {e:#}")))?;
                let address = handle.address().to_string();
                (
                    Hosted::Executor {
                        cluster: request.cluster.clone(),
                        driver: request.driver_address.clone(),
                        handle,
                    },
                    address,
                    request.driver_address.clone(),
                )
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown runtime role `{other}`"
                )));
            }
        };
        *hosted = next;
        self.steps.set_runtime(&request.role, &driver_address).await;
        Ok(address)
    }

    /// Watch the driver: once no job has run for `minutes`, call `on_idle`.
    fn watch_idle(
        &self,
        handle: &driver::DriverHandle,
        credential: Credential,
        cluster: String,
        minutes: u32,
        on_idle: OnIdle,
    ) -> tokio::task::JoinHandle<()> {
        let probe = DriverProbe {
            address: handle.address().to_string(),
            credential,
        };
        let limit = self.minute * minutes;
        tokio::spawn(async move {
            let mut idle_since = tokio::time::Instant::now();
            let tick = (limit / 20).clamp(
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(30),
            );
            loop {
                tokio::time::sleep(tick).await;
                match probe.running_jobs().await {
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

    pub async fn driver_status(&self) -> Result<proto::DriverStatusResponse, Status> {
        match &*self.hosted.lock().await {
            Hosted::Driver {
                handle, credential, ..
            } => {
                let credential = Some(credential.clone());
                let executors = handle
                    .executors()
                    .await
                    .map_err(|e| Status::unavailable(format!("{e:#}")))?;
                let running_jobs = credential.as_ref().map(|c| DriverProbe {
                    address: handle.address().to_string(),
                    credential: c.clone(),
                });
                let running_jobs = match running_jobs {
                    Some(p) => p.running_jobs().await.unwrap_or(0),
                    None => 0,
                };
                Ok(proto::DriverStatusResponse {
                    executors: executors.into_iter().map(|e| e.executor_id).collect(),
                    running_jobs: running_jobs as u32,
                })
            }
            _ => Err(Status::failed_precondition("this node hosts no driver")),
        }
    }

    pub async fn stop(&self) {
        let hosted = std::mem::take(&mut *self.hosted.lock().await);
        stop_hosted(hosted).await;
        self.steps.set_runtime("", "").await;
    }
}

async fn stop_hosted(hosted: Hosted) {
    match hosted {
        Hosted::Nothing => {}
        Hosted::Driver { handle, watch, .. } => {
            if let Some(w) = watch {
                w.abort();
            }
            let _ = handle.shutdown().await;
        }
        Hosted::Executor { handle, .. } => {
            let _ = handle.shutdown().await;
        }
    }
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

/// Asks a driver, through its gRPC service, how busy it is.
struct DriverProbe {
    address: String,
    credential: Credential,
}

impl DriverProbe {
    async fn running_jobs(&self) -> anyhow::Result<usize> {
        use crate::runtime::proto::{ClusterStatusRequest, driver_client::DriverClient};
        let channel = crate::tls::endpoint(&self.address, self.credential.trust())?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await?;
        let mut client = DriverClient::with_interceptor(
            channel,
            crate::auth::AttachCredential(self.credential.clone()),
        );
        let status = client
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        Ok(status.active_runs.len())
    }
}
