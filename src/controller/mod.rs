//! `motorpool controller`: a long-running reconcile loop, in the manner of
//! kube-rs controllers, that keeps between applies what a spec promises
//! and `apply` alone would only do when someone runs it.
//!
//! Each pass converges from whatever state it finds: it observes (the same
//! paginated list `plan` makes), builds a plan in [`PlanMode::Maintain`]
//! (pools refilled to `min_idle` within `max_capacity`, idle instances above
//! `min_idle` removed after `idle_timeout_minutes`, job clusters that
//! outlived their run removed, and with `--heal` drift healed), and, only
//! when that plan has changes, takes the project lock, observes and plans
//! again under it, applies with the same engine as `apply`, and lets the
//! lock go. A pass that finds nothing to do costs the list calls and
//! nothing else; one that finds the lock held (an apply, a run) waits for
//! the next. Spec changes stay `apply`'s.
//!
//! One controller acts per project: it holds a lock of its own for its whole
//! life (a file lock on this machine, and where the provider keeps cloud
//! locks, a cloud lease named [`controller_lock_name`]); a second one exits
//! with a message naming the first.
//!
//! Each pass also asks autoscaled clusters' drivers for their load and
//! plans the sizes [`autoscale`] chooses, stops clusters whose driver's
//! agent went silent once they idled their autotermination time ([`idle`]),
//! and starts the runs of scheduled jobs that came due ([`schedules`]).
//!
//! This module owns the loop, its locks and its log; the rules of what to
//! change are the planner's, carrying them out is apply's, when a job runs
//! is [`schedules`]', and what it shows on `/metrics` is [`metrics`]'.

pub mod autoscale;
pub mod drivers;
pub mod idle;
pub mod metrics;
pub mod schedules;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use motorpool_provider::tags;

use crate::apply::lock::{CONTROLLER_COMMAND, CloudLease, controller_lock_name, flock_file};
use crate::apply::{ApplyOptions, ProgressMode};
use crate::engine::{self, Project};
use crate::observe::{Observed, ResourceKind};
use crate::plan::{ControllerChoices, Plan, PlanMode};
use crate::spec::{LoadOptions, LoadedSpec};
use metrics::{Metrics, PoolGauge};

/// What `motorpool controller` was asked to do.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// The spec (file or directory), read again at every pass.
    pub path: PathBuf,
    pub load: LoadOptions,
    /// Time between the starts of two passes.
    pub interval: Duration,
    /// Heal drift too (what `apply --refresh-only` heals).
    pub heal: bool,
    /// One pass, then exit (for a cron job or CI).
    pub once: bool,
    /// Where `/metrics` and `/healthz` are served; `None`: nowhere.
    pub listen: Option<SocketAddr>,
    /// Most provider operations in flight at once in a pass's apply.
    pub parallelism: usize,
}

/// The file lock, in the project's directory, that one controller per home holds.
const CONTROLLER_LOCK_FILE: &str = "controller.lock";

/// Where this home keeps the id of the controller's cloud lease while held.
const CONTROLLER_LEASE_RECORD: &str = "controller-lock.id";

/// Run the controller until SIGINT or SIGTERM (or one pass with `once`).
/// `log` gets one line per thing that happened: a change, a skipped pass,
/// an error. A pass's error is logged and the loop goes on; only what
/// stops it from starting at all (a bad spec, another controller) is
/// returned.
pub async fn run(options: ControllerOptions, log: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let loaded = engine::load_spec(&options.path, &options.load)?;
    let spec = &loaded.spec;
    let mut project = Project::open(&spec.project, &spec.provider)?;

    let lock_path = project.dir.join(CONTROLLER_LOCK_FILE);
    let _controller_lock = match flock_file(&lock_path, CONTROLLER_COMMAND)? {
        Ok(file) => file,
        Err(holder) => bail!(
            "another controller runs for project `{}` on this machine ({holder}); one controller \
             acts per project: stop that one first. Nothing was changed.",
            spec.project
        ),
    };
    let record = project.dir.join(CONTROLLER_LEASE_RECORD);
    let note = |line: &str| log(line);
    let lease = CloudLease::take_as(
        project.client.clone(),
        &controller_lock_name(&spec.project),
        &record,
        CONTROLLER_COMMAND,
        &note,
    )
    .await
    .with_context(|| {
        format!(
            "another controller may run for project `{}` on another machine; one controller acts \
             per project. Nothing was changed",
            spec.project
        )
    })?;

    let metrics = Arc::new(Metrics::new(&spec.project, options.interval));
    let server = match options.listen {
        Some(at) => {
            let (bound, task) = metrics::serve(at, metrics.clone())
                .await
                .with_context(|| format!("cannot serve /metrics on {at}"))?;
            log(&format!("serving /metrics and /healthz on http://{bound}"));
            Some(task)
        }
        None => None,
    };
    log(&format!(
        "controller of project `{}` ({} provider): a pass every {:.1}s{}",
        spec.project,
        spec.provider.kind(),
        options.interval.as_secs_f64(),
        if options.heal { ", healing drift" } else { "" }
    ));

    let mut scheduler = schedules::Scheduler::new(&project.dir, &options.path, &options.load)?;
    let mut watches = Watches::default();
    let mut stop = Shutdown::listen()?;
    loop {
        let started = Instant::now();
        let calls_before = project.client.stats();
        let outcome = match engine::load_spec(&options.path, &options.load) {
            Ok(loaded) => {
                for event in scheduler.tick(&loaded, engine::unix_now() as i64) {
                    log(&metrics.schedule_event(&event));
                }
                pass(&mut project, &loaded, &mut watches, &options, &metrics, log).await
            }
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        metrics.pass_done(took, outcome.is_ok(), project.client.stats());
        match outcome {
            Err(e) => log(&format!("pass failed: {e:#}")),
            Ok(seen) if options.once || seen.acted => {
                let calls = project.client.stats();
                log(&format!(
                    "pass: {} in {} ({} list call{}, {} provider call{} in all), {} in {:.3}s",
                    crate::plan::plural(seen.instances, "instance"),
                    crate::plan::plural(seen.pages, "page"),
                    calls.list_calls - calls_before.list_calls,
                    if calls.list_calls - calls_before.list_calls == 1 {
                        ""
                    } else {
                        "s"
                    },
                    calls.calls - calls_before.calls,
                    if calls.calls - calls_before.calls == 1 {
                        ""
                    } else {
                        "s"
                    },
                    if seen.acted {
                        "changes applied"
                    } else {
                        "nothing to do"
                    },
                    took.as_secs_f64()
                ));
            }
            Ok(_) => {}
        }
        if options.once {
            break;
        }
        if let Some(why) = lease.as_ref().and_then(CloudLease::lost) {
            bail!(
                "this controller's lock of project `{}` was lost ({why}): another controller may \
                 act for it now, so this one stops",
                project.name
            );
        }
        let next = options.interval.saturating_sub(started.elapsed());
        if stop.wait(next).await {
            log("stopping: signal received");
            break;
        }
    }
    if let Some(task) = server {
        task.abort();
    }
    if let Some(lease) = lease {
        lease
            .release()
            .await
            .context("cannot release the controller's cloud lock")?;
    }
    Ok(())
}

/// One reconcile pass: observe and plan without the lock; when there is
/// something to do, lock, observe and plan again, apply, unlock.
/// What one pass saw and did.
struct PassSeen {
    /// Instances and list pages of its first observation.
    instances: u32,
    pages: u32,
    /// Whether it applied changes.
    acted: bool,
}

async fn pass(
    project: &mut Project,
    loaded: &LoadedSpec,
    watches: &mut Watches,
    options: &ControllerOptions,
    metrics: &Metrics,
    log: &(dyn Fn(&str) + Sync),
) -> Result<PassSeen> {
    if loaded.spec.project != project.name {
        bail!(
            "the spec now names project `{}`, not `{}`: restart the controller for another project",
            loaded.spec.project,
            project.name
        );
    }
    let mode = PlanMode::Maintain { heal: options.heal };
    let observed = project.observe().await?;
    metrics.observed(gauges(loaded, &observed), observed.pages);
    let with_runs = with_running_job_clusters(loaded, &observed);
    let choices = watches.decide(project, &with_runs, &observed, log).await?;
    let plan = plan(project, &with_runs, &observed, mode, &choices)?;
    let mut seen = PassSeen {
        instances: observed.instance_count() as u32,
        pages: observed.pages,
        acted: false,
    };
    if !plan.has_changes() {
        return Ok(seen);
    }

    let note = |line: &str| log(line);
    if let Err(e) = project.take_lock(CONTROLLER_COMMAND, &note).await {
        metrics.lock_busy();
        log(&format!("{e:#}; trying again at the next pass"));
        return Ok(seen);
    }
    let outcome = apply_under_lock(project, loaded, mode, &choices, options, metrics, log).await;
    let released = project.unlock().await;
    seen.acted = outcome?;
    released?;
    Ok(seen)
}

async fn apply_under_lock(
    project: &Project,
    loaded: &LoadedSpec,
    mode: PlanMode,
    choices: &ControllerChoices,
    options: &ControllerOptions,
    metrics: &Metrics,
    log: &(dyn Fn(&str) + Sync),
) -> Result<bool> {
    if let Some(note) = project.resume_interrupted().await? {
        log(&note);
    }
    let observed = project.observe().await?;
    // A job cluster whose run ended meanwhile is no longer planned for.
    let loaded = &with_running_job_clusters(loaded, &observed);
    let plan = plan(project, loaded, &observed, mode, choices)?;
    if !plan.has_changes() {
        return Ok(false); // someone else did it meanwhile
    }
    for change in plan.actionable() {
        let ops: Vec<String> = change.ops.iter().map(|op| op.describe()).collect();
        log(&format!(
            "{}: {} ({}): {}",
            change.address,
            change.action.as_str(),
            change.reasons.join("; "),
            ops.join(", ")
        ));
    }
    let apply = ApplyOptions {
        parallelism: options.parallelism,
        progress: ProgressMode::Quiet,
        ..ApplyOptions::default()
    };
    let report = project.apply(&plan, &apply).await?;
    for result in &report.results {
        metrics.change_done(result.action, result.outcome == crate::apply::Outcome::Done);
    }
    for failure in report.failures() {
        log(&format!("{}: FAILED: {}", failure.address, failure.outcome));
    }
    log(&report.summary_line());
    Ok(true)
}

fn plan(
    project: &Project,
    loaded: &LoadedSpec,
    observed: &Observed,
    mode: PlanMode,
    choices: &ControllerChoices,
) -> Result<Plan> {
    engine::plan_with_choices(
        &loaded.spec,
        &loaded.base_dir,
        observed,
        &project.client,
        mode,
        &Default::default(),
        &project.secret_key()?,
        choices,
    )
}

/// `loaded`, with the job clusters of runs still going whose job's
/// `new_cluster` autoscales added as clusters of the spec (as `run` adds
/// its own), so the controller sizes them like any autoscaled cluster. A job
/// cluster whose run ended (or expired) is not added: its run, or the
/// controller's removal of outlived job clusters, is what happens to it.
fn with_running_job_clusters<'a>(
    loaded: &'a LoadedSpec,
    observed: &Observed,
) -> std::borrow::Cow<'a, LoadedSpec> {
    let now = engine::unix_now();
    let mut with_runs = std::borrow::Cow::Borrowed(loaded);
    for name in observed.names(ResourceKind::Cluster) {
        if loaded.spec.clusters.contains_key(name) {
            continue;
        }
        let going = observed
            .members(ResourceKind::Cluster, name)
            .iter()
            .filter(|i| i.state.is_live())
            .find_map(|i| {
                let expires: u64 = i.tag(tags::EXPIRES)?.parse().ok()?;
                (expires > now).then_some(i.tag(tags::JOB)?)
            });
        let cluster = going
            .and_then(|job| loaded.spec.jobs.get(job))
            .and_then(|job| job.new_cluster.as_deref())
            .filter(|c| c.autoscale.is_some() && c.workers.is_none());
        if let Some(c) = cluster {
            // Copied only when a run's cluster is added: most passes add none.
            with_runs
                .to_mut()
                .spec
                .clusters
                .insert(name.to_string(), c.clone());
        }
    }
    with_runs
}

/// What the controller watches of clusters' drivers between passes.
#[derive(Default)]
struct Watches {
    autoscaler: autoscale::Autoscaler,
    idle: idle::IdleWatch,
}

impl Watches {
    /// Ask the drivers and decide, logging each decision.
    async fn decide(
        &mut self,
        project: &Project,
        loaded: &LoadedSpec,
        observed: &Observed,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<ControllerChoices> {
        let mut choices = ControllerChoices::default();
        // Sim nodes run no agent: there is no driver to ask.
        if project.client.capabilities().node_startup == motorpool_provider::NodeStartup::Simulated
        {
            return Ok(choices);
        }
        let credential = project.agent_credential()?;
        let reports = drivers::ask_all(&loaded.spec, observed, &credential).await;
        let (minute, now) = (engine::minute(), Instant::now());
        for r in self.autoscaler.decide(&loaded.spec, &reports, minute, now) {
            log(&format!(
                "cluster.{}: autoscale {} -> {} workers: {}",
                r.cluster, r.from, r.to, r.why
            ));
            choices.autoscaled.insert(r.cluster, r.to);
        }
        for stop in self.idle.decide(&loaded.spec, &reports, minute, now) {
            log(&format!("cluster.{}: stopping: {}", stop.cluster, stop.why));
            choices.stop_idle.insert(stop.cluster);
        }
        Ok(choices)
    }
}

/// What `/metrics` shows of the pools and clusters, from one observation.
fn gauges(loaded: &LoadedSpec, observed: &Observed) -> (Vec<PoolGauge>, Vec<(String, u32)>) {
    let live = |i: &&motorpool_provider::Instance| i.state.is_live();
    let pools = loaded
        .spec
        .pools
        .iter()
        .map(|(name, spec)| {
            let in_use = observed
                .names(ResourceKind::Cluster)
                .flat_map(|c| observed.members(ResourceKind::Cluster, c))
                .filter(live)
                .filter(|i| i.tag(tags::POOL) == Some(name.as_str()))
                .count() as u32;
            PoolGauge {
                name: name.clone(),
                idle: observed
                    .members(ResourceKind::Pool, name)
                    .iter()
                    .filter(live)
                    .count() as u32,
                in_use,
                min_idle: spec.min_idle,
                max_capacity: spec.max_capacity,
            }
        })
        .collect();
    let clusters = observed
        .names(ResourceKind::Cluster)
        .map(|name| {
            let nodes = observed
                .members(ResourceKind::Cluster, name)
                .iter()
                .filter(live)
                .count() as u32;
            (name.to_string(), nodes)
        })
        .collect();
    (pools, clusters)
}

/// SIGINT and SIGTERM, as a service manager or a terminal sends them.
struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Sleep `for_` unless a signal comes first: true when one came.
    async fn wait(&mut self, for_: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(for_) => false,
            _ = self.interrupt.recv() => true,
            _ = self.terminate.recv() => true,
        }
    }
}
