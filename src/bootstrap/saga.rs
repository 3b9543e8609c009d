//! The cluster startup saga: the seven steps declared once ([`SAGA`]), each
//! with its action and its undo, and one runner ([`run`]) for both ways a
//! cluster starts.
//!
//! The runner never talks to a node itself: it asks a [`StartupNodes`],
//! which is either the engine reaching every node's agent over gRPC (local
//! provider: `super::run::AgentNodes`) or a cloud node running the saga on
//! itself and reporting through its own tags (`crate::agent::node`). Either
//! way the same steps run in the same order, with one ready rule (the
//! driver reports every worker the spec asks for) and one timeout per step
//! (`startup_timeout_minutes`). When a step fails, the undos of the steps
//! that finished run in reverse (formation's: stop the engine's roles), so a
//! half-started cluster never takes jobs; what allocation did is the plan's
//! to undo (the next apply heals or removes the cluster).

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::steps::{self, StepContext};
use super::template::Templates;
use crate::proto::agent::RunStepRequest;
use crate::words::{BootSpec, Step};

/// A step's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done by apply before the saga (request, allocate): only recorded.
    Recorded,
    /// The node's runtime (skipped by its key on warm pool instances).
    Runtime,
    /// The engine's roles: the driver, then every worker joining it.
    Formation,
    /// Libraries, then the init scripts in order.
    Libraries,
    /// Mounts (the cluster credential has guarded the engine since formation).
    Security,
    /// Wait until the driver reports every worker registered.
    Ready,
}

/// What undoes a step when a later one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// Nothing to undo: a script step is idempotent by its key, and what
    /// allocation did is undone by the plan.
    Nothing,
    /// Stop the engine's roles on the nodes.
    StopRoles,
}

/// One declared step.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    pub step: Step,
    pub action: Action,
    pub undo: Undo,
}

/// The seven steps, in order: the one declaration both ways of starting run.
pub const SAGA: [Declared; 7] = [
    Declared {
        step: Step::Request,
        action: Action::Recorded,
        undo: Undo::Nothing,
    },
    Declared {
        step: Step::Allocate,
        action: Action::Recorded,
        undo: Undo::Nothing,
    },
    Declared {
        step: Step::Runtime,
        action: Action::Runtime,
        undo: Undo::Nothing,
    },
    Declared {
        step: Step::Formation,
        action: Action::Formation,
        undo: Undo::StopRoles,
    },
    Declared {
        step: Step::Libraries,
        action: Action::Libraries,
        undo: Undo::Nothing,
    },
    Declared {
        step: Step::Security,
        action: Action::Security,
        undo: Undo::Nothing,
    },
    Declared {
        step: Step::Ready,
        action: Action::Ready,
        undo: Undo::Nothing,
    },
];

/// Why a step failed: the step, and what the nodes said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", step.title())]
pub struct StartupError {
    pub step: Step,
    pub message: String,
}

impl StartupError {
    pub fn at(step: Step, message: impl Into<String>) -> StartupError {
        StartupError {
            step,
            message: message.into(),
        }
    }
}

/// What formation starts, the same for every node.
#[derive(Debug, Clone)]
pub struct Formation {
    pub cluster: String,
    /// The cluster's credential: it guards the engine's roles.
    pub credential: String,
    pub engine: String,
    pub engine_version: String,
    pub engine_conf: std::collections::BTreeMap<String, String>,
    pub autotermination_minutes: u32,
    /// A worker node's cores and memory (0: not told).
    pub worker_cores: u32,
    pub worker_memory_mb: u32,
}

impl Formation {
    /// What `spec`'s cluster forms with.
    pub fn new(cluster: &str, credential: String, spec: &BootSpec) -> Formation {
        Formation {
            cluster: cluster.to_string(),
            credential,
            engine: spec.engine.clone(),
            engine_version: spec.engine_version.clone(),
            engine_conf: spec.engine_conf.clone(),
            autotermination_minutes: spec.autotermination_minutes.unwrap_or(0),
            worker_cores: spec.worker_cores,
            worker_memory_mb: spec.worker_memory_mb,
        }
    }

    /// The agent's request to start the driver (`driver_address: None`) or
    /// a worker joining the driver at `driver_address`.
    pub fn start_request(
        &self,
        driver_address: Option<&str>,
    ) -> crate::proto::agent::StartRuntimeRequest {
        crate::proto::agent::StartRuntimeRequest {
            role: if driver_address.is_none() {
                crate::proto::roles::DRIVER
            } else {
                crate::proto::roles::EXECUTOR
            }
            .into(),
            cluster: self.cluster.clone(),
            cluster_credential: self.credential.clone(),
            driver_address: driver_address.unwrap_or_default().to_string(),
            cores: 0,
            autotermination_minutes: if driver_address.is_none() {
                self.autotermination_minutes
            } else {
                0
            },
            engine: self.engine.clone(),
            engine_version: self.engine_version.clone(),
            engine_conf: self.engine_conf.clone().into_iter().collect(),
            node_cores: self.worker_cores,
            node_memory_mb: self.worker_memory_mb,
        }
    }
}

/// The nodes a saga runs on: all of a cluster's, driven over gRPC, or a
/// cloud node by itself.
#[async_trait]
pub trait StartupNodes: Send + Sync {
    /// Record a step on the nodes' own status (what `motorpool status`
    /// shows), taking `took`: the steps apply did itself (request,
    /// allocate), and the steps whose work has other names (formation, the
    /// libraries' init scripts, ready).
    async fn record(&self, step: Step, took: Duration) -> Result<(), StartupError>;

    /// Run one rendered step on every node in scope; the slowest node's time.
    async fn run_script(
        &self,
        step: Step,
        request: RunStepRequest,
    ) -> Result<Duration, StartupError>;

    /// Start the engine's roles: the driver, then workers joining it.
    /// Returns whether the driver started now (false: it was running
    /// already, e.g. a running cluster that grows or heals). When a worker
    /// fails to start, a driver started now is stopped again before the
    /// error: a half-formed cluster never takes jobs.
    async fn form(&self, formation: &Formation) -> Result<bool, StartupError>;

    /// The workers the driver reports registered; `None` where no driver
    /// is in scope (a worker node starting itself has nothing to wait for).
    async fn registered_workers(&self) -> Result<Option<usize>, StartupError>;

    /// Say that `step` finished on the nodes in scope (their
    /// `motorpool-step` tag); `boot_hash` is the startup's hash, given with
    /// `ready`.
    async fn finished(&self, step: Step, boot_hash: Option<&str>) -> Result<(), StartupError>;

    /// Formation's undo: stop the engine's roles.
    async fn stop_roles(&self);
}

/// What a saga needs besides its nodes.
pub struct SagaInput<'a> {
    pub templates: &'a Templates,
    pub steps: &'a StepContext,
    pub spec: &'a BootSpec,
    pub formation: Formation,
    /// How long allocation took (apply's part).
    pub allocate: Duration,
    /// How long the driver may take to see every worker registered (the
    /// provider's `ready_timeout_minutes`): the ready rule, the same
    /// wherever the saga runs.
    pub ready_timeout: Duration,
    pub progress: &'a (dyn Fn(String) + Send + Sync),
}

/// How long each step took (the slowest node's time).
#[derive(Debug, Clone, Default)]
pub struct StartupReport {
    pub steps: Vec<(Step, Duration)>,
}

impl StartupReport {
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|(_, d)| *d).sum()
    }
}

/// Run the saga on `nodes`: every step in order; on a failure, the undos
/// of the finished steps in reverse, then the error. Formation is undone
/// only when this run formed the cluster: a running cluster whose
/// re-start fails (a new node's library, say) keeps running its jobs.
pub async fn run(
    nodes: &dyn StartupNodes,
    input: &SagaInput<'_>,
) -> Result<StartupReport, StartupError> {
    let mut report = StartupReport::default();
    let mut formed_now = false;
    for (index, declared) in SAGA.iter().enumerate() {
        let t = Instant::now();
        match perform(nodes, input, declared).await {
            Ok(formed) => formed_now |= formed,
            Err(e) => {
                for done in SAGA[..index].iter().rev() {
                    if done.undo == Undo::StopRoles && formed_now {
                        nodes.stop_roles().await;
                    }
                }
                return Err(e);
            }
        }
        let took = match declared.step {
            Step::Request => Duration::ZERO,
            Step::Allocate => input.allocate,
            _ => t.elapsed(),
        };
        report.steps.push((declared.step, took));
    }
    Ok(report)
}

/// Carry one step out; true when it formed the cluster anew.
async fn perform(
    nodes: &dyn StartupNodes,
    input: &SagaInput<'_>,
    declared: &Declared,
) -> Result<bool, StartupError> {
    let step = declared.step;
    let render = |e: minijinja::Error| StartupError::at(step, format!("cannot render: {e}"));
    let t = Instant::now();
    match declared.action {
        Action::Recorded => {
            let took = if step == Step::Allocate {
                input.allocate
            } else {
                Duration::ZERO
            };
            nodes.record(step, took).await?;
            if step != Step::Request {
                nodes.finished(step, None).await?;
            }
            Ok(false)
        }
        Action::Runtime => {
            let request =
                steps::runtime(input.templates, input.steps, input.spec).map_err(render)?;
            nodes.run_script(step, request).await?;
            (input.progress)(format!(
                "{}: os & runtime setup done ({:.1}s)",
                input.formation.cluster,
                t.elapsed().as_secs_f64()
            ));
            nodes.finished(step, None).await?;
            Ok(false)
        }
        Action::Formation => {
            let formed = nodes.form(&input.formation).await?;
            nodes.record(step, t.elapsed()).await?;
            nodes.finished(step, None).await?;
            Ok(formed)
        }
        Action::Libraries => {
            if let Some(request) =
                steps::libraries(input.templates, input.steps, input.spec).map_err(render)?
            {
                nodes.run_script(step, request).await?;
            }
            for script in
                steps::init_scripts(input.templates, input.steps, input.spec).map_err(render)?
            {
                let name = script.step.clone();
                nodes.run_script(step, script).await?;
                (input.progress)(format!("{}: {name} done", input.formation.cluster));
            }
            nodes.record(step, t.elapsed()).await?;
            nodes.finished(step, None).await?;
            Ok(false)
        }
        Action::Security => {
            match steps::mounts(input.templates, input.steps, input.spec).map_err(render)? {
                Some(request) => {
                    nodes.run_script(step, request).await?;
                }
                None => nodes.record(step, Duration::ZERO).await?,
            }
            nodes.finished(step, None).await?;
            Ok(false)
        }
        Action::Ready => {
            let want = input.spec.workers as usize;
            let deadline = t + input.ready_timeout;
            let mut delay = Duration::from_millis(5);
            loop {
                // A failed look is "not yet" until the deadline: the driver
                // may be busy starting.
                match nodes.registered_workers().await {
                    Ok(None) => break,
                    Ok(Some(have)) if have >= want => break,
                    Ok(Some(have)) if Instant::now() >= deadline => {
                        return Err(StartupError::at(
                            step,
                            format!(
                                "only {have} of {want} workers registered with the driver within {}s",
                                input.ready_timeout.as_secs()
                            ),
                        ));
                    }
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Ok(Some(_)) | Err(_) => {}
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            nodes.record(step, t.elapsed()).await?;
            let hash = input.spec.hash();
            nodes.finished(step, Some(&hash)).await?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::words::STEPS;

    #[test]
    fn the_saga_declares_the_seven_steps_in_order_and_undoes_formation() {
        let declared: Vec<Step> = SAGA.iter().map(|d| d.step).collect();
        assert_eq!(declared, STEPS.to_vec());
        let undone: Vec<Step> = SAGA
            .iter()
            .filter(|d| d.undo != Undo::Nothing)
            .map(|d| d.step)
            .collect();
        assert_eq!(undone, vec![Step::Formation]);
    }
}
