//! Running a cluster's startup steps over its nodes' agents, in order, and
//! tagging each node with the last step it finished (`motorpool-step`).
//!
//! Where the engine can reach the agents (the local provider), it drives
//! each step through the agent's `RunStep`/`StartRuntime` calls. Where it
//! cannot (clouds, where nodes bootstrap themselves from their user data),
//! it waits for the nodes' own step tags to reach `ready`. Either way a
//! failed step names the node, the step and the end of its stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use motorpool_provider::{Instance, InstanceState, Retag, TagFilter, tags};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use super::steps::{self, StepContext};
use super::template::Templates;
use super::{BootSpec, Step};
use crate::agent::AgentClient;
use crate::agent::proto::{self, RunStepRequest};
use crate::auth::{AttachCredential, Credential};
use crate::plan::Role;
use crate::providers::ProviderClient;

/// What startup needs besides the plan.
pub struct BootContext {
    pub project: String,
    /// The project secret, which the cluster credentials derive from.
    pub project_secret: Credential,
    /// What the project's agents accept.
    pub agent_credential: Credential,
    pub steps: StepContext,
    pub templates: Templates,
    /// How long a cluster may take from formation to every executor
    /// registered (on a cloud: from running to every node tagged ready).
    pub ready_timeout: Duration,
    pub home: PathBuf,
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

/// Connect to an agent with the project's agent credential (over TLS,
/// verified against the credential's project CA, where [`crate::tls::required`]).
pub async fn connect(address: &str, credential: &Credential) -> Result<Agent, String> {
    let channel = crate::tls::endpoint(address, credential.trust())
        .map_err(|e| format!("cannot connect to the agent at {address}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| {
            format!(
                "cannot reach the agent at {address}: {}",
                crate::tls::error_chain(&e)
            )
        })?;
    Ok(AgentClient::with_interceptor(
        channel,
        AttachCredential(credential.clone()),
    ))
}

/// Run one step request on a node to its end; Err names the node and the stderr tail.
async fn run_step(node: &Node, request: RunStepRequest) -> Result<Duration, String> {
    let step = request.step.clone();
    let timeout = request.timeout_seconds;
    let mut agent = node.agent.clone();
    let mut stream = agent
        .run_step(request)
        .await
        .map_err(|e| format!("node {} refused step {step}: {}", node.id, e.message()))?
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
                    return Err(format!(
                        "step {step} timed out on node {} after {}: killed (raise `startup_timeout_minutes` if it needs longer)",
                        node.id,
                        seconds_text(timeout)
                    ));
                }
                let tail = if f.stderr_tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n{}", f.stderr_tail)
                };
                return Err(format!(
                    "step {step} failed on node {} (exit {}){tail}",
                    node.id, f.exit_code
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "node {} ended step {step} without a result",
                    node.id
                ));
            }
            Err(e) => {
                return Err(format!(
                    "node {} lost step {step}: {}",
                    node.id,
                    e.message()
                ));
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
async fn everywhere(nodes: &[Node], request: &RunStepRequest) -> Result<Duration, String> {
    let results = join_all(nodes.iter().map(|n| run_step(n, request.clone()))).await;
    let mut slowest = Duration::ZERO;
    for r in results {
        slowest = slowest.max(r?);
    }
    Ok(slowest)
}

async fn record(nodes: &[Node], step: Step, took: Duration) -> Result<(), String> {
    everywhere(nodes, &steps::recorded(step, took.as_millis() as u64))
        .await
        .map(|_| ())
}

async fn tag_step(client: &ProviderClient, ids: &[String], step: Step) -> Result<(), String> {
    let mut set = BTreeMap::new();
    set.insert(tags::STEP.to_string(), step.name().to_string());
    client
        .retag(
            ids,
            &Retag {
                set,
                remove: vec![],
            },
        )
        .await
        .map_err(|e| format!("cannot tag the nodes' step: {e}"))
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
) -> Result<StartupReport, String> {
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    if instances.iter().any(|i| i.address.is_none()) {
        return wait_for_ready_tags(ctx, client, cluster, &ids).await;
    }
    let mut report = StartupReport::default();
    let mut nodes = Vec::new();
    for i in instances {
        let role = match i.tag(tags::ROLE) {
            Some("driver") => Role::Driver,
            _ => Role::Worker,
        };
        let address = i.address.as_deref().unwrap_or_default();
        nodes.push(Node {
            id: i.id.clone(),
            role,
            agent: connect(address, &ctx.agent_credential).await?,
        });
    }
    let Some(driver_index) = nodes.iter().position(|n| n.role == Role::Driver) else {
        return Err(format!("cluster {cluster} has no driver node"));
    };

    // 1, 2: done by apply; recorded on the nodes so status shows all seven.
    record(&nodes, Step::Request, Duration::ZERO).await?;
    record(&nodes, Step::Allocate, allocate).await?;
    report.steps.push((Step::Request, Duration::ZERO));
    report.steps.push((Step::Allocate, allocate));
    tag_step(client, &ids, Step::Allocate).await?;

    // 3. os & runtime setup (skipped on warm pool instances: same key, already done).
    let t = Instant::now();
    let runtime = steps::runtime(&ctx.templates, &ctx.steps, spec).map_err(|e| e.to_string())?;
    everywhere(&nodes, &runtime).await?;
    report.steps.push((Step::Runtime, t.elapsed()));
    tag_step(client, &ids, Step::Runtime).await?;
    progress(format!(
        "{cluster}: os & runtime setup done ({:.1}s)",
        t.elapsed().as_secs_f64()
    ));

    // 4. formation: the driver, then every executor registers with it.
    let t = Instant::now();
    let credential = crate::auth::cluster_credential(&ctx.project_secret, &ctx.project, cluster);
    let driver = &nodes[driver_index];
    let driver_address = driver
        .agent
        .clone()
        .start_runtime(proto::StartRuntimeRequest {
            role: "driver".into(),
            cluster: cluster.to_string(),
            cluster_credential: credential.expose().to_string(),
            driver_address: String::new(),
            cores: 0,
            autotermination_minutes: spec.autotermination_minutes.unwrap_or(0),
        })
        .await
        .map_err(|e| {
            format!(
                "the driver on node {} did not start: {}",
                driver.id,
                e.message()
            )
        })?
        .into_inner()
        .address;
    let workers: Vec<&Node> = nodes.iter().filter(|n| n.role == Role::Worker).collect();
    let started = join_all(workers.iter().map(|n| {
        let mut agent = n.agent.clone();
        let request = proto::StartRuntimeRequest {
            role: "executor".into(),
            cluster: cluster.to_string(),
            cluster_credential: credential.expose().to_string(),
            driver_address: driver_address.clone(),
            cores: 0,
            autotermination_minutes: 0,
        };
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
    for s in started {
        s?;
    }
    let formation = t.elapsed();
    record(&nodes, Step::Formation, formation).await?;
    report.steps.push((Step::Formation, formation));
    tag_step(client, &ids, Step::Formation).await?;

    // 5. libraries, then the init scripts in order.
    let t = Instant::now();
    if let Some(libraries) =
        steps::libraries(&ctx.templates, &ctx.steps, spec).map_err(|e| e.to_string())?
    {
        everywhere(&nodes, &libraries).await?;
    }
    for script in
        steps::init_scripts(&ctx.templates, &ctx.steps, spec).map_err(|e| e.to_string())?
    {
        let name = script.step.clone();
        everywhere(&nodes, &script).await?;
        progress(format!("{cluster}: {name} done"));
    }
    let libraries = t.elapsed();
    record(&nodes, Step::Libraries, libraries).await?;
    report.steps.push((Step::Libraries, libraries));
    tag_step(client, &ids, Step::Libraries).await?;

    // 6. security & access: mounts (the credential has guarded the runtime since formation).
    let t = Instant::now();
    match steps::mounts(&ctx.templates, &ctx.steps, spec).map_err(|e| e.to_string())? {
        Some(mounts) => {
            everywhere(&nodes, &mounts).await?;
        }
        None => record(&nodes, Step::Security, Duration::ZERO).await?,
    }
    report.steps.push((Step::Security, t.elapsed()));
    tag_step(client, &ids, Step::Security).await?;

    // 7. ready: every executor registered with the driver.
    let t = Instant::now();
    let deadline = t + ctx.ready_timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        let status = driver
            .agent
            .clone()
            .driver_status(proto::DriverStatusRequest {})
            .await
            .map_err(|e| {
                format!(
                    "the driver on node {} does not answer: {}",
                    driver.id,
                    e.message()
                )
            })?
            .into_inner();
        if status.executors.len() >= workers.len() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {} executors registered with the driver within {}s",
                status.executors.len(),
                workers.len(),
                ctx.ready_timeout.as_secs()
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    let ready = t.elapsed();
    record(&nodes, Step::Ready, ready).await?;
    report.steps.push((Step::Ready, ready));
    let mut set = BTreeMap::new();
    set.insert(tags::STEP.to_string(), Step::Ready.name().to_string());
    set.insert(tags::BOOT.to_string(), spec.hash());
    client
        .retag(
            &ids,
            &Retag {
                set,
                remove: vec![],
            },
        )
        .await
        .map_err(|e| format!("cannot tag the nodes ready: {e}"))?;
    Ok(report)
}

/// Clouds: the nodes start themselves; wait until every one tags itself ready.
async fn wait_for_ready_tags(
    ctx: &BootContext,
    client: &ProviderClient,
    cluster: &str,
    ids: &[String],
) -> Result<StartupReport, String> {
    let mut filter = TagFilter::new();
    filter.insert(tags::PROJECT.into(), ctx.project.clone());
    filter.insert(tags::NAME.into(), cluster.to_string());
    let t = Instant::now();
    let deadline = t + ctx.ready_timeout;
    loop {
        let listed = client.list_all(&filter).await.map_err(|e| e.to_string())?;
        let steps: BTreeMap<&str, (Option<&str>, InstanceState)> = listed
            .iter()
            .map(|i| (i.id.as_str(), (i.tag(tags::STEP), i.state)))
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
                Some(format!("{id} (failed at {at})"))
            })
            .collect();
        if !failed.is_empty() {
            return Err(format!(
                "startup failed on {}: {}; the node's agent log says why",
                crate::plan::plural(failed.len() as u32, "node"),
                failed.join(", ")
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} never reported ready within {}s: {}",
                crate::plan::plural(waiting.len() as u32, "node"),
                ctx.ready_timeout.as_secs(),
                waiting.join(", ")
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_secs(2).min(left.max(Duration::from_millis(50)))).await;
    }
}
