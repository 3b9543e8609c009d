//! Starting a cluster from the engine's side.
//!
//! Where the engine can reach the agents (providers whose nodes are
//! [`NodeStartup::EngineDriven`]), it runs the startup saga
//! ([`super::saga`]) over them: [`AgentNodes`] carries each step out through
//! the agents' `RunStep`/`StartRuntime` calls and tags each node with the
//! last step it finished (`motorpool-step`). Where it cannot (nodes that
//! start themselves from their user data), it waits for the nodes' own step
//! tags to reach `ready`. Either way a failed step names the node, the step
//! and the end of its stderr.
//!
//! [`NodeStartup::EngineDriven`]: motorpool_provider::NodeStartup::EngineDriven

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use motorpool_provider::{Instance, InstanceState, Retag, TagFilter, tags};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use super::saga::{self, Formation, SagaInput, StartupError, StartupNodes};
use super::steps::{self, StepContext};
use super::template::Templates;
use super::{BootSpec, Step};
use crate::auth::{AttachCredential, Credential};
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::{self as proto, RunStepRequest};
use crate::proto::roles;
use crate::providers::ProviderClient;
use crate::words::Role;

/// What startup needs besides the plan.
pub struct BootContext {
    pub project: String,
    /// The project secret, which the cluster credentials derive from.
    pub project_secret: Credential,
    /// What the project's agents accept.
    pub agent_credential: Credential,
    pub steps: StepContext,
    pub templates: Templates,
    /// How long the driver may take to see every worker registered (the
    /// saga's ready step); on a cloud also how long apply waits for every
    /// node to tag itself ready.
    pub ready_timeout: Duration,
    pub home: PathBuf,
    /// How a node reaches its own provider (written into its agent config).
    pub node_provider: crate::words::NodeProvider,
    /// Cloud nodes, which start themselves from their user data; None on
    /// the local provider and the simulator.
    pub cloud: Option<super::cloud::CloudNodes>,
    /// What launched nodes serve TLS with: a certificate from the project CA.
    pub node_tls: Option<crate::tls::NodeTls>,
}

type Agent = AgentClient<InterceptedService<Channel, AttachCredential>>;

/// One node being started.
struct Node {
    id: String,
    role: Role,
    agent: Agent,
}

pub use super::saga::StartupReport;

/// Why an agent could not be reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentUnreachable {
    #[error("cannot connect to the agent at {address}: {reason}")]
    Endpoint { address: String, reason: String },
    #[error("cannot reach the agent at {address}: {reason}")]
    Connect { address: String, reason: String },
}

/// Connect to an agent with the project's agent credential (over TLS,
/// verified against the credential's project CA, where [`crate::tls::required`]).
pub async fn connect(address: &str, credential: &Credential) -> Result<Agent, AgentUnreachable> {
    let channel = crate::tls::endpoint(address, credential.trust())
        .map_err(|e| AgentUnreachable::Endpoint {
            address: address.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| AgentUnreachable::Connect {
            address: address.to_string(),
            reason: crate::tls::error_chain(&e),
        })?;
    Ok(AgentClient::with_interceptor(
        channel,
        AttachCredential(credential.clone()),
    ))
}

/// Run one step request (of startup step `of`) on a node to its end; Err
/// names the node and the stderr tail.
async fn run_step(
    node: &Node,
    of: Step,
    request: RunStepRequest,
) -> Result<Duration, StartupError> {
    let failed = |message: String| StartupError::at(of, message);
    let step = request.step.clone();
    let timeout = request.timeout_seconds;
    let mut agent = node.agent.clone();
    let mut stream = agent
        .run_step(request)
        .await
        .map_err(|e| {
            failed(format!(
                "node {} refused step {step}: {}",
                node.id,
                e.message()
            ))
        })?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(proto::StepEvent {
                event: Some(proto::step_event::Event::Finished(f)),
            })) => {
                if f.exit_code == 0 {
                    return Ok(Duration::from_millis(f.duration_ms));
                }
                if f.timed_out {
                    return Err(failed(format!(
                        "step {step} timed out on node {} after {}: killed (raise `startup_timeout_minutes` if it needs longer)",
                        node.id,
                        seconds_text(timeout)
                    )));
                }
                let tail = if f.stderr_tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n{}", f.stderr_tail)
                };
                return Err(failed(format!(
                    "step {step} failed on node {} (exit {}){tail}",
                    node.id, f.exit_code
                )));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(failed(format!(
                    "node {} ended step {step} without a result",
                    node.id
                )));
            }
            Err(e) => {
                return Err(failed(format!(
                    "node {} lost step {step}: {}",
                    node.id,
                    e.message()
                )));
            }
        }
    }
}

/// `90s`, `2m`, `1m30s`.
fn seconds_text(s: u32) -> String {
    match (s / 60, s % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// Run the same step on every node at once; the slowest node's time.
async fn everywhere(
    nodes: &[Node],
    of: Step,
    request: &RunStepRequest,
) -> Result<Duration, StartupError> {
    let results = join_all(nodes.iter().map(|n| run_step(n, of, request.clone()))).await;
    let mut slowest = Duration::ZERO;
    for r in results {
        slowest = slowest.max(r?);
    }
    Ok(slowest)
}

/// A cluster's nodes, driven from here through their agents.
pub struct AgentNodes<'a> {
    client: &'a ProviderClient,
    nodes: Vec<Node>,
    ids: Vec<String>,
    driver: usize,
}

impl AgentNodes<'_> {
    fn workers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == Role::Worker)
    }
}

#[async_trait]
impl StartupNodes for AgentNodes<'_> {
    async fn record(&self, step: Step, took: Duration) -> Result<(), StartupError> {
        everywhere(
            &self.nodes,
            step,
            &steps::recorded(step, took.as_millis() as u64),
        )
        .await
        .map(|_| ())
    }

    async fn run_script(
        &self,
        step: Step,
        request: RunStepRequest,
    ) -> Result<Duration, StartupError> {
        everywhere(&self.nodes, step, &request).await
    }

    async fn form(&self, formation: &Formation) -> Result<bool, StartupError> {
        let failed = |e: String| StartupError::at(Step::Formation, e);
        let driver = &self.nodes[self.driver];
        // Running already (the cluster grows, heals or re-starts): then a
        // later failure must not stop it.
        let was_running = driver
            .agent
            .clone()
            .get_state(proto::GetStateRequest {})
            .await
            .map(|s| s.into_inner())
            .is_ok_and(|s| s.runtime_role == roles::DRIVER && !s.driver_address.is_empty());
        let driver_address = driver
            .agent
            .clone()
            .start_runtime(formation.start_request(None))
            .await
            .map_err(|e| {
                failed(format!(
                    "the driver on node {} did not start: {}",
                    driver.id,
                    e.message()
                ))
            })?
            .into_inner()
            .address;
        let started = join_all(self.workers().map(|n| {
            let mut agent = n.agent.clone();
            let request = formation.start_request(Some(&driver_address));
            async move {
                agent.start_runtime(request).await.map_err(|e| {
                    format!(
                        "the executor on node {} did not start: {}",
                        n.id,
                        e.message()
                    )
                })
            }
        }))
        .await;
        if let Some(e) = started.into_iter().find_map(Result::err) {
            if !was_running {
                self.stop_roles().await;
            }
            return Err(failed(e));
        }
        Ok(!was_running)
    }

    async fn registered_workers(&self) -> Result<Option<usize>, StartupError> {
        let driver = &self.nodes[self.driver];
        let status = driver
            .agent
            .clone()
            .driver_status(proto::DriverStatusRequest {})
            .await
            .map_err(|e| {
                StartupError::at(
                    Step::Ready,
                    format!(
                        "the driver on node {} does not answer: {}",
                        driver.id,
                        e.message()
                    ),
                )
            })?
            .into_inner();
        Ok(Some(status.executors.len()))
    }

    async fn finished(&self, step: Step, boot_hash: Option<&str>) -> Result<(), StartupError> {
        let mut set = BTreeMap::new();
        set.insert(tags::STEP.to_string(), step.name().to_string());
        if let Some(hash) = boot_hash {
            set.insert(tags::BOOT.to_string(), hash.to_string());
        }
        self.client
            .retag(
                &self.ids,
                &Retag {
                    set,
                    remove: vec![],
                },
            )
            .await
            .map_err(|e| StartupError::at(step, format!("cannot tag the nodes' step: {e}")))
    }

    async fn stop_roles(&self) {
        let stops = self.nodes.iter().map(|n| {
            let mut agent = n.agent.clone();
            async move {
                let _ = agent.stop_runtime(proto::StopRuntimeRequest {}).await;
            }
        });
        join_all(stops).await;
    }
}

/// Start a cluster whose instances are allocated and running.
pub async fn start_cluster(
    ctx: &BootContext,
    client: &ProviderClient,
    cluster: &str,
    spec: &BootSpec,
    instances: &[Instance],
    allocate: Duration,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<StartupReport, StartupError> {
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    if !client.capabilities().nodes_are_reachable() {
        return wait_for_ready_tags(ctx, client, cluster, &ids).await;
    }
    let mut nodes = Vec::new();
    for i in instances {
        let role = match i.tag(tags::ROLE).and_then(Role::parse) {
            Some(Role::Driver) => Role::Driver,
            _ => Role::Worker,
        };
        let Some(address) = i.address.as_deref() else {
            return Err(StartupError::at(
                Step::Allocate,
                format!(
                    "node {} has no address: the {} provider reported none",
                    i.id,
                    client.kind()
                ),
            ));
        };
        let agent = connect(address, &ctx.agent_credential)
            .await
            .map_err(|e| StartupError::at(Step::Allocate, e.to_string()))?;
        nodes.push(Node {
            id: i.id.clone(),
            role,
            agent,
        });
    }
    let Some(driver) = nodes.iter().position(|n| n.role == Role::Driver) else {
        return Err(StartupError::at(
            Step::Allocate,
            format!("cluster {cluster} has no driver node"),
        ));
    };
    let agent_nodes = AgentNodes {
        client,
        nodes,
        ids,
        driver,
    };
    let input = SagaInput {
        templates: &ctx.templates,
        steps: &ctx.steps,
        spec,
        formation: Formation::new(
            cluster,
            crate::auth::cluster_credential(&ctx.project_secret, &ctx.project, cluster)
                .expose()
                .to_string(),
            spec,
        ),
        allocate,
        ready_timeout: ctx.ready_timeout,
        progress,
    };
    saga::run(&agent_nodes, &input).await
}

/// Clouds: the nodes start themselves; wait until every one tags itself ready.
async fn wait_for_ready_tags(
    ctx: &BootContext,
    client: &ProviderClient,
    cluster: &str,
    ids: &[String],
) -> Result<StartupReport, StartupError> {
    let mut filter = TagFilter::new();
    filter.insert(tags::PROJECT.into(), ctx.project.clone());
    filter.insert(tags::NAME.into(), cluster.to_string());
    let t = Instant::now();
    let deadline = t + ctx.ready_timeout;
    loop {
        let listed = client
            .list_all(&filter)
            .await
            .map_err(|e| StartupError::at(Step::Ready, e.to_string()))?;
        let steps: BTreeMap<&str, (Option<&str>, InstanceState)> = listed
            .iter()
            .map(|i| (i.id.as_str(), (i.tag(tags::STEP), i.state)))
            .collect();
        let reasons: BTreeMap<&str, &str> = listed
            .iter()
            .filter_map(|i| Some((i.id.as_str(), i.tag(tags::FAILURE)?)))
            .collect();
        let waiting: Vec<String> = ids
            .iter()
            .filter(|id| steps.get(id.as_str()).and_then(|(s, _)| *s) != Some(Step::Ready.name()))
            .map(|id| {
                let last = steps
                    .get(id.as_str())
                    .and_then(|(s, _)| *s)
                    .unwrap_or("none");
                format!("{id} (last step: {last})")
            })
            .collect();
        if waiting.is_empty() {
            return Ok(StartupReport {
                steps: vec![(Step::Ready, t.elapsed())],
            });
        }
        let failed: Vec<String> = ids
            .iter()
            .filter_map(|id| {
                let step = steps.get(id.as_str()).and_then(|(s, _)| *s)?;
                let at = step.strip_prefix("failed:")?;
                Some(match reasons.get(id.as_str()) {
                    Some(why) => format!("{id} (failed at {at}: {why})"),
                    None => format!("{id} (failed at {at}; its agent log says why)"),
                })
            })
            .collect();
        if !failed.is_empty() {
            return Err(StartupError::at(
                Step::Ready,
                format!(
                    "startup failed on {}: {}",
                    crate::words::plural(failed.len() as u32, "node"),
                    failed.join(", ")
                ),
            ));
        }
        if Instant::now() >= deadline {
            return Err(StartupError::at(
                Step::Ready,
                format!(
                    "{} never reported ready within {}s: {}",
                    crate::words::plural(waiting.len() as u32, "node"),
                    ctx.ready_timeout.as_secs(),
                    waiting.join(", ")
                ),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_secs(2).min(left.max(Duration::from_millis(50)))).await;
    }
}
