//! The stages wired together, as the CLI's commands use them: load a spec,
//! connect to its provider, take the project lock, resume an interrupted
//! apply, observe, plan, check a saved plan for staleness, apply, report
//! status.
//!
//! Each function here is one step a command takes; the rules live in the
//! modules they call (`spec`, `observe`, `plan`, `apply`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::agent::node::NodeProvider;
use crate::apply::lock::{CloudLease, ProjectLock};
use crate::apply::{self, ApplyOptions, ApplyReport, journal};
use crate::auth::Credential;
use crate::bootstrap::cloud::CloudNodes;
use crate::bootstrap::run::BootContext;
use crate::bootstrap::steps::StepContext;
use crate::bootstrap::template::Templates;
use crate::home::Home;
use crate::observe::{self, Observed, ResourceKind};
use crate::plan::{self, Plan, PlanInput, PlanMode};
use crate::providers::{self, ProviderClient};
use crate::spec::{self, LoadOptions, LoadedSpec, ProviderBlock, Spec};

/// Where this machine dials a node whose provider knows no address for it
/// (a cloud node): the address its agent published, or, for a driver whose
/// provider gives it a public address (`public_driver`), that address's IP
/// with the published port. The driver runs inside the agent, so the same
/// host serves both.
fn dial_address(instance: &motorpool_provider::Instance, public_driver: bool) -> Option<String> {
    use motorpool_provider::tags;
    let published = instance.tag(tags::AGENT_ADDRESS)?;
    let is_driver = instance.tag(tags::ROLE) == Some(crate::words::Role::Driver.as_str());
    match (
        &instance.ips.public,
        published.parse::<std::net::SocketAddr>(),
    ) {
        (Some(public), Ok(at)) if public_driver && is_driver => public
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, at.port()).to_string()),
        _ => Some(published.to_string()),
    }
}

/// How long a command waits for a project lock another holds ([`Project::lock_waiting`]).
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// Whose project lock a command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// Anyone's (a run's job cluster removal racing a CI apply).
    AnyHolder,
    /// Only the controller's, whose passes are short: another apply is refused at once.
    Controller,
}

/// How long new nodes may take to report ready unless the spec says otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A spec with problems: every one of them, one `file:line:col: error: ...` per line.
#[derive(Debug, thiserror::Error)]
#[error("{diagnostics}\n{} in the spec", plan::plural(diagnostics.0.len() as u32, "error"))]
pub struct InvalidSpec {
    pub diagnostics: spec::Diagnostics,
}

/// Load and validate a spec; every problem is in the error.
pub fn load_spec(path: &Path, options: &LoadOptions) -> Result<LoadedSpec> {
    spec::load(path, options).map_err(|diagnostics| InvalidSpec { diagnostics }.into())
}

/// A project's provider connection, and (for changes) its lock.
pub struct Project {
    pub name: String,
    pub home: Home,
    pub dir: PathBuf,
    pub client: Arc<ProviderClient>,
    /// The spec's provider block (cloud nodes' settings come from it).
    pub provider: ProviderBlock,
    local_lock: Option<ProjectLock>,
    /// The lock held in the provider's cloud, when it keeps one.
    cloud_lock: Option<CloudLease>,
}

impl Project {
    /// Connect for reading (plan, status).
    pub fn open(name: &str, provider: &ProviderBlock) -> Result<Project> {
        let home = Home::from_env()?;
        let dir = home.project_dir(name)?;
        let client = providers::connect(provider, &home)
            .with_context(|| format!("cannot use the {} provider", provider.kind()))?;
        Ok(Project {
            name: name.to_string(),
            home,
            dir,
            client: Arc::new(client),
            provider: provider.clone(),
            local_lock: None,
            cloud_lock: None,
        })
    }

    /// Connect for changing (apply, destroy, run): take the project lock
    /// first, on this machine and then in the cloud when the provider keeps
    /// one there. `command` names the holder's command in refusals.
    pub async fn lock(
        name: &str,
        provider: &ProviderBlock,
        command: &str,
        on_note: &(dyn Fn(&str) + Sync),
    ) -> Result<Project> {
        let mut project = Project::open(name, provider)?;
        project.take_lock(command, on_note).await?;
        Ok(project)
    }

    /// Take the project lock on a project opened for reading (the
    /// controller, between passes that change nothing): on this machine,
    /// then in the cloud. [`Project::unlock`] lets both go.
    pub async fn take_lock(
        &mut self,
        command: &str,
        on_note: &(dyn Fn(&str) + Sync),
    ) -> Result<()> {
        let local = ProjectLock::acquire(&self.dir, &self.name, command)?;
        self.cloud_lock =
            CloudLease::take(self.client.clone(), &self.name, &self.dir, command, on_note).await?;
        self.local_lock = Some(local);
        Ok(())
    }

    /// [`Project::lock`], waiting up to [`LOCK_WAIT`] while the lock is
    /// held by a holder `wait_for` accepts, instead of failing at once.
    pub async fn lock_waiting(
        name: &str,
        provider: &ProviderBlock,
        command: &str,
        on_note: &(dyn Fn(&str) + Sync),
        wait_for: WaitFor,
    ) -> Result<Project> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut told = false;
        loop {
            let error = match Project::lock(name, provider, command, on_note).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            let held = error
                .chain()
                .find_map(|c| c.downcast_ref::<crate::apply::lock::LockError>())
                .filter(|e| match wait_for {
                    WaitFor::AnyHolder => matches!(
                        e,
                        crate::apply::lock::LockError::Held { .. }
                            | crate::apply::lock::LockError::CloudHeld { .. }
                    ),
                    WaitFor::Controller => crate::apply::lock::held_by_controller(e),
                });
            if held.is_none() || std::time::Instant::now() >= deadline {
                return Err(error);
            }
            if !told {
                on_note(&format!("waiting for the project lock: {error:#}"));
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Release the cloud lock (the local one goes with the process). Call it
    /// when the command's work is over, whatever its outcome.
    pub async fn unlock(&mut self) -> Result<()> {
        let released = match self.cloud_lock.take() {
            Some(lease) => lease.release().await,
            None => Ok(()),
        };
        self.local_lock = None;
        Ok(released?)
    }

    pub async fn observe(&self) -> Result<Observed> {
        let mut observed = observe::observe(&self.client, &self.name)
            .await
            .with_context(|| format!("cannot list the instances of project `{}`", self.name))?;
        let public_driver =
            providers::plugin(&self.provider)?.public_driver(&self.provider.settings_value());
        for instance in observed
            .resources
            .values_mut()
            .flatten()
            .chain(observed.orphans.iter_mut())
        {
            if instance.address.is_none() {
                instance.address = dial_address(instance, public_driver);
            }
        }
        Ok(observed)
    }

    /// Why this machine cannot talk to node `id`'s agent, with what to set
    /// when the node's address is one only its cloud's network reaches.
    pub fn unreachable(
        &self,
        id: &str,
        error: crate::bootstrap::run::AgentUnreachable,
    ) -> anyhow::Error {
        let hint = providers::plugin(&self.provider)
            .ok()
            .and_then(|p| p.reach_hint())
            .filter(|_| {
                matches!(
                    error,
                    crate::bootstrap::run::AgentUnreachable::Connect { .. }
                )
            });
        match hint {
            Some(hint) => anyhow::anyhow!("node {id}: {error}\n  hint: {hint}"),
            None => anyhow::anyhow!("node {id}: {error}"),
        }
    }

    /// Build a plan against what the provider reports now.
    pub async fn plan(
        &self,
        loaded: &LoadedSpec,
        mode: PlanMode,
        start: &BTreeSet<String>,
    ) -> Result<Plan> {
        let observed = self.observe().await?;
        plan_against(
            &loaded.spec,
            &loaded.base_dir,
            &observed,
            &self.client,
            mode,
            start,
            &self.secret_key()?,
        )
    }

    /// The keys of the project's secret env values.
    pub fn secret_key(&self) -> Result<crate::secrets::SecretKey> {
        let secret = self.home.project_secret(&self.name)?;
        Ok(crate::secrets::SecretKey::derive(&secret, &self.name))
    }

    /// The credential the project's agents accept.
    pub fn agent_credential(&self) -> Result<Credential> {
        let secret = self.home.project_secret(&self.name)?;
        Ok(crate::auth::derive(
            &secret,
            &format!("agent/{}", self.name),
        ))
    }

    /// What cluster startup needs: credentials, where things are, the templates.
    pub async fn boot_context(&self, launches: bool) -> Result<BootContext> {
        let secret = self.home.project_secret(&self.name)?;
        let node_tls = crate::tls::ProjectCa::derive(&secret)
            .and_then(|ca| ca.node_tls(crate::tls::forced_by_env()?))
            .context("cannot issue the nodes' TLS certificate")?;
        let binary = match std::env::var_os("MOTORPOOL_AGENT_PROGRAM") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().context("cannot find the motorpool binary")?,
        };
        let node_provider = self.node_provider()?;
        Ok(BootContext {
            project: self.name.clone(),
            agent_credential: crate::auth::derive(&secret, &format!("agent/{}", self.name)),
            project_secret: secret,
            steps: StepContext {
                python: "python3".into(),
                motorpool_binary: binary.display().to_string(),
                // The machine's cache of libraries and engines (its local
                // nodes share it): `MOTORPOOL_CACHE_DIR`, or the home's.
                cache_dir: std::env::var_os("MOTORPOOL_CACHE_DIR")
                    .filter(|d| !d.is_empty())
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| self.home.root().join("cache"))
                    .display()
                    .to_string(),
                timeout_seconds: crate::bootstrap::steps::DEFAULT_STEP_TIMEOUT_MINUTES * 60,
                minute: minute(),
            },
            templates: Templates::new(),
            ready_timeout: self.ready_timeout(),
            home: self.home.root().to_path_buf(),
            cloud: self.cloud_nodes(&node_provider, launches).await?,
            node_provider,
            node_tls: Some(node_tls),
        })
    }

    /// How long new nodes may take to report ready: the provider's
    /// `ready_timeout_minutes`, else two minutes.
    fn ready_timeout(&self) -> Duration {
        self.provider
            .shared
            .ready_timeout_minutes
            .and_then(|m| Duration::try_from_secs_f64(m * 60.0).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_READY_TIMEOUT)
    }

    /// How a node reaches its own provider, as the provider's plugin says.
    fn node_provider(&self) -> Result<NodeProvider> {
        let plugin = providers::plugin(&self.provider)?;
        let env = providers::connect_env(&self.home)?;
        Ok(NodeProvider {
            kind: plugin.kind().to_string(),
            settings: plugin.node_settings(&self.provider.settings_value(), &env)?,
        })
    }

    /// What nodes that start themselves need: None where the engine drives
    /// startup or nothing runs, and when the spec does not say (validate
    /// requires it once the spec launches anything; a launch without it is
    /// refused).
    async fn cloud_nodes(
        &self,
        provider: &NodeProvider,
        launches: bool,
    ) -> Result<Option<CloudNodes>> {
        if !self.client.capabilities().needs_runtime_download() {
            return Ok(None);
        }
        let plugin = providers::plugin(&self.provider)?;
        let shared = &self.provider.shared;
        let (url, sha) = match (&shared.runtime_url, &shared.runtime_sha256) {
            (Some(url), Some(sha)) => (url.clone(), sha.clone()),
            _ if launches && plugin.publishes_runtime(&self.provider.settings_value()) => {
                let published =
                    crate::runtime_upload::publish(&self.client, &self.name, &self.home)
                        .await
                        .context("cannot publish the motorpool runtime for the nodes")?;
                (published.url, published.sha256)
            }
            _ => return Ok(None),
        };
        let Some(template) = plugin.user_data_template() else {
            bail!(
                "the {} provider's nodes start themselves but it brings no user-data template",
                plugin.kind()
            );
        };
        Ok(Some(CloudNodes {
            runtime_url: url,
            runtime_sha256: sha,
            provider: provider.clone(),
            template,
            user_data_limit: plugin.capabilities().user_data_limit,
        }))
    }

    /// When the last apply was killed, replay its unfinished launches with
    /// their own client tokens, so nothing it started is made twice. Returns
    /// a line to show, if anything was resumed.
    ///
    /// A journal with a line that is not what an apply of this project wrote
    /// (edited by hand, from another project) is not replayed at all: it is
    /// set aside as `journal.altered.jsonl` and the returned line says so;
    /// the plan is then made from what the provider lists, as always.
    pub async fn resume_interrupted(&self) -> Result<Option<String>> {
        let key = self.journal_key()?;
        let state = match journal::interrupted(&self.dir, &key) {
            Ok(Some(state)) => state,
            Ok(None) => return Ok(None),
            Err(altered) => {
                let aside = journal::set_aside(&self.dir)
                    .with_context(|| format!("cannot set aside {}", altered.path.display()))?;
                return Ok(Some(format!(
                    "warning: {altered}; it was moved to {} (look at it: someone else may write \
                     to this machine's motorpool home). The plan below is made from what the \
                     provider lists.",
                    aside.display()
                )));
            }
        };
        for launch in &state.launches {
            self.client.launch(launch).await.with_context(|| {
                format!(
                    "cannot replay launch {} of the interrupted apply",
                    launch.client_token
                )
            })?;
        }
        journal::clear(&self.dir).context("cannot clear the apply journal")?;
        Ok(Some(format!(
            "The last apply was interrupted after {} of {} operations; replayed {} unfinished launch{} with their client tokens.",
            state.finished_ops,
            state.total_ops,
            state.launches.len(),
            if state.launches.len() == 1 { "" } else { "es" }
        )))
    }

    /// Refuse a saved plan when the observed state moved since it was made.
    pub async fn check_not_stale(&self, plan: &Plan) -> Result<()> {
        let observed = self.observe().await?;
        let now = observed.fingerprint();
        if now != plan.observed_fingerprint {
            bail!(
                "the saved plan is stale: the instances of project `{}` changed since it was made \
                 (fingerprint {} then, {now} now). Nothing was changed; run `motorpool plan` again.",
                plan.project,
                plan.observed_fingerprint
            );
        }
        Ok(())
    }

    /// The key the project's apply journal is authenticated with.
    fn journal_key(&self) -> Result<crate::auth::MacKey> {
        let secret = self.home.project_secret(&self.name)?;
        Ok(journal::key(&secret, &self.name))
    }

    pub async fn apply(&self, plan: &Plan, options: &ApplyOptions) -> Result<ApplyReport> {
        // Every secret is read again and must be what the plan was made
        // with, before anything changes.
        let secrets = self.secret_key()?;
        for change in plan.actionable() {
            for op in &change.ops {
                if let plan::Op::Bootstrap { spec }
                | plan::Op::Launch {
                    warm: Some(spec), ..
                } = op
                {
                    crate::secrets::check(spec, &secrets)
                        .with_context(|| change.address.clone())?;
                }
            }
        }
        let launches = plan
            .changes
            .iter()
            .flat_map(|c| &c.ops)
            .any(|op| matches!(op, plan::Op::Launch { .. }));
        let boot = Arc::new(self.boot_context(launches).await?);
        let key = self.journal_key()?;
        apply::apply(
            plan,
            self.client.clone(),
            &self.dir,
            &key,
            options,
            Some(boot),
        )
        .await
        .context("cannot write the apply journal")
    }
}

/// Build a plan from an observed state.
pub fn plan_against(
    spec: &Spec,
    base_dir: &Path,
    observed: &Observed,
    client: &ProviderClient,
    mode: PlanMode,
    start: &BTreeSet<String>,
    secrets: &crate::secrets::SecretKey,
) -> Result<Plan> {
    plan_with_choices(
        spec,
        base_dir,
        observed,
        client,
        mode,
        start,
        secrets,
        &plan::ControllerChoices::default(),
    )
}

/// [`plan_against`], with what the controller chose (autoscaled sizes,
/// silent idle clusters to stop).
#[allow(clippy::too_many_arguments)]
pub fn plan_with_choices(
    spec: &Spec,
    base_dir: &Path,
    observed: &Observed,
    client: &ProviderClient,
    mode: PlanMode,
    start: &BTreeSet<String>,
    secrets: &crate::secrets::SecretKey,
    choices: &plan::ControllerChoices,
) -> Result<Plan> {
    let nonce = format!("{:016x}", fastrand::u64(..));
    let input = PlanInput {
        spec,
        observed,
        catalog: client.catalog(),
        default_image: &client.default_image(),
        mode,
        now: unix_now(),
        minute: minute(),
        base_dir,
        start,
        nonce: &nonce,
        secrets,
        choices,
    };
    Ok(plan::build(&input)?)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One node, as `status` shows it.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub id: String,
    /// `cluster.etl`, `pool.general`, or `instance.ID` for a stray.
    pub resource: String,
    pub role: String,
    pub state: String,
    pub node_type: String,
    /// Where its agent is dialled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its addresses as its cloud reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The startup steps the node's agent recorded (local provider).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
    /// What the node runs (`motorpool-runtime`: `1`, `spark-4.0.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The engine the node's agent hosts, and what it says of itself
    /// (Spark's driver: its master's URL and alive workers).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub engine: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub engine_info: BTreeMap<String, String>,
}

/// One recorded startup step of a node.
#[derive(Debug, Clone, Serialize)]
pub struct StepStatus {
    pub step: String,
    pub status: String,
    pub duration_ms: u64,
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub project: String,
    pub provider: String,
    pub nodes: Vec<NodeStatus>,
}

pub fn status_of(project: &str, provider: &str, observed: &Observed) -> Status {
    let mut nodes = Vec::new();
    for ((kind, name), members) in &observed.resources {
        for i in members {
            nodes.push(node_status(i, kind.address(name)));
        }
    }
    for i in &observed.orphans {
        nodes.push(node_status(i, ResourceKind::Instance.address(&i.id)));
    }
    Status {
        project: project.to_string(),
        provider: provider.to_string(),
        nodes,
    }
}

fn node_status(i: &motorpool_provider::Instance, resource: String) -> NodeStatus {
    use motorpool_provider::tags;
    NodeStatus {
        id: i.id.clone(),
        resource,
        role: i.tag(tags::ROLE).unwrap_or("unknown").to_string(),
        state: i.state.to_string(),
        node_type: i.node_type.clone(),
        address: i.address.clone(),
        private_ip: i.ips.private.clone(),
        public_ip: i.ips.public.clone(),
        pid: i.pid,
        step: i.tag(tags::STEP).map(str::to_string),
        steps: Vec::new(),
        runtime: i.tag(tags::RUNTIME).map(str::to_string),
        engine: String::new(),
        engine_info: BTreeMap::new(),
    }
}

/// Agents asked at once by [`add_steps`].
const STEP_QUERIES_AT_ONCE: usize = 256;

/// Ask each node's agent (where the engine can reach it) for its recorded
/// steps, a bounded number at a time; nodes without an address cost nothing.
pub async fn add_steps(status: &mut Status, credential: &Credential) {
    use futures_util::StreamExt as _;
    let reachable = status
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(index, n)| Some((index, n.address.clone()?)));
    let queries = reachable
        .map(|(index, address)| async move { (index, agent_state(&address, credential).await) });
    let found: Vec<(usize, Option<AgentState>)> = futures_util::stream::iter(queries)
        .buffer_unordered(STEP_QUERIES_AT_ONCE)
        .collect()
        .await;
    for (index, state) in found {
        if let (Some(node), Some(state)) = (status.nodes.get_mut(index), state) {
            node.steps = state.steps;
            node.engine = state.engine;
            node.engine_info = state.engine_info;
        }
    }
}

/// What one node's agent says of itself.
struct AgentState {
    steps: Vec<StepStatus>,
    engine: String,
    engine_info: BTreeMap<String, String>,
}

/// The steps one node's agent recorded and the engine it hosts; `None`
/// when it does not answer.
async fn agent_state(address: &str, credential: &Credential) -> Option<AgentState> {
    let connect = crate::bootstrap::run::connect(address, credential);
    let mut agent = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    let request = agent.get_state(crate::agent::proto::GetStateRequest {});
    let state = tokio::time::timeout(Duration::from_secs(2), request)
        .await
        .ok()?
        .ok()?
        .into_inner();
    Some(AgentState {
        steps: state
            .steps
            .into_iter()
            .map(|s| StepStatus {
                step: s.step,
                status: s.status,
                duration_ms: s.duration_ms,
            })
            .collect(),
        engine: state.engine,
        engine_info: state.engine_info.into_iter().collect(),
    })
}

/// A cluster's engine as its driver node tells it: `engine: spark-4.0.1,
/// spark.master spark://..., ...`.
fn engine_line(nodes: &[&NodeStatus]) -> Option<String> {
    let driver = nodes
        .iter()
        .find(|n| n.role == crate::words::Role::Driver.as_str() && !n.engine_info.is_empty())?;
    let what = driver.runtime.as_deref().unwrap_or(&driver.engine);
    let info: Vec<String> = driver
        .engine_info
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    Some(format!("  engine: {what}, {}", info.join(", ")))
}

/// The seven startup steps of a cluster: the slowest node's time for each.
fn startup_line(nodes: &[&NodeStatus]) -> Option<String> {
    let mut parts = Vec::new();
    for step in crate::bootstrap::STEPS {
        let runs: Vec<&StepStatus> = nodes
            .iter()
            .flat_map(|n| n.steps.iter())
            .filter(|s| s.step == step.name())
            .collect();
        if runs.is_empty() {
            continue;
        }
        let ms = runs.iter().map(|s| s.duration_ms).max().unwrap_or(0);
        let failed = runs.iter().any(|s| s.status == "failed");
        parts.push(format!(
            "{} {:.2}s{}",
            step.title(),
            ms as f64 / 1000.0,
            if failed { " FAILED" } else { "" }
        ));
    }
    (!parts.is_empty()).then(|| format!("  startup: {}", parts.join(" > ")))
}

/// `status` as text: one block per pool or cluster, one line per node.
pub fn render_status(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "project `{}` on the {} provider\n",
        status.project, status.provider
    );
    if status.nodes.is_empty() {
        out.push_str("\nNo instances. Run `motorpool apply` to create what the spec describes.\n");
        return out;
    }
    // status_of lists each resource's nodes together: one block per run.
    for members in status.nodes.chunk_by(|a, b| a.resource == b.resource) {
        let Some(current) = members.first().map(|n| n.resource.as_str()) else {
            continue;
        };
        let _ = writeln!(
            out,
            "\n{current} ({})",
            plan::plural(members.len() as u32, "node")
        );
        if current.starts_with("cluster.") {
            let refs: Vec<&NodeStatus> = members.iter().collect();
            if let Some(line) = startup_line(&refs) {
                let _ = writeln!(out, "{line}");
            }
            if let Some(line) = engine_line(&refs) {
                let _ = writeln!(out, "{line}");
            }
        }
        for n in members {
            let _ = writeln!(
                out,
                "  {:<16} {:<7} {:<11} {:<8} {:<21} {}",
                n.id,
                n.role,
                n.state,
                n.node_type,
                n.address.as_deref().unwrap_or("-"),
                node_extra(n)
            );
        }
    }
    out
}

/// The last column of a node's line: its agent's pid (local), or the
/// addresses its cloud reports.
fn node_extra(n: &NodeStatus) -> String {
    if let Some(pid) = n.pid {
        return format!("pid {pid}");
    }
    let ips: Vec<String> = [("private", &n.private_ip), ("public", &n.public_ip)]
        .into_iter()
        .filter_map(|(kind, ip)| Some(format!("{kind} {}", ip.as_deref()?)))
        .collect();
    ips.join(", ")
}

/// `motorpool logs CLUSTER`: every node's step outputs, driver first, steps in the order they ran.
pub async fn cluster_logs(
    observed: &Observed,
    cluster: &str,
    credential: &Credential,
) -> Result<String> {
    use std::fmt::Write as _;
    let mut nodes: Vec<&motorpool_provider::Instance> = observed
        .members(ResourceKind::Cluster, cluster)
        .iter()
        .collect();
    if nodes.is_empty() {
        bail!("cluster `{cluster}` has no nodes; `motorpool status` lists what runs");
    }
    nodes.sort_by_key(|i| {
        (
            i.tag(motorpool_provider::tags::ROLE) != Some(crate::words::Role::Driver.as_str()),
            i.id.clone(),
        )
    });
    let mut out = String::new();
    for node in nodes {
        let role = node.tag(motorpool_provider::tags::ROLE).unwrap_or("node");
        let Some(address) = node.address.as_deref().filter(|_| node.state.is_live()) else {
            let _ = writeln!(
                out,
                "== {} ({role}, {}): no agent to ask\n",
                node.id, node.state
            );
            continue;
        };
        let mut agent = crate::bootstrap::run::connect(address, credential).await?;
        let state = agent
            .get_state(crate::agent::proto::GetStateRequest {})
            .await
            .with_context(|| format!("the agent of {} did not answer", node.id))?
            .into_inner();
        for step in state
            .steps
            .iter()
            .filter(|s| !s.key.is_empty() || s.duration_ms > 0 || s.status != "ok")
        {
            let text = match agent
                .step_log(crate::agent::proto::StepLogRequest {
                    step: step.step.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner().text,
                Err(_) => continue, // a step the engine recorded (request, allocate, ...) has no output
            };
            let _ = writeln!(
                out,
                "== {} ({role}) {} [{}, {:.2}s]",
                node.id,
                step.step,
                step.status,
                step.duration_ms as f64 / 1000.0
            );
            out.push_str(&text);
            if !text.ends_with('\n') && !text.is_empty() {
                out.push('\n');
            }
            out.push('\n');
        }
    }
    Ok(out)
}

/// `MOTORPOOL_MINUTE_MS` shortens a minute of the spec's `*_minutes` settings
/// that the engine applies (tests of timeouts); one real minute otherwise.
pub fn minute() -> Duration {
    std::env::var("MOTORPOOL_MINUTE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(60))
}
