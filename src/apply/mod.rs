//! Applying a plan: a walk of the plan's dependency DAG that runs each
//! change's ops in order, with at most `parallelism` provider operations in
//! flight, a journal line before and after each one, and progress as it goes.
//!
//! One failed change does not stop the others: changes that depend on it are
//! skipped, independent ones carry on, and the report lists every failure.
//! This module runs exactly the ops a plan holds; it decides nothing (the
//! planner did) and holds no lock (the caller takes the project lock before
//! observing, so that the plan and its apply see the same world).

pub mod journal;
pub mod lock;
pub mod progress;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, NodeStartup, ProviderError, Retag, TagFilter, Tags,
    tags,
};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::bootstrap::run::BootContext;
use crate::bootstrap::saga::StartupError;
use crate::bootstrap::{BootSpec, Step};
use crate::observe::ResourceKind;
use crate::plan::{APPLY_TIME, Action, Change, Op, Plan};
use crate::providers::{CallStats, ProviderClient};
use journal::{Event, Journal};
use progress::Progress;
pub use progress::ProgressMode;

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Most provider operations in flight at once.
    pub parallelism: usize,
    pub progress: ProgressMode,
    /// How long launched or started instances may take to report running.
    pub ready_timeout: Duration,
    /// Most instances in one launch call; bigger launches are split (and run in parallel).
    pub max_batch: u32,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            parallelism: 16,
            progress: ProgressMode::Lines,
            ready_timeout: Duration::from_secs(600),
            max_batch: 100,
        }
    }
}

/// Why one change of a plan did not finish (its text is what the report
/// and the journal keep).
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("cannot write the apply journal: {0}")]
    Journal(#[source] std::io::Error),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// One of the change's operations failed.
    #[error("{op}: {source}")]
    Op {
        op: String,
        #[source]
        source: Box<ChangeError>,
    },
    #[error("startup: {0}")]
    Startup(#[from] StartupError),
    /// What a node is told at launch could not be made.
    #[error("{0}")]
    NodeConfig(String),
    /// Instances did not reach the state the change waits for.
    #[error("{0}")]
    Wait(String),
    /// Apply is shutting down (its permits are gone).
    #[error("apply stopped: {0}")]
    Stopped(#[from] tokio::sync::AcquireError),
}

/// How one change ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Failed { error: String },
    Skipped { because: String },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::Failed { error } => write!(f, "failed: {error}"),
            Outcome::Skipped { because } => write!(f, "skipped: {because}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeResult {
    pub address: String,
    pub action: Action,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub seconds: f64,
}

/// What apply did.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub results: Vec<ChangeResult>,
    pub stats: CallStats,
    pub seconds: f64,
}

impl ApplyReport {
    pub fn failures(&self) -> impl Iterator<Item = &ChangeResult> {
        self.results.iter().filter(|r| r.outcome != Outcome::Done)
    }

    pub fn succeeded(&self) -> bool {
        self.failures().next().is_none()
    }

    /// Every failure as `address: outcome`, joined by `; `.
    pub fn failure_text(&self) -> String {
        self.failures()
            .map(|f| format!("{}: {}", f.address, f.outcome))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `Apply complete: 1 created, ...` or `Apply failed: ...`.
    pub fn summary_line(&self) -> String {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for r in self.results.iter().filter(|r| r.outcome == Outcome::Done) {
            *counts.entry(r.action.as_str()).or_default() += 1;
        }
        let n = |a: &str| counts.get(a).copied().unwrap_or(0);
        let failed = self.failures().count();
        let head = if failed == 0 {
            "Apply complete".to_string()
        } else {
            format!(
                "Apply failed ({failed} of {} changes did not finish)",
                self.results.len()
            )
        };
        format!(
            "{head}: {} created, {} updated, {} replaced, {} deleted in {:.1}s ({} provider calls, {} retried).",
            n("create"),
            n("update"),
            n("replace"),
            n("delete"),
            self.seconds,
            self.stats.calls,
            self.stats.retries
        )
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Shared by the tasks that run changes.
struct Runner {
    client: Arc<ProviderClient>,
    permits: Arc<Semaphore>,
    journal: Mutex<Journal>,
    progress: Progress,
    options: ApplyOptions,
    project: String,
    /// Cluster startup; None where nodes start themselves or are simulated.
    boot: Option<Arc<BootContext>>,
}

/// Run a plan. The caller holds the project lock. The journal's lines are
/// authenticated with `journal_key` ([`journal::key`]).
pub async fn apply(
    plan: &Plan,
    client: Arc<ProviderClient>,
    project_dir: &Path,
    journal_key: &crate::auth::MacKey,
    options: &ApplyOptions,
    boot: Option<Arc<BootContext>>,
) -> Result<ApplyReport, std::io::Error> {
    let started = Instant::now();
    let stats_before = client.stats();
    let changes: Vec<Arc<Change>> = plan.actionable().cloned().map(Arc::new).collect();
    let total_ops: usize = changes.iter().map(|c| c.ops.len()).sum();
    let journal = Journal::begin(
        project_dir,
        journal_key,
        &plan.observed_fingerprint,
        total_ops,
        unix_now(),
    )?;
    let runner = Arc::new(Runner {
        client,
        permits: Arc::new(Semaphore::new(options.parallelism.max(1))),
        journal: Mutex::new(journal),
        progress: Progress::new(options.progress, total_ops),
        options: options.clone(),
        project: plan.project.clone(),
        boot,
    });

    let mut dag = Dag::new(&changes);
    let mut outcomes: Vec<Option<(Outcome, f64)>> = vec![None; changes.len()];
    let mut task_change: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut tasks: JoinSet<(usize, Result<(), ChangeError>, f64)> = JoinSet::new();

    loop {
        // Start what is ready (each change once, when its last dependency finished).
        while let Some(i) = dag.ready.pop_front() {
            let runner = runner.clone();
            let change = Arc::clone(&changes[i]);
            let handle = tasks.spawn(async move {
                let t = Instant::now();
                let result = runner.run_change(&change).await;
                (i, result, t.elapsed().as_secs_f64())
            });
            task_change.insert(handle.id(), i);
        }
        let Some(joined) = tasks.join_next_with_id().await else {
            break;
        };
        let (i, outcome, secs) = match joined {
            Ok((id, (i, result, secs))) => {
                task_change.remove(&id);
                let outcome = match result {
                    Ok(()) => {
                        runner.progress.line(&format!(
                            "{}: {} complete ({secs:.1}s)",
                            changes[i].address,
                            changes[i].action.as_str()
                        ));
                        Outcome::Done
                    }
                    Err(error) => {
                        let error = error.to_string();
                        runner
                            .progress
                            .line(&format!("{}: failed: {error}", changes[i].address));
                        Outcome::Failed { error }
                    }
                };
                (i, outcome, secs)
            }
            Err(join_error) => {
                // A task panicked: that is a bug, but the others still finish.
                let Some(i) = task_change.remove(&join_error.id()) else {
                    continue;
                };
                let error = format!("internal error: {join_error}");
                (i, Outcome::Failed { error }, 0.0)
            }
        };
        let done = outcome == Outcome::Done;
        outcomes[i] = Some((outcome, secs));
        if done {
            dag.finished(i);
        } else {
            // Skip what depends on it, and what depends on those.
            for (skipped, cause) in dag.abandon(i) {
                let because = format!(
                    "depends on {}, which did not finish",
                    changes[cause].address
                );
                runner
                    .progress
                    .line(&format!("{}: skipped: {because}", changes[skipped].address));
                outcomes[skipped] = Some((Outcome::Skipped { because }, 0.0));
            }
        }
    }
    runner.progress.finish();

    let results: Vec<ChangeResult> = changes
        .iter()
        .zip(outcomes)
        .map(|(c, o)| {
            let (outcome, seconds) = o.unwrap_or((
                Outcome::Skipped {
                    because: "never became ready (dependency cycle)".into(),
                },
                0.0,
            ));
            ChangeResult {
                address: c.address.clone(),
                action: c.action,
                outcome,
                seconds,
            }
        })
        .collect();
    let failed = results
        .iter()
        .filter(|r| r.outcome != Outcome::Done)
        .count();
    runner.journal.lock().await.write(&Event::End { failed })?;
    let after = runner.client.stats();
    Ok(ApplyReport {
        results,
        stats: CallStats {
            calls: after.calls - stats_before.calls,
            list_calls: after.list_calls - stats_before.list_calls,
            retries: after.retries - stats_before.retries,
        },
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The order changes may run in: each starts once every change it depends
/// on finished; a change that did not finish takes its dependents with it.
/// Every step costs what the changes it touches cost, never a scan of all.
struct Dag {
    /// Changes whose dependencies all finished, not yet started.
    ready: VecDeque<usize>,
    /// Per change: how many of its dependencies have not finished yet.
    waiting_on: Vec<usize>,
    /// Per change: the changes that depend on it.
    dependents: Vec<Vec<usize>>,
    /// Changes that can no longer start (skipped).
    abandoned: Vec<bool>,
}

impl Dag {
    fn new(changes: &[Arc<Change>]) -> Dag {
        let index: HashMap<&str, usize> = changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.address.as_str(), i))
            .collect();
        let mut waiting_on = vec![0; changes.len()];
        let mut dependents = vec![Vec::new(); changes.len()];
        for (i, c) in changes.iter().enumerate() {
            let deps: HashSet<usize> = c
                .depends_on
                .iter()
                .filter_map(|a| index.get(a.as_str()).copied())
                .collect();
            waiting_on[i] = deps.len();
            for d in deps {
                dependents[d].push(i);
            }
        }
        let ready = (0..changes.len()).filter(|&i| waiting_on[i] == 0).collect();
        Dag {
            ready,
            waiting_on,
            dependents,
            abandoned: vec![false; changes.len()],
        }
    }

    /// Change `i` finished: its dependents waiting on nothing else are ready.
    fn finished(&mut self, i: usize) {
        for &j in &self.dependents[i] {
            self.waiting_on[j] = self.waiting_on[j].saturating_sub(1);
            if self.waiting_on[j] == 0 && !self.abandoned[j] {
                self.ready.push_back(j);
            }
        }
    }

    /// Change `i` did not finish: every change that depends on it, directly
    /// or not, as (skipped change, the dependency that did not finish).
    fn abandon(&mut self, i: usize) -> Vec<(usize, usize)> {
        let mut skipped = Vec::new();
        let mut stack = vec![i];
        while let Some(cause) = stack.pop() {
            for &j in &self.dependents[cause] {
                if !self.abandoned[j] {
                    self.abandoned[j] = true;
                    skipped.push((j, cause));
                    stack.push(j);
                }
            }
        }
        skipped
    }
}

/// Tag values stamped at apply time.
fn stamp(tags: &Tags, now: u64) -> Tags {
    tags.iter()
        .map(|(k, v)| {
            let v = if v == APPLY_TIME {
                now.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

impl Runner {
    /// Nodes of a simulated provider run nothing: a running node is started.
    fn nodes_are_simulated(&self) -> bool {
        self.client.capabilities().node_startup == NodeStartup::Simulated
    }

    async fn journal(&self, event: Event) -> Result<(), ChangeError> {
        self.journal
            .lock()
            .await
            .write(&event)
            .map_err(ChangeError::Journal)
    }

    /// Run one change's ops in order (consecutive launches together: they
    /// touch different instances), then wait until what it launched or
    /// started reports running.
    async fn run_change(&self, change: &Change) -> Result<(), ChangeError> {
        let started = Instant::now();
        self.publish_cluster_boot(change).await?;
        let mut must_run: Vec<String> = Vec::new();
        let mut index = 0;
        while index < change.ops.len() {
            if let Op::Bootstrap { spec } = &change.ops[index] {
                // Startup needs every node allocated and running first.
                if !must_run.is_empty() {
                    self.wait_running(change, &must_run).await?;
                    must_run.clear();
                }
                self.journal(start(&change.address, index)).await?;
                let t = Instant::now();
                let spec = self.reveal(spec)?;
                self.bootstrap(change, &spec, started.elapsed()).await?;
                self.journal(Event::OpDone {
                    address: change.address.clone(),
                    op: index,
                })
                .await?;
                self.progress
                    .op_done(&change.address, &change.ops[index].describe(), t.elapsed());
                index += 1;
                continue;
            }
            let is_launch = |op: &Op| matches!(op, Op::Launch { .. });
            let mut end = index + 1;
            if is_launch(&change.ops[index]) {
                while end < change.ops.len() && is_launch(&change.ops[end]) {
                    end += 1;
                }
            }
            let group = (index..end).map(|i| async move {
                let t = Instant::now();
                (i, self.run_op(change, i, &change.ops[i]).await, t.elapsed())
            });
            for (i, result, took) in futures_util::future::join_all(group).await {
                let op = &change.ops[i];
                match result {
                    Ok(ids) => {
                        must_run.extend(ids);
                        self.progress.op_done(&change.address, &op.describe(), took);
                    }
                    Err(e) => {
                        let error = ChangeError::Op {
                            op: op.describe(),
                            source: Box::new(e),
                        };
                        self.journal(Event::OpFailed {
                            address: change.address.clone(),
                            op: i,
                            error: error.to_string(),
                        })
                        .await?;
                        return Err(error);
                    }
                }
            }
            index = end;
        }
        if !must_run.is_empty() {
            self.wait_running(change, &must_run).await?;
        }
        Ok(())
    }

    /// Run one op; returns the instances that must reach running before the change is done.
    async fn run_op(
        &self,
        change: &Change,
        index: usize,
        op: &Op,
    ) -> Result<Vec<String>, ChangeError> {
        let mut must_run = Vec::new();
        let now = unix_now();
        let address = change.address.clone();
        match op {
            Op::Launch {
                count,
                node_type,
                image,
                tags,
                token,
                then_stop,
                warm,
                ..
            } => {
                let user_data = self.user_data(change, warm.as_ref())?;
                let mut tags = tags.clone();
                if warm.is_some() && self.nodes_are_simulated() {
                    // A simulated node has nothing to run: it is warm once it has booted.
                    tags.insert(
                        motorpool_provider::tags::STEP.into(),
                        Step::Runtime.name().into(),
                    );
                }
                let tags = &tags;
                let batches = count.div_ceil(self.options.max_batch.max(1));
                let mut requests = Vec::new();
                let mut left = *count;
                for b in 0..batches {
                    let n = left.min(self.options.max_batch.max(1));
                    left -= n;
                    requests.push(LaunchRequest {
                        count: n,
                        node_type: node_type.clone(),
                        image: image.clone(),
                        tags: stamp(tags, now),
                        user_data: user_data.clone(),
                        client_token: if batches == 1 {
                            token.clone()
                        } else {
                            format!("{token}-{b}")
                        },
                    });
                }
                // One journal line per op, holding every batch's request for replay.
                for r in &requests {
                    self.journal(Event::OpStart {
                        address: address.clone(),
                        op: index,
                        launch: Some(r.clone()),
                    })
                    .await?;
                }
                let mut launches = JoinSet::new();
                for r in requests {
                    let client = self.client.clone();
                    let permits = self.permits.clone();
                    launches.spawn(async move {
                        let _permit = permits
                            .acquire_owned()
                            .await
                            .map_err(|e| ProviderError::Internal(e.to_string()))?;
                        client.launch(&r).await
                    });
                }
                let mut launched: Vec<Instance> = Vec::new();
                let mut first_error: Option<ProviderError> = None;
                while let Some(j) = launches.join_next().await {
                    match j {
                        Ok(Ok(instances)) => launched.extend(instances),
                        Ok(Err(e)) => {
                            first_error.get_or_insert(e);
                        }
                        Err(e) => {
                            first_error.get_or_insert(ProviderError::Internal(e.to_string()));
                        }
                    }
                }
                if let Some(e) = first_error {
                    return Err(e.into());
                }
                let ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
                if *then_stop {
                    // Stopped only once warm: stopping earlier would cut the warm-up short.
                    self.wait_tag(change, &ids, Step::Runtime).await?;
                    self.call(|| self.client.stop(&ids)).await?;
                } else if warm.is_none() {
                    // Pool instances warm up in the background: a cluster drawn from the
                    // pool is ready without waiting for the refill, and so is apply.
                    must_run.extend(
                        launched
                            .iter()
                            .filter(|i| i.state != InstanceState::Running)
                            .map(|i| i.id.clone()),
                    );
                }
            }
            Op::Retag { ids, set, remove } => {
                self.journal(start(&address, index)).await?;
                let change = Retag {
                    set: stamp(set, now),
                    remove: remove.clone(),
                };
                self.call(|| self.client.retag(ids, &change)).await?;
            }
            Op::Start { ids } => {
                self.journal(start(&address, index)).await?;
                self.call(|| self.client.start(ids)).await?;
                must_run.extend(ids.iter().cloned());
            }
            Op::Stop { ids } => {
                self.journal(start(&address, index)).await?;
                self.call(|| self.client.stop(ids)).await?;
            }
            Op::Terminate { ids } => {
                self.journal(start(&address, index)).await?;
                self.call(|| self.client.terminate(ids)).await?;
            }
            Op::Bootstrap { .. } => unreachable!("run_change runs startup itself"),
        }
        self.journal(Event::OpDone { address, op: index }).await?;
        Ok(must_run)
    }

    /// What a launched node is told: the agent's config on the local provider
    /// (its credential, its TLS certificate, and a pool instance's warm-up
    /// steps); on a cloud, the cloud-init script that installs and starts the
    /// agent with a config that holds what the node must start by itself;
    /// nothing on the simulator.
    fn user_data(&self, change: &Change, warm: Option<&BootSpec>) -> Result<String, ChangeError> {
        let Some(boot) = &self.boot else {
            return Ok(String::new());
        };
        let warm = warm.map(|spec| self.reveal(spec)).transpose()?;
        let warm = warm.as_ref();
        if let Some(cloud) = &boot.cloud {
            return self.cloud_user_data(boot, cloud, change, warm);
        }
        match self.client.capabilities().node_startup {
            NodeStartup::SelfStarting => {
                return Err(ChangeError::NodeConfig(format!(
                    "the {} provider needs `runtime_url` and `runtime_sha256` in the spec's \
                     provider block: its nodes install the motorpool runtime from there",
                    self.client.kind()
                )));
            }
            NodeStartup::Simulated => return Ok(String::new()),
            NodeStartup::EngineDriven => {}
        }
        let warm = match warm {
            Some(spec) => crate::bootstrap::steps::warm_up(&boot.templates, &boot.steps, spec)
                .map_err(|e| {
                    ChangeError::NodeConfig(format!("cannot render the warm-up steps: {e}"))
                })?
                .iter()
                .map(crate::agent::node::WarmStep::from)
                .collect(),
            None => Vec::new(),
        };
        let config = crate::agent::AgentConfig {
            credential: boot.agent_credential.expose().to_string(),
            project: self.project.clone(),
            warm,
            provider: Some(boot.node_provider.clone()),
            tls: boot.node_tls.clone(),
            ..crate::agent::AgentConfig::default()
        };
        serde_json::to_string(&config).map_err(|e| ChangeError::NodeConfig(e.to_string()))
    }

    /// `spec` with its secret env values read and checked (what the nodes
    /// get; never journaled, never in a plan). Simulated nodes get nothing.
    fn reveal(&self, spec: &BootSpec) -> Result<BootSpec, ChangeError> {
        match &self.boot {
            Some(boot) if !spec.secret_env.is_empty() => {
                let key = crate::secrets::SecretKey::derive(&boot.project_secret, &self.project);
                crate::secrets::reveal(spec, &key)
                    .map_err(|e| ChangeError::NodeConfig(e.to_string()))
            }
            _ => Ok(spec.clone()),
        }
    }

    /// The startup a cloud cluster's nodes run on themselves, when the change starts some.
    fn cluster_boot(
        &self,
        boot: &BootContext,
        change: &Change,
    ) -> Result<Option<crate::agent::node::ClusterBoot>, ChangeError> {
        if change.kind != ResourceKind::Cluster {
            return Ok(None);
        }
        let Some(spec) = change.ops.iter().find_map(|op| match op {
            Op::Bootstrap { spec } => Some(spec),
            _ => None,
        }) else {
            return Ok(None);
        };
        let spec = self.reveal(spec)?;
        Ok(Some(crate::agent::node::ClusterBoot {
            cluster: change.name.clone(),
            credential: crate::auth::cluster_credential(
                &boot.project_secret,
                &self.project,
                &change.name,
            )
            .expose()
            .to_string(),
            spec,
            ready_timeout_seconds: boot.ready_timeout.as_secs(),
        }))
    }

    /// Clouds: publish the cluster's startup where pool instances drawn into
    /// it read it (they were launched before the cluster existed), before
    /// they are drawn; forget it when the cluster goes.
    async fn publish_cluster_boot(&self, change: &Change) -> Result<(), ChangeError> {
        let Some(boot) = &self.boot else {
            return Ok(());
        };
        if boot.cloud.is_none() || change.kind != ResourceKind::Cluster {
            return Ok(());
        }
        let name = crate::agent::node::cluster_boot_name(&self.project, &change.name);
        if change.action == Action::Delete {
            return self
                .call(|| self.client.delete_cluster_boot(&name))
                .await
                .map_err(|e| {
                    ChangeError::NodeConfig(format!(
                        "cannot delete the cluster's boot document: {e}"
                    ))
                });
        }
        let Some(cluster) = self.cluster_boot(boot, change)? else {
            return Ok(());
        };
        let document =
            serde_json::to_string(&cluster).map_err(|e| ChangeError::NodeConfig(e.to_string()))?;
        if let Some(limit) = self.client.capabilities().user_data_limit
            && document.len() > limit
        {
            return Err(ChangeError::NodeConfig(format!(
                "the cluster's startup is {} bytes, over the {} provider's limit of {limit} \
                 bytes for what a node reads at boot; make its init scripts, requirements or \
                 env smaller",
                document.len(),
                self.client.kind(),
            )));
        }
        self.call(|| self.client.put_cluster_boot(&name, &document))
            .await
            .map_err(|e| {
                ChangeError::NodeConfig(format!("cannot publish the cluster's boot document: {e}"))
            })
    }

    /// A cloud node's user data: a pool instance warms itself up; a cluster
    /// node launched directly runs the cluster's startup on itself.
    fn cloud_user_data(
        &self,
        boot: &BootContext,
        cloud: &crate::bootstrap::cloud::CloudNodes,
        change: &Change,
        warm: Option<&BootSpec>,
    ) -> Result<String, ChangeError> {
        let cluster = self.cluster_boot(boot, change)?;
        let config = crate::agent::AgentConfig {
            credential: boot.agent_credential.expose().to_string(),
            project: self.project.clone(),
            provider: Some(cloud.provider.clone()),
            warm_spec: warm.cloned(),
            cluster,
            // Cloud nodes listen on their private address: TLS, always.
            tls: boot.node_tls.clone(),
            ..crate::agent::AgentConfig::default()
        };
        let config =
            serde_json::to_string(&config).map_err(|e| ChangeError::NodeConfig(e.to_string()))?;
        crate::bootstrap::cloud::user_data(&boot.templates, cloud, &config)
            .map_err(|e| ChangeError::NodeConfig(format!("{}: {e}", change.address)))
    }

    /// Steps 3-7 on the cluster's nodes.
    async fn bootstrap(
        &self,
        change: &Change,
        spec: &BootSpec,
        allocate: Duration,
    ) -> Result<(), ChangeError> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::KIND.into(), "cluster".into());
        filter.insert(tags::NAME.into(), change.name.clone());
        let nodes: Vec<Instance> = {
            let _permit = self.permits.acquire().await?;
            self.client.list_all(&filter).await?
        };
        let nodes: Vec<Instance> = nodes.into_iter().filter(|i| i.state.is_live()).collect();
        match &self.boot {
            Some(boot) if !self.nodes_are_simulated() => {
                let report = crate::bootstrap::run::start_cluster(
                    boot,
                    &self.client,
                    &change.name,
                    spec,
                    &nodes,
                    allocate,
                    &|line| self.progress.line(&line),
                )
                .await?;
                self.progress.line(&format!(
                    "{}: ready, {} ({:.2}s of startup steps)",
                    change.address,
                    crate::plan::plural(spec.workers, "executor"),
                    report.total().as_secs_f64()
                ));
                Ok(())
            }
            // Simulated nodes run nothing: they are ready once allocated and running.
            _ => {
                let ids: Vec<String> = nodes.iter().map(|i| i.id.clone()).collect();
                let mut set = Tags::new();
                set.insert(tags::STEP.into(), Step::Ready.name().into());
                set.insert(tags::BOOT.into(), spec.hash());
                let change = Retag {
                    set,
                    remove: vec![],
                };
                self.call(|| self.client.retag(&ids, &change)).await
            }
        }
    }

    /// Poll until every instance in `ids` has tagged itself at `step` or later.
    async fn wait_tag(
        &self,
        change: &Change,
        ids: &[String],
        step: Step,
    ) -> Result<(), ChangeError> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::NAME.into(), change.name.clone());
        let deadline = Instant::now() + self.options.ready_timeout;
        let mut delay = Duration::from_millis(100);
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        loop {
            let listed = self.client.list_all(&filter).await?;
            let reached = |i: &Instance| {
                i.tag(tags::STEP)
                    .and_then(Step::parse)
                    .is_some_and(|s| s >= step)
            };
            let done = listed
                .iter()
                .filter(|i| wanted.contains(i.id.as_str()) && reached(i))
                .count();
            let waiting = wanted.len().saturating_sub(done);
            if waiting == 0 {
                return Ok(());
            }
            if let Some(failed) = listed.iter().find(|i| {
                wanted.contains(i.id.as_str())
                    && i.tag(tags::STEP).is_some_and(|s| s.starts_with("failed:"))
            }) {
                return Err(ChangeError::Wait(format!(
                    "warm-up of {} failed; see its agent.log",
                    failed.id
                )));
            }
            if Instant::now() >= deadline {
                return Err(ChangeError::Wait(format!(
                    "{waiting} instances did not warm up in time"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// One provider call under the parallelism limit.
    async fn call<F, Fut>(&self, f: F) -> Result<(), ChangeError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), ProviderError>>,
    {
        let _permit = self.permits.acquire().await?;
        Ok(f().await?)
    }

    /// Poll the change's instances until every one in `ids` reports running.
    async fn wait_running(&self, change: &Change, ids: &[String]) -> Result<(), ChangeError> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        if change.kind != ResourceKind::Instance {
            filter.insert(tags::KIND.into(), change.kind.as_str().into());
            filter.insert(tags::NAME.into(), change.name.clone());
        }
        let deadline = Instant::now() + self.options.ready_timeout;
        let mut delay = Duration::from_millis(100);
        // A cloud may leave a just-launched instance out of its listing for a
        // few seconds (EC2 is eventually consistent): only after this many
        // listings in a row without it is it gone.
        let mut missing_rounds: BTreeMap<&str, u32> = BTreeMap::new();
        loop {
            let listed = {
                let _permit = self.permits.acquire().await?;
                self.client.list_all(&filter).await?
            };
            let state: BTreeMap<&str, InstanceState> =
                listed.iter().map(|i| (i.id.as_str(), i.state)).collect();
            let waiting: Vec<&String> = ids
                .iter()
                .filter(|id| state.get(id.as_str()) != Some(&InstanceState::Running))
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            for id in &waiting {
                let rounds = missing_rounds.entry(id.as_str()).or_default();
                *rounds = if state.contains_key(id.as_str()) {
                    0
                } else {
                    *rounds + 1
                };
            }
            if let Some(dead) = waiting.iter().find(|id| {
                state.get(id.as_str()) == Some(&InstanceState::Terminated)
                    || missing_rounds
                        .get(id.as_str())
                        .is_some_and(|n| *n > MISSING_LISTINGS_BEFORE_GONE)
            }) {
                return Err(ChangeError::Wait(format!(
                    "instance {dead} went away while starting"
                )));
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = waiting.iter().map(|s| s.as_str()).collect();
                return Err(ChangeError::Wait(format!(
                    "{} not running after {}s: {}",
                    crate::plan::plural(waiting.len() as u32, "instance"),
                    self.options.ready_timeout.as_secs(),
                    names.join(", ")
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// Listings in a row that may leave out an instance being waited for before
/// it counts as gone (with the backoff below, about 10 seconds).
const MISSING_LISTINGS_BEFORE_GONE: u32 = 8;

fn start(address: &str, op: usize) -> Event {
    Event::OpStart {
        address: address.to_string(),
        op,
        launch: None,
    }
}

#[cfg(test)]
mod tests;
