//! The engine seam: what a cluster runs.
//!
//! An engine decides what the driver and worker roles start at formation
//! ([`EnginePlugin::start_role`], inside the node's agent), when the cluster
//! is ready and when it is idle (the driver role's [`RunningRole::workers`]
//! and [`RunningRole::running_jobs`]), and how a job is submitted, followed, listed and
//! cancelled from the machine running the CLI. The bundled driver/executor
//! runtime ([`bundled`]) is the first implementation; engines are registered
//! in [`crate::registry::Registry`] like providers (which knows this module,
//! not the other way round), and a cluster picks one with `engine:` in the
//! spec.
//!
//! This module owns the trait and the engine-neutral types that cross it. It
//! must not know how startup steps run (bootstrap, the agent) nor how a job
//! cluster is made (jobs): it is handed an address and a credential.

pub mod bundled;
pub mod spark;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::auth::Credential;
use crate::runtime::client::JobSubmission;
use crate::runtime::{Progress, RunSummary};

pub use bundled::BundledRuntime;
pub use spark::Spark;

/// The engine a cluster gets when the spec names none.
pub use crate::spec::DEFAULT_ENGINE;

/// Why an engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the {role} did not start: {reason}")]
    Start { role: &'static str, reason: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("this motorpool knows no engine `{0}`")]
    Unknown(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What an engine cannot run (a version, a kind of task), and why: the
/// message `validate` shows next to the spec's position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// Which part of the cluster a node plays at formation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleStart {
    /// The cluster's coordinator: takes jobs, knows its workers.
    Driver,
    /// A worker, joining the driver at this address.
    Worker { driver_address: String },
}

impl RoleStart {
    pub fn name(&self) -> &'static str {
        match self {
            RoleStart::Driver => "driver",
            RoleStart::Worker { .. } => "worker",
        }
    }
}

/// Where and how a role runs on its node (given by the agent).
#[derive(Debug, Clone)]
pub struct RoleContext {
    /// The cluster's name.
    pub cluster: String,
    /// The cluster's credential: every call to the role must carry it.
    pub credential: Credential,
    /// A directory of the role's own on the node.
    pub dir: PathBuf,
    /// Where to listen: the agent's IP, port 0.
    pub listen: SocketAddr,
    /// The node's certificate, beyond loopback.
    pub tls: Option<crate::tls::ServerTls>,
    /// Cores a worker offers (0: all of the machine's).
    pub cores: u32,
    /// The engine's version (empty: its default) and settings (`spark_conf`).
    pub version: String,
    pub conf: std::collections::BTreeMap<String, String>,
    /// The worker node type's cores and memory (0: not told).
    pub node_cores: u32,
    pub node_memory_mb: u32,
    /// The length of a minute (tests shorten it).
    pub minute: Duration,
}

/// What a driver says of its cluster's work, for the controller's autoscaling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterLoad {
    /// Tasks ready to run that no worker has room for.
    pub queued_tasks: u32,
    /// Tasks running (or queued on a worker) now.
    pub running_tasks: u32,
    /// Task slots of the registered workers (their cores).
    pub slots: u32,
}

/// A role running on a node, until it is shut down.
#[async_trait]
pub trait RunningRole: Send + Sync {
    /// Where it listens (the driver: where workers and clients reach it).
    fn address(&self) -> String;

    /// The workers registered with the driver: the cluster is ready once
    /// every worker the spec asks for is here. An error on a worker.
    async fn workers(&self) -> Result<Vec<String>, EngineError>;

    /// Jobs running on the driver now: the cluster is idle
    /// (autotermination) while none is. An error on a worker.
    async fn running_jobs(&self) -> Result<u32, EngineError>;

    /// The cluster's load as the driver sees it, for autoscaling; `None`
    /// when the engine cannot tell (a worker role, or an engine that does
    /// not say).
    async fn load(&self) -> Result<Option<ClusterLoad>, EngineError> {
        Ok(None)
    }

    /// Whether everything the role started still runs (a daemon that died
    /// is drift on its node); Err says what is gone.
    async fn health(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// What the role says of itself beyond its address (Spark: the master's
    /// URL): shown by `status`.
    async fn describe(&self) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::new()
    }

    /// Stop it and everything it started (a second call does nothing).
    async fn shutdown(&self);
}

/// What a worker role answers when asked for what only the driver knows
/// (its workers, its running jobs).
pub(crate) fn ask_the_driver(role: &str) -> EngineError {
    EngineError::Unreachable(format!("{role} knows no cluster status: ask the driver"))
}

/// How the CLI reaches a cluster's driver.
#[derive(Debug, Clone)]
pub struct DriverAccess {
    pub address: String,
    /// The cluster's credential (with the project CA, beyond loopback).
    pub credential: Credential,
}

/// One run as the driver lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunBrief {
    pub run_id: String,
    pub job: String,
    /// `staging`, `running`, `succeeded`, `failed`, `cancelled`.
    pub state: String,
}

impl RunBrief {
    /// Still going: counts toward `max_concurrent_runs`.
    pub fn is_active(&self) -> bool {
        self.state == "staging" || self.state == "running"
    }
}

/// One task log file of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogFile {
    pub task: String,
    pub name: String,
    pub text: String,
    pub truncated: bool,
}

/// How an engine installs itself on a node in the runtime step: a template
/// compiled into `bootstrap::template`, rendered with `cache_dir`, `python`,
/// `version` and `package`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSetup {
    pub template: &'static str,
    /// The version installed (the spec's, or the engine's default).
    pub version: String,
    /// What is installed (`pyspark==4.0.1`).
    pub package: String,
}

/// What a cluster runs, as registered in [`crate::registry::Registry`].
#[async_trait]
pub trait EnginePlugin: Send + Sync {
    /// The `engine:` of a cluster in the spec (`motorpool`, ...).
    fn kind(&self) -> &'static str;

    fn description(&self) -> &'static str;

    /// Whether `version` (from `engine: { kind, version }`) is one this
    /// engine can run; Err says what a version looks like.
    fn check_version(&self, version: &str) -> Result<(), Unsupported> {
        let _ = version;
        Ok(())
    }

    /// What the runtime step installs on a node for this engine at
    /// `version` (empty: the default); None: nothing beyond the runtime.
    fn setup(&self, version: &str) -> Option<EngineSetup> {
        let _ = version;
        None
    }

    /// Whether a job's task is of a form this engine runs; Err says why not.
    fn check_task(&self, task: &crate::spec::Task) -> Result<(), Unsupported> {
        let _ = task;
        Ok(())
    }

    /// Start this node's role at formation, inside the node's agent.
    async fn start_role(
        &self,
        role: RoleStart,
        context: RoleContext,
    ) -> Result<Arc<dyn RunningRole>, EngineError>;

    /// Submit `submission` to the cluster's driver and follow it to its
    /// end. A job that fails is `Ok` with `ok: false`; `Err` means the run
    /// could not be carried out.
    async fn run_job(
        &self,
        driver: &DriverAccess,
        submission: JobSubmission,
        on_progress: &mut (dyn for<'p> FnMut(&'p Progress) + Send),
    ) -> Result<RunSummary, EngineError>;

    /// The runs the driver knows, newest first (only `job`'s when given).
    async fn runs(
        &self,
        driver: &DriverAccess,
        job: Option<&str>,
    ) -> Result<Vec<RunBrief>, EngineError>;

    /// Stop a run; false when it had already ended.
    async fn cancel_run(&self, driver: &DriverAccess, run_id: &str) -> Result<bool, EngineError>;

    /// The task logs of a run.
    async fn logs(&self, driver: &DriverAccess, run_id: &str) -> Result<Vec<LogFile>, EngineError>;
}
