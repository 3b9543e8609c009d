//! `motorpool run`: one job of a spec, through to its end, on its cluster.
//!
//! The stages, in order:
//! 1. **Cluster.** `cluster: NAME` — bring that cluster up if it is missing,
//!    drifted or stopped itself (a plan narrowed to it and its pool, applied
//!    under the project lock). `new_cluster:` — a job cluster made for this
//!    run (`<job>-run-<id>`), marked with the run's tags (`motorpool-job`,
//!    `motorpool-expires`) so that `plan` leaves it to the run, and removed
//!    after the run — also when the job fails, the run cannot be carried
//!    out, or the run is interrupted (Ctrl-C, or SIGTERM as a CI runner or
//!    `timeout` sends: both are handled alike). If `motorpool run` itself is
//!    killed (SIGKILL), `plan` removes the cluster once it expires.
//! 2. **Run.** The driver's address from the driver node's agent, the
//!    cluster's credential from the project secret, then the cluster's
//!    engine ([`crate::engines::EnginePlugin::run_job`]: for the bundled
//!    runtime, bundle, upload, submit, follow, download the outputs).
//! 3. **Record.** The run's summary and task logs are kept under
//!    `$MOTORPOOL_HOME/projects/<project>/runs/<job>/<run-id>/`, so
//!    `motorpool logs JOB` works after a job cluster is gone.
//!
//! This module owns those stages and the run records; it does not render
//! progress (the CLI does) and holds no planning or runtime rules.

pub mod progress;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use motorpool_provider::{Instance, Retag, Tags, tags};
use serde::{Deserialize, Serialize};

use crate::apply::ApplyOptions;
use crate::auth::{self, Credential};
use crate::engine::{Project, WaitFor, plan_against, unix_now};
use crate::engines::{self, DriverAccess, EnginePlugin};
use crate::observe::{Observed, ResourceKind};
use crate::plan::{PlanMode, render};
use crate::runtime::client::JobSubmission;
use crate::runtime::{Progress, RunSummary};
use crate::spec::{Job, LoadedSpec};

/// How long, in minutes, a job cluster is kept for a run without a timeout
/// before `plan` and the controller consider it outlived.
const DEFAULT_JOB_CLUSTER_MINUTES: u32 = 24 * 60;

/// Minutes on top of the job's timeout before its cluster counts as outlived.
const EXPIRY_MARGIN_MINUTES: u32 = 15;

/// What `motorpool run` was asked to do.
pub struct RunRequest<'a> {
    pub loaded: &'a LoadedSpec,
    pub job: &'a str,
    pub apply: ApplyOptions,
}

/// A run that ended (the job succeeded or failed).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub cluster: String,
    /// True when the cluster was made for this run (and is gone now).
    pub job_cluster: bool,
    /// Seconds spent bringing the cluster up (0 when it was ready).
    pub cluster_seconds: f64,
    pub summary: RunSummary,
    /// Where the run's summary and logs were kept.
    pub record: PathBuf,
    /// The run's task logs (in the record, not in `--output json`).
    #[serde(skip)]
    pub logs: Vec<LogFile>,
}

impl RunReport {
    /// What a command task printed on its last attempt (e.g. a job's result).
    pub fn command_output(&self, task: &str) -> Option<&str> {
        last_stdout(&self.logs, task)
    }
}

/// The stdout of a task's last attempt among `logs` (`attempt-N.stdout`).
fn last_stdout<'a>(logs: &'a [LogFile], task: &str) -> Option<&'a str> {
    logs.iter()
        .filter(|f| f.task == task && f.name.starts_with("attempt-") && f.name.ends_with(".stdout"))
        .max_by_key(|f| {
            f.name
                .trim_start_matches("attempt-")
                .trim_end_matches(".stdout")
                .parse::<u32>()
                .unwrap_or(0)
        })
        .map(|f| f.text.as_str())
}

/// The cluster a run uses.
struct Target {
    name: String,
    job_cluster: bool,
    /// What the cluster runs.
    engine: &'static dyn EnginePlugin,
}

/// Run `request.job` and wait for it to end.
///
/// `on_line` gets news lines (cluster start, removal); `on_progress` the
/// run's progress. A job that fails is `Ok` with `summary.ok == false`.
/// Ctrl-C cancels the run, removes a job cluster, and returns an error.
pub async fn run(
    request: RunRequest<'_>,
    on_line: &(dyn Fn(&str) + Sync),
    on_progress: impl FnMut(&Progress) + Send,
) -> Result<RunReport> {
    let spec = &request.loaded.spec;
    let job = spec.jobs.get(request.job).with_context(|| {
        let names: Vec<&str> = spec.jobs.keys().map(String::as_str).collect();
        if names.is_empty() {
            format!("the spec has no job `{}` (it defines no jobs)", request.job)
        } else {
            format!(
                "the spec has no job `{}`; its jobs: {}",
                request.job,
                names.join(", ")
            )
        }
    })?;
    let project = Project::open(&spec.project, &spec.provider)?;
    let target = match (&job.cluster, &job.new_cluster) {
        (Some(name), _) => Target {
            name: name.clone(),
            job_cluster: false,
            engine: crate::registry::Registry::global().engine_or_error(
                spec.clusters
                    .get(name)
                    .map_or(engines::DEFAULT_ENGINE, |c| c.engine_kind()),
            )?,
        },
        (None, Some(c)) => Target {
            name: job_cluster_name(request.job),
            job_cluster: true,
            engine: crate::registry::Registry::global().engine_or_error(c.engine_kind())?,
        },
        (None, None) => bail!(
            "job `{}` names neither `cluster` nor `new_cluster`",
            request.job
        ),
    };
    // Ctrl-C and SIGTERM from here on are ours: a start under way finishes
    // (so nothing is left half made), the run is cancelled, a job cluster removed.
    let mut interrupt = Interrupts::listen()?;
    let started = std::time::Instant::now();
    let mut interrupted = false;
    let up = {
        let up = bring_up(&request, job, &target, on_line);
        tokio::pin!(up);
        loop {
            tokio::select! {
                r = &mut up => break r,
                _ = interrupt.recv(), if !interrupted => {
                    on_line("interrupted: letting the cluster's start finish, then stopping");
                    interrupted = true;
                }
            }
        }
    };
    let cluster_seconds = started.elapsed().as_secs_f64();
    let outcome = match up {
        Ok(()) if interrupted => Err(anyhow::anyhow!(
            "interrupted ({}) before job `{}` was submitted",
            interrupt.last(),
            request.job
        )),
        Ok(()) => {
            tokio::select! {
                r = run_on_cluster(&project, &request, job, &target, on_progress) => r,
                _ = interrupt.recv() => {
                    on_line("interrupted: cancelling the run");
                    cancel_active_runs(&project, request.job, &target).await;
                    Err(anyhow::anyhow!("interrupted ({}): the run of job `{}` was cancelled", interrupt.last(), request.job))
                }
            }
        }
        Err(e) => Err(e),
    };
    if target.job_cluster {
        // Removed whatever happened above: a job cluster never outlives its run.
        if let Err(e) = remove_job_cluster(&request, &target.name, on_line).await {
            let removal = format!(
                "could not remove job cluster `{}`: {e:#}; `motorpool apply` removes it once it expires",
                target.name
            );
            return Err(match outcome {
                Ok(_) => anyhow::anyhow!(removal),
                Err(run_error) => run_error.context(removal),
            });
        }
    }
    let (summary, record, logs) = outcome?;
    Ok(RunReport {
        cluster: target.name,
        job_cluster: target.job_cluster,
        cluster_seconds,
        summary,
        record,
        logs,
    })
}

/// `<job>-run-<6 hex>`, a valid cluster name whatever the job's name length.
fn job_cluster_name(job: &str) -> String {
    let suffix = format!("{:06x}", fastrand::u32(..0x100_0000));
    let head: String = job
        .chars()
        .take(63 - "-run-".len() - suffix.len())
        .collect();
    format!("{}-run-{suffix}", head.trim_end_matches('-'))
}

/// `max_concurrent_runs` for jobs on job clusters: each live job cluster of
/// the job is a run. Checked under the project lock, which is held until the
/// new job cluster is marked as this job's, so two runs cannot both pass.
fn check_job_cluster_limit(observed: &Observed, name: &str, job: &Job) -> Result<()> {
    let Some(max) = job.max_concurrent_runs else {
        return Ok(());
    };
    let now = unix_now();
    let going = observed
        .names(ResourceKind::Cluster)
        .filter(|cluster| {
            observed
                .members(ResourceKind::Cluster, cluster)
                .iter()
                .any(|i| {
                    i.state.is_live()
                        && i.tag(tags::JOB) == Some(name)
                        && i.tag(tags::EXPIRES)
                            .and_then(|e| e.parse::<u64>().ok())
                            .is_some_and(|e| e > now)
                })
        })
        .count();
    if going as u32 >= max {
        bail!(
            "job `{name}` already has {going} run{} going (max_concurrent_runs: {max}); nothing was started",
            if going == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Make the target cluster ready: a plan narrowed to it (and the pool it
/// draws from), applied under the project lock. A job cluster is then
/// marked as the run's before the lock is let go.
async fn bring_up(
    request: &RunRequest<'_>,
    job: &Job,
    target: &Target,
    on_line: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let spec = &request.loaded.spec;
    let mut loaded = request.loaded.clone();
    if let Some(cluster) = &job.new_cluster {
        loaded
            .spec
            .clusters
            .insert(target.name.clone(), (**cluster).clone());
    } else if !spec.clusters.contains_key(&target.name) {
        bail!(
            "job `{}` runs on cluster `{}`, which the spec does not define",
            request.job,
            target.name
        );
    }
    let project = Project::lock_waiting(
        &spec.project,
        &spec.provider,
        "run",
        on_line,
        WaitFor::AnyHolder,
    )
    .await?;
    if let Some(note) = project.resume_interrupted().await? {
        on_line(&note);
    }
    let observed = project.observe().await?;
    if target.job_cluster {
        check_job_cluster_limit(&observed, request.job, job)?;
    }
    let start: BTreeSet<String> = [target.name.clone()].into();
    let mut plan = plan_against(
        &loaded.spec,
        &loaded.base_dir,
        &observed,
        &project.client,
        PlanMode::Normal,
        &start,
        &project.secret_key()?,
    )?;
    let address = ResourceKind::Cluster.address(&target.name);
    plan.retain_targets(std::slice::from_ref(&address));
    if plan.has_changes() {
        on_line(&format!(
            "starting cluster `{}` for job `{}`:",
            target.name, request.job
        ));
        for line in render::text(&plan).lines().filter(|l| !l.trim().is_empty()) {
            on_line(line);
        }
        let report = project.apply(&plan, &request.apply).await?;
        if !report.succeeded() {
            bail!(
                "cluster `{}` did not start: {}",
                target.name,
                report.failure_text()
            );
        }
    }
    if target.job_cluster {
        // In the spec's minutes (shortened by `MOTORPOOL_MINUTE_MS` in tests).
        let minutes = job
            .timeout_minutes
            .map(|m| m.saturating_add(EXPIRY_MARGIN_MINUTES))
            .unwrap_or(DEFAULT_JOB_CLUSTER_MINUTES);
        let lifetime = crate::engine::minute() * minutes;
        let mut set = Tags::new();
        set.insert(tags::JOB.into(), request.job.to_string());
        set.insert(
            tags::EXPIRES.into(),
            (unix_now() + lifetime.as_secs()).to_string(),
        );
        let observed = project.observe().await?;
        retag_cluster(
            &project,
            &target.name,
            observed.members(ResourceKind::Cluster, &target.name),
            set,
        )
        .await?;
    }
    Ok(())
}

/// Set `set` on the live ones of `nodes`, the cluster's observed instances.
async fn retag_cluster(
    project: &Project,
    cluster: &str,
    nodes: &[Instance],
    set: Tags,
) -> Result<()> {
    let ids: Vec<String> = nodes
        .iter()
        .filter(|i| i.state.is_live())
        .map(|i| i.id.clone())
        .collect();
    if ids.is_empty() {
        bail!("cluster `{cluster}` has no live nodes");
    }
    project
        .client
        .retag(
            &ids,
            &Retag {
                set,
                remove: vec![],
            },
        )
        .await
        .with_context(|| format!("cannot tag the nodes of cluster `{cluster}`"))
}

/// The live driver node of `cluster`.
fn driver_of<'a>(nodes: &'a [Instance], cluster: &str) -> Result<&'a Instance> {
    nodes
        .iter()
        .find(|i| {
            i.state.is_live() && i.tag(tags::ROLE) == Some(crate::words::Role::Driver.as_str())
        })
        .with_context(|| format!("cluster `{cluster}` has no running driver node"))
}

/// Where the cluster's driver listens, asked of the driver node's agent.
async fn driver_address(project: &Project, cluster: &str) -> Result<String> {
    let observed = project.observe().await?;
    let driver = driver_of(observed.members(ResourceKind::Cluster, cluster), cluster)?;
    let address = driver.address.as_deref().with_context(|| {
        format!(
            "the driver node {} of cluster `{cluster}` has published no address yet: its agent \
             has not started (see `motorpool status`)",
            driver.id
        )
    })?;
    let mut agent = crate::bootstrap::run::connect(address, &project.agent_credential()?)
        .await
        .map_err(|e| project.unreachable(&driver.id, e))?;
    let state = agent
        .get_state(crate::agent::proto::GetStateRequest {})
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the agent of driver node {} did not answer: {}",
                driver.id,
                s.message()
            )
        })?
        .into_inner();
    if state.runtime_role != crate::proto::roles::DRIVER || state.driver_address.is_empty() {
        bail!(
            "cluster `{cluster}`'s driver node {} runs no driver; `motorpool apply` starts it",
            driver.id
        );
    }
    Ok(on_host_of(address, &state.driver_address))
}

/// The driver runs inside its node's agent, so it is reached on the host
/// this machine dials the agent at (a cloud node's published address)
/// with the port the driver listens on.
fn on_host_of(agent: &str, driver: &str) -> String {
    match (
        agent.parse::<std::net::SocketAddr>(),
        driver.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(agent), Ok(driver)) => std::net::SocketAddr::new(agent.ip(), driver.port()).to_string(),
        _ => driver.to_string(),
    }
}

fn cluster_credential(project: &Project, cluster: &str) -> Result<Credential> {
    let secret = project.home.project_secret(&project.name)?;
    Ok(auth::cluster_credential(&secret, &project.name, cluster))
}

/// Every job's map inputs and task outputs: data, not code, so out of the
/// bundle. Those on object storage are not in the job directory at all.
pub fn data_paths(loaded: &LoadedSpec) -> Vec<String> {
    loaded
        .spec
        .jobs
        .values()
        .flat_map(|j| j.tasks.values())
        .flat_map(|t| {
            let input = t.map.as_ref().map(|m| m.input.clone());
            input.into_iter().chain(t.output.clone())
        })
        .filter(|p| !motorpool_storage::is_data_url(p))
        .collect()
}

/// How this machine reaches the cluster's driver: its address (from the
/// driver node's agent) and the cluster's credential.
async fn driver_access(project: &Project, cluster: &str) -> Result<DriverAccess> {
    Ok(DriverAccess {
        address: driver_address(project, cluster).await?,
        credential: cluster_credential(project, cluster)?,
    })
}

async fn run_on_cluster(
    project: &Project,
    request: &RunRequest<'_>,
    job: &Job,
    target: &Target,
    mut on_progress: impl FnMut(&Progress) + Send,
) -> Result<(RunSummary, PathBuf, Vec<LogFile>)> {
    let spec = &request.loaded.spec;
    let driver = driver_access(project, &target.name).await?;
    if let (Some(max), false) = (job.max_concurrent_runs, target.job_cluster) {
        let going = target
            .engine
            .runs(&driver, Some(request.job))
            .await?
            .iter()
            .filter(|r| r.is_active())
            .count();
        if going as u32 >= max {
            bail!(
                "job `{}` already has {going} run{} going on cluster `{}` (max_concurrent_runs: {max}); nothing was started",
                request.job,
                if going == 1 { "" } else { "s" },
                target.name
            );
        }
    }
    let cluster_env = match &job.new_cluster {
        Some(c) => c.env.clone(),
        None => spec
            .clusters
            .get(&target.name)
            .map(|c| c.env.clone())
            .unwrap_or_default(),
    };
    // Secret values are read now, for the tasks only: never printed. The
    // job's own env goes over its cluster's, all of it in the submission.
    let mut env = crate::secrets::values(&cluster_env, &request.loaded.base_dir)?;
    env.extend(crate::secrets::values(&job.env, &request.loaded.base_dir)?);
    let mut submitted = job.clone();
    submitted.env.clear();
    let summary = target
        .engine
        .run_job(
            &driver,
            JobSubmission {
                name: request.job.to_string(),
                job: submitted,
                base_dir: request.loaded.base_dir.clone(),
                env,
                exclude: data_paths(request.loaded),
            },
            &mut on_progress,
        )
        .await?;
    let logs = target
        .engine
        .logs(&driver, &summary.run_id)
        .await
        .unwrap_or_default();
    let record = save_record(project, &target.name, &summary, &logs)?;
    Ok((summary, record, logs))
}

/// Best effort, on Ctrl-C: cancel this job's runs that are still going.
async fn cancel_active_runs(project: &Project, job: &str, target: &Target) {
    let Ok(driver) = driver_access(project, &target.name).await else {
        return;
    };
    let Ok(runs) = target.engine.runs(&driver, Some(job)).await else {
        return;
    };
    for r in runs.iter().filter(|r| r.is_active()) {
        let _ = target.engine.cancel_run(&driver, &r.run_id).await;
    }
}

/// Stop the job cluster's runtime, then remove the cluster like any cluster
/// gone from the spec: its instances go back to their pool or away.
async fn remove_job_cluster(
    request: &RunRequest<'_>,
    cluster: &str,
    on_line: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let spec = &request.loaded.spec;
    let project = Project::lock_waiting(
        &spec.project,
        &spec.provider,
        "run",
        on_line,
        WaitFor::AnyHolder,
    )
    .await?;
    let observed = project.observe().await?;
    let nodes = observed.members(ResourceKind::Cluster, cluster);
    if nodes.is_empty() {
        return Ok(());
    }
    stop_runtimes(&project, nodes).await;
    // Expired now: the plan removes it as outlived.
    let mut set = Tags::new();
    set.insert(tags::EXPIRES.into(), "0".into());
    retag_cluster(&project, cluster, nodes, set).await?;
    let mut plan = project
        .plan(request.loaded, PlanMode::Normal, &BTreeSet::new())
        .await?;
    // Only the cluster's removal: a pool change waits for the next apply.
    let address = ResourceKind::Cluster.address(cluster);
    plan.retain(|c| c.address == address);
    on_line(&format!("removing job cluster `{cluster}`"));
    let report = project.apply(&plan, &request.apply).await?;
    if !report.succeeded() {
        bail!("{}", report.failure_text());
    }
    Ok(())
}

/// Stop the driver and executors on the nodes (best effort): nodes going
/// back to a pool must not keep a cluster's runtime.
async fn stop_runtimes(project: &Project, nodes: &[Instance]) {
    let Ok(credential) = project.agent_credential() else {
        return;
    };
    let stops = nodes
        .iter()
        .filter_map(|n| n.address.clone())
        .map(|address| {
            let credential = credential.clone();
            async move {
                if let Ok(mut agent) = crate::bootstrap::run::connect(&address, &credential).await {
                    let _ = agent
                        .stop_runtime(crate::agent::proto::StopRuntimeRequest {})
                        .await;
                }
            }
        });
    futures_util::future::join_all(stops).await;
}

/// What is kept of a run on the submitting machine.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub cluster: String,
    pub summary: RunSummary,
    #[serde(default)]
    pub logs: Vec<LogFile>,
}

pub use crate::engines::LogFile;

/// SIGINT (Ctrl-C) and SIGTERM, taken over while a run is under way: both
/// mean "stop, and clean up what you made".
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    last: &'static str,
}

impl Interrupts {
    fn listen() -> Result<Interrupts> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            last: "Ctrl-C",
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => self.last = "Ctrl-C",
            _ = self.term.recv() => self.last = "SIGTERM",
        }
    }

    /// Which signal came last, for messages.
    fn last(&self) -> &'static str {
        self.last
    }
}

fn runs_dir(project: &Project, job: &str) -> PathBuf {
    project.dir.join("runs").join(job)
}

/// A run id can name a file: letters, digits, `-` and `_` only.
fn is_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn save_record(
    project: &Project,
    cluster: &str,
    summary: &RunSummary,
    logs: &[LogFile],
) -> Result<PathBuf> {
    if !is_run_id(&summary.run_id) {
        bail!(
            "the driver sent a run id that is not a file name: {:?}",
            summary.run_id
        );
    }
    let dir = runs_dir(project, &summary.job);
    crate::home::ensure_dir(&dir)?;
    let record = RunRecord {
        cluster: cluster.to_string(),
        summary: summary.clone(),
        logs: logs.to_vec(),
    };
    let path = dir.join(format!("{}.json", summary.run_id));
    crate::home::write_atomic(&path, &serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The kept record of `run_id`, or of the job's newest run.
pub fn load_record(project: &Project, job: &str, run_id: Option<&str>) -> Result<RunRecord> {
    let dir = runs_dir(project, job);
    let path = match run_id {
        Some(id) if !is_run_id(id) => {
            bail!("`{id}` is not a run id (e.g. run-1795228244211-7ed205)")
        }
        Some(id) => dir.join(format!("{id}.json")),
        None => newest_record(&dir)?.with_context(|| {
            format!(
                "job `{job}` has no recorded runs on this machine; `motorpool run {job}` makes one"
            )
        })?,
    };
    let bytes = std::fs::read(&path).with_context(|| match run_id {
        Some(id) => format!("job `{job}` has no recorded run `{id}`"),
        None => format!("cannot read {}", path.display()),
    })?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a run record", path.display()))
}

fn newest_record(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
            newest = Some((modified, path));
        }
    }
    Ok(newest.map(|(_, p)| p))
}

/// A run record as text: the run's line, then each task's log files.
pub fn render_logs(record: &RunRecord) -> String {
    use std::fmt::Write as _;
    let s = &record.summary;
    let mut out = format!(
        "run {} of job `{}` on cluster `{}`: {} in {:.2}s\n",
        s.run_id,
        s.job,
        record.cluster,
        if s.ok { "succeeded" } else { "failed" },
        s.duration_ms as f64 / 1000.0
    );
    if let Some(e) = &s.error {
        let _ = writeln!(out, "error: {e}");
    }
    if record.logs.is_empty() {
        out.push_str("\n(no task output was kept)\n");
    }
    for f in &record.logs {
        let _ = writeln!(
            out,
            "\n== {} {}{}",
            f.task,
            f.name,
            if f.truncated { " (tail)" } else { "" }
        );
        out.push_str(&f.text);
        if !f.text.ends_with('\n') && !f.text.is_empty() {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_cluster_names_are_valid_cluster_names_for_any_job_name() {
        for job in [
            "wordcount",
            "a",
            &"x".repeat(63),
            "ab-",
            "long-job-name-with-dashes",
        ] {
            let name = job_cluster_name(job);
            assert!(crate::spec::is_valid_name(&name), "{name}");
            assert!(name.contains("-run-"), "{name}");
        }
        assert_ne!(job_cluster_name("wc"), job_cluster_name("wc"));
    }
}
