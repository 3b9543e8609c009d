//! The node agent: `motorpool agent`, the process that runs on every node.
//!
//! It serves the `motorpool.agent.v1.Agent` gRPC service (see
//! `proto/agent.proto`). The local provider starts one detached agent per
//! instance with `motorpool agent --dir DIR --listen 127.0.0.1:0 --instance-id ID`
//! and learns its address from `DIR/agent.json`, which [`run`] writes once
//! the socket is bound.
//!
//! A listener beyond loopback must serve TLS ([`crate::tls`]): the agent
//! refuses a non-loopback `--listen` unless its config carries the node's
//! TLS settings. On loopback it serves plaintext unless TLS is forced
//! (`MOTORPOOL_TLS=always`, or `always` in its TLS settings); the driver or
//! executor it hosts, and every client it makes, follow the same rule.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use motorpool_provider::private_files;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

pub mod node;
mod runtime_host;
mod service;
pub mod steps;

#[cfg(test)]
mod tests;

/// The generated protobuf messages and the tonic client/server of `motorpool.agent.v1`.
pub use crate::proto::agent as proto;

pub use proto::agent_client::AgentClient;
pub use proto::{HealthResponse, IdentityResponse};

/// The file an agent writes in its directory once it listens.
pub const AGENT_FILE: &str = "agent.json";

/// The revision of the v1 protocol this agent speaks (`IdentityResponse.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a stopping agent lets in-flight calls finish before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How to run an agent (`motorpool agent --dir DIR --listen ADDR --instance-id ID`).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The agent's working directory; `agent.json` is written here.
    pub dir: PathBuf,
    /// Where to listen: loopback, or any address when the config has TLS settings. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The provider's id of the instance this agent runs on.
    pub instance_id: String,
    /// A JSON [`AgentConfig`] (the instance's user data on the local provider).
    pub config: Option<PathBuf>,
    /// The port of the driver or executor the agent hosts (0: any free one).
    pub runtime_port: u16,
}

/// What an agent is told at launch (the local provider's user data; on clouds,
/// written by cloud-init). Holds secrets: the file is private to the node,
/// and `Debug` redacts them.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The credential every call to this agent must carry (`auth::HEADER`).
    pub credential: String,
    #[serde(default)]
    pub project: String,
    /// Steps to run on itself at start (a pool instance warming up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<node::WarmStep>,
    /// How to reach its own provider (to tag itself, to stop its idle cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<node::NodeProvider>,
    /// A cloud pool instance: its pool's warm-up, rendered on the node itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_spec: Option<crate::bootstrap::BootSpec>,
    /// A cloud node launched into a cluster: the cluster's startup, which the
    /// node runs on itself (the engine cannot reach it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<node::ClusterBoot>,
    /// The node's certificate and key, issued by the project CA (required to
    /// listen beyond loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::NodeTls>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("credential", &"<redacted>")
            .field("project", &self.project)
            .field("warm", &self.warm)
            .field("provider", &self.provider)
            .field("warm_spec", &self.warm_spec)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .finish()
    }
}

impl AgentConfig {
    /// The config a cloud node's user data carries (see
    /// [`crate::bootstrap::cloud::agent_config_of`]), when it is one.
    pub fn from_user_data(user_data: &str) -> Option<AgentConfig> {
        crate::bootstrap::cloud::agent_config_of(user_data).and_then(|c| Self::from_json(&c))
    }

    /// A config from its JSON text, when it is one.
    pub fn from_json(text: &str) -> Option<AgentConfig> {
        serde_json::from_str(text).ok()
    }

    pub fn read(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read(path)
            .with_context(|| format!("cannot read the agent config {}", path.display()))?;
        let config: AgentConfig = serde_json::from_slice(&text)
            .with_context(|| format!("the agent config {} is not valid", path.display()))?;
        if config.credential.is_empty() {
            bail!("the agent config {} has no credential", path.display());
        }
        Ok(config)
    }
}

/// The content of `<dir>/agent.json`: where a running agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFile {
    /// `127.0.0.1:PORT`.
    pub address: String,
    pub pid: u32,
    pub instance_id: String,
}

impl AgentFile {
    /// Reads `<dir>/agent.json`.
    pub fn read(dir: &Path) -> anyhow::Result<AgentFile> {
        let path = dir.join(AGENT_FILE);
        let text =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}

/// Runs the agent until SIGTERM or SIGINT, then returns `Ok(())` (exit code 0).
///
/// Binds `opts.listen` (refusing a non-loopback address), then writes
/// `<dir>/agent.json` atomically, then serves. SIGHUP is ignored, so a closed
/// terminal does not stop a detached agent.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    run_until(opts, shutdown_signal()?).await
}

/// Like [`run`], but stops when `shutdown` completes instead of on a signal.
pub async fn run_until(
    opts: AgentOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let started_at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if opts.instance_id.is_empty() {
        bail!("the instance id must not be empty");
    }
    private_files::create_dir(&opts.dir)
        .with_context(|| format!("cannot create the agent directory {}", opts.dir.display()))?;
    let dir = std::path::absolute(&opts.dir)
        .with_context(|| format!("cannot resolve the agent directory {}", opts.dir.display()))?;

    let config = match &opts.config {
        Some(path) => Some(AgentConfig::read(path)?),
        None => None,
    };
    // Refuse plaintext beyond loopback before binding anything.
    let node_tls = config.as_ref().and_then(|c| c.tls.clone());
    let server_tls = node_tls.as_ref().map(|t| t.server());
    let tls_config = crate::tls::server_config(opts.listen, server_tls.as_ref())
        .with_context(|| format!("the agent cannot listen on {}", opts.listen))?;
    let trust = node_tls.as_ref().map(|t| t.trust());

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let local = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let agent_file = AgentFile {
        address: local.to_string(),
        pid: std::process::id(),
        instance_id: opts.instance_id.clone(),
    };
    write_atomically(
        &dir.join(AGENT_FILE),
        &serde_json::to_vec_pretty(&agent_file)?,
    )?;
    eprintln!(
        "motorpool agent {} (pid {}) listening on {}{}",
        opts.instance_id,
        agent_file.pid,
        agent_file.address,
        if tls_config.is_some() { " (TLS)" } else { "" }
    );

    // The node acting on itself through its provider: warm-up and autotermination.
    let node = match config
        .as_ref()
        .and_then(|c| c.provider.as_ref().map(|p| (c, p)))
    {
        Some((c, p)) => Some(std::sync::Arc::new(node::Node {
            instance_id: opts.instance_id.clone(),
            project: c.project.clone(),
            provider: p
                .connect()
                .context("cannot reach the node's own provider")?,
            agent_credential: with_trust(
                crate::auth::Credential::new(c.credential.clone()),
                trust.as_ref(),
            ),
            watch_interval: node::POOL_WATCH_INTERVAL,
            published_address: (!local.ip().is_unspecified()).then(|| local.to_string()),
        })),
        None => None,
    };
    let on_idle: Option<runtime_host::OnIdle> = node.clone().map(|n| {
        let f: runtime_host::OnIdle = std::sync::Arc::new(move |cluster: String| {
            let n = n.clone();
            Box::pin(async move {
                if let Err(e) = n.autoterminate(&cluster).await {
                    eprintln!("motorpool agent: autotermination of {cluster} failed: {e:#}");
                }
            })
        });
        f
    });
    let on_broken: Option<runtime_host::OnBroken> = node.clone().map(|n| {
        let f: runtime_host::OnBroken = std::sync::Arc::new(move |what: String| {
            let n = n.clone();
            Box::pin(async move {
                if let Err(e) = n.mark_broken(&what).await {
                    eprintln!("motorpool agent: {e:#}");
                }
            })
        });
        f
    });
    let svc = service::AgentService::new(
        service::AgentInfo {
            instance_id: opts.instance_id.clone(),
            pid: agent_file.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_unix,
            started,
            dir: dir.clone(),
        },
        on_idle,
        on_broken,
        service::RuntimeTls {
            server: server_tls.clone(),
            trust: trust.clone(),
            listen_ip: opts.listen.ip(),
            runtime_port: opts.runtime_port,
        },
    );
    if let (Some(n), Some(c)) = (node.clone(), config.as_ref()) {
        let steps = svc.steps();
        let runtime = svc.runtime();
        let (warm, warm_spec, cluster) = (c.warm.clone(), c.warm_spec.clone(), c.cluster.clone());
        let dir = dir.clone();
        tokio::spawn(async move {
            if !warm.is_empty() {
                // Started again after a stop (`warm: stopped`, autotermination): it
                // warmed up before, and may belong to a cluster by now, whose
                // startup owns its step tag. Tagging itself warm again would undo that.
                let mut done = true;
                for s in &warm {
                    done &= steps.done(&s.step, &s.key).await;
                }
                if done {
                    eprintln!(
                        "motorpool agent: warm-up already done before this start; not repeated"
                    );
                } else {
                    n.warm_up(&steps, warm).await;
                }
            }
            if let Some(spec) = warm_spec {
                n.warm_up_from_spec(&steps, &dir, &spec).await;
                n.serve_as_pool_instance(&steps, &runtime, &dir).await;
            }
            if let Some(boot) = cluster {
                n.start_in_cluster(&steps, &runtime, &dir, &boot).await;
            }
        });
    }
    let runtime = svc.runtime();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = Server::builder();
    if let Some(tls) = tls_config {
        builder = builder
            .tls_config(tls)
            .context("the agent's TLS settings are not valid")?;
    }
    let router = match config {
        // Every call must carry the credential of the project's agents.
        Some(c) => builder.add_service(proto::agent_server::AgentServer::with_interceptor(
            svc,
            crate::auth::require(crate::auth::Credential::new(c.credential)),
        )),
        None => builder.add_service(proto::agent_server::AgentServer::new(svc)),
    };
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    let result = tokio::select! {
        served = &mut server => Some(served),
        () = shutdown => None,
    };
    let served = match result {
        Some(served) => served,
        None => {
            eprintln!("motorpool agent {}: stopping", opts.instance_id);
            let _ = stop_tx.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    runtime.stop().await;
    // The address is no longer served: say so (only if the file is still ours).
    if AgentFile::read(&dir).is_ok_and(|f| f == agent_file) {
        let _ = std::fs::remove_file(dir.join(AGENT_FILE));
    }
    served
        .context("the agent's server task failed")?
        .context("the agent's gRPC server failed")?;
    Ok(())
}

/// `credential`, trusting `trust` where known.
fn with_trust(
    credential: crate::auth::Credential,
    trust: Option<&crate::tls::Trust>,
) -> crate::auth::Credential {
    match trust {
        Some(t) => credential.with_trust(t.clone()),
        None => credential,
    }
}

/// Completes on the first SIGTERM or SIGINT. SIGHUP is swallowed meanwhile.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => continue,
            }
        }
    })
}

/// Writes the private file `path` (0600) by writing a temporary sibling and
/// renaming it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    private_files::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Connects to the agent at `address` (`127.0.0.1:PORT`), waiting at most `timeout`.
///
/// Every call made on the returned client also times out after `timeout`.
pub async fn connect(address: &str, timeout: Duration) -> anyhow::Result<AgentClient<Channel>> {
    let endpoint = crate::tls::endpoint(address, None)
        .with_context(|| format!("cannot connect to the agent at {address}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to the agent at {address}"))?
        .with_context(|| format!("cannot connect to the agent at {address}"))?;
    Ok(AgentClient::new(channel))
}

/// Asks the agent at `address` who it is.
pub async fn identity(address: &str, timeout: Duration) -> anyhow::Result<IdentityResponse> {
    let mut client = connect(address, timeout).await?;
    let reply = tokio::time::timeout(timeout, client.identity(proto::IdentityRequest {}))
        .await
        .map_err(|_| anyhow::anyhow!("the agent at {address} did not answer within {timeout:?}"))?
        .with_context(|| format!("the agent at {address} refused Identity"))?;
    Ok(reply.into_inner())
}

/// Asks the agent at `address` whether it is healthy.
pub async fn health(address: &str, timeout: Duration) -> anyhow::Result<HealthResponse> {
    let mut client = connect(address, timeout).await?;
    let reply = tokio::time::timeout(timeout, client.health(proto::HealthRequest {}))
        .await
        .map_err(|_| anyhow::anyhow!("the agent at {address} did not answer within {timeout:?}"))?
        .with_context(|| format!("the agent at {address} refused Health"))?;
    Ok(reply.into_inner())
}
