//! The stages wired together, as the CLI's commands use them: load a spec,
//! connect to its provider, take the project lock, resume an interrupted
//! apply, observe, plan, check a saved plan for staleness, apply, report
//! status.
//!
//! Each function here is one step a command takes; the rules live in the
//! modules they call (`spec`, `observe`, `plan`, `apply`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::apply::{self, ApplyOptions, ApplyReport, journal, lock::ProjectLock};
use crate::home::Home;
use crate::observe::{self, Observed, ResourceKind};
use crate::plan::{self, Plan, PlanInput, PlanMode};
use crate::providers::{self, ProviderClient};
use crate::spec::{self, LoadOptions, LoadedSpec, ProviderBlock, Spec};

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
    _lock: Option<ProjectLock>,
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
            _lock: None,
        })
    }

    /// Connect for changing (apply, destroy): take the project lock first.
    pub fn lock(name: &str, provider: &ProviderBlock) -> Result<Project> {
        let mut project = Project::open(name, provider)?;
        project._lock = Some(ProjectLock::acquire(&project.dir, name)?);
        Ok(project)
    }

    pub async fn observe(&self) -> Result<Observed> {
        observe::observe(&self.client, &self.name)
            .await
            .with_context(|| format!("cannot list the instances of project `{}`", self.name))
    }

    /// Build a plan against what the provider reports now.
    pub async fn plan(&self, spec: &Spec, mode: PlanMode) -> Result<Plan> {
        let observed = self.observe().await?;
        plan_against(spec, &observed, &self.client, mode)
    }

    /// When the last apply was killed, replay its unfinished launches with
    /// their own client tokens, so nothing it started is made twice. Returns
    /// a line to show, if anything was resumed.
    pub async fn resume_interrupted(&self) -> Result<Option<String>> {
        let Some(state) = journal::interrupted(&self.dir) else {
            return Ok(None);
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

    pub async fn apply(&self, plan: &Plan, options: &ApplyOptions) -> Result<ApplyReport> {
        apply::apply(plan, self.client.clone(), &self.dir, options)
            .await
            .context("cannot write the apply journal")
    }
}

/// Build a plan from an observed state.
pub fn plan_against(
    spec: &Spec,
    observed: &Observed,
    client: &ProviderClient,
    mode: PlanMode,
) -> Result<Plan> {
    let input = PlanInput {
        spec,
        observed,
        catalog: client.catalog(),
        default_image: &client.default_image(),
        mode,
        now: unix_now(),
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
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
        pid: i.pid,
        step: i.tag(tags::STEP).map(str::to_string),
    }
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
    let mut current = "";
    for n in &status.nodes {
        if n.resource != current {
            current = &n.resource;
            let count = status
                .nodes
                .iter()
                .filter(|m| m.resource == n.resource)
                .count();
            let _ = writeln!(out, "\n{current} ({})", plan::plural(count as u32, "node"));
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<7} {:<11} {:<8} {:<21} {}",
            n.id,
            n.role,
            n.state,
            n.node_type,
            n.address.as_deref().unwrap_or("-"),
            n.pid.map(|p| format!("pid {p}")).unwrap_or_default()
        );
    }
    out
}
