//! What a node does on its own, through its provider, as a cloud VM does
//! with its instance role: warm itself up when it joins a pool (runtime setup
//! and preloaded libraries, then tag itself `motorpool-step=runtime`); on a
//! cloud, where the engine cannot reach it, run its cluster's startup steps
//! itself and report each one in its `motorpool-step` tag ([`ClusterBoot`]);
//! and, on a driver node, stop its idle cluster (autotermination).
//!
//! Self-started cluster nodes find each other through the provider: the
//! driver tags its instance with the address its driver listens on
//! (`motorpool-driver-address`), and each worker lists the cluster's
//! instances with role `driver` until that tag appears.
//!
//! Autotermination sends each worker back to its pool (re-tagged idle, its
//! executor stopped) or terminates it, then marks the driver instance
//! `motorpool-autoterminated` and stops it. The stopped driver is the record
//! that the cluster ended on purpose: `plan` shows it as such, not as drift,
//! and only `apply --start CLUSTER` or `run` brings it back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use motorpool_provider::{Instance, Retag, TagFilter, tags};

use super::proto::{RunStepRequest, StopRuntimeRequest};
use super::runtime_host::RuntimeHost;
use super::steps::StepRunner;
use crate::auth::Credential;
use crate::bootstrap::saga::{self, StartupNodes};
use crate::bootstrap::steps::{self as boot_steps, StepContext};
use crate::bootstrap::template::Templates;
use crate::bootstrap::{BootSpec, Step};
use crate::providers::ProviderClient;
use crate::words::Role;

pub use crate::words::{ClusterBoot, NodeProvider, WarmStep, cluster_boot_name};

impl From<&RunStepRequest> for WarmStep {
    fn from(r: &RunStepRequest) -> Self {
        WarmStep {
            step: r.step.clone(),
            script: r.script.clone(),
            key: r.key.clone(),
            timeout_seconds: r.timeout_seconds,
        }
    }
}

/// The node's view of itself.
pub struct Node {
    pub instance_id: String,
    pub project: String,
    /// Its provider, through the retrying, rate-limited client.
    pub provider: Arc<ProviderClient>,
    pub agent_credential: Credential,
    /// How often an idle pool instance reads its own record (to learn it
    /// was drawn into a cluster).
    pub watch_interval: Duration,
    /// Where this agent listens, published with every step it reports
    /// ([`tags::AGENT_ADDRESS`]) so the CLI can dial a node its cloud gives
    /// no known address; None when it listens on every interface.
    pub published_address: Option<String>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl NodeProvider {
    /// Connect through the registered provider of this kind, behind the
    /// same rate limit and retries as the engine's calls.
    pub fn connect(&self) -> anyhow::Result<Arc<ProviderClient>> {
        let plugin = crate::registry::Registry::global()
            .provider(&self.kind)
            .ok_or_else(|| anyhow!("this motorpool knows no provider `{}`", self.kind))?;
        let env = motorpool_provider::ConnectEnv {
            home: PathBuf::new(),
            agent_program: std::env::current_exe()?,
        };
        let provider = plugin.connect_from_node(&self.settings, &env)?;
        Ok(Arc::new(ProviderClient::new(
            provider,
            plugin.capabilities(),
        )))
    }
}

/// Where the node's own step scripts find things: its Python, this very
/// executable as the runtime, a cache in the agent's directory.
pub fn node_step_context(dir: &std::path::Path) -> anyhow::Result<StepContext> {
    let binary = std::env::current_exe().context("cannot find the motorpool executable")?;
    Ok(StepContext {
        python: "python3".into(),
        motorpool_binary: binary.display().to_string(),
        cache_dir: dir.join("cache").display().to_string(),
        timeout_seconds: crate::bootstrap::steps::DEFAULT_STEP_TIMEOUT_MINUTES * 60,
        minute: Duration::from_secs(60),
    })
}

/// How often a cloud pool instance looks whether it was drawn into a cluster.
pub const POOL_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How long the driver waits for its workers when the boot document does not say.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a self-starting node waits for what other nodes do (the driver's
/// address, executors registering) before it reports the step failed.
const PEER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Node {
    async fn tag_self(&self, set: BTreeMap<String, String>) -> anyhow::Result<()> {
        self.provider
            .retag(
                std::slice::from_ref(&self.instance_id),
                &Retag {
                    set,
                    remove: vec![],
                },
            )
            .await?;
        Ok(())
    }

    /// Set this instance's `motorpool-step` (and any `more` tags), saying so in the log.
    /// The engine role this node hosts is no longer whole (`what` died):
    /// tag the node `failed:formation`, which `plan` shows as drift and
    /// `apply` heals by forming the cluster again.
    pub async fn mark_broken(&self, what: &str) -> anyhow::Result<()> {
        eprintln!(
            "motorpool agent {}: {what}; marking the node for the next apply",
            self.instance_id
        );
        self.report_step(&format!("failed:{}", Step::Formation.name()), &[])
            .await
    }

    async fn report_step(&self, step: &str, more: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut set = BTreeMap::new();
        set.insert(tags::STEP.to_string(), step.to_string());
        if let Some(address) = &self.published_address {
            set.insert(tags::AGENT_ADDRESS.to_string(), address.clone());
        }
        for (k, v) in more {
            set.insert(k.to_string(), v.to_string());
        }
        self.tag_self(set)
            .await
            .with_context(|| format!("cannot tag itself {}={step}", tags::STEP))?;
        eprintln!(
            "motorpool agent {}: tagged itself {}={step}",
            self.instance_id,
            tags::STEP
        );
        Ok(())
    }

    /// Run one step to its end; Err says how it failed (its log has the rest).
    async fn run_one(runner: &StepRunner, request: RunStepRequest) -> anyhow::Result<()> {
        let step = request.step.clone();
        let timeout = request.timeout_seconds;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let run = runner.run(request, tx);
        let mut finished: Option<(i32, String, bool)> = None;
        let drain = async {
            while let Some(Ok(event)) = rx.recv().await {
                if let Some(super::proto::step_event::Event::Finished(f)) = event.event {
                    finished = Some((f.exit_code, f.stderr_tail, f.timed_out));
                }
            }
        };
        tokio::join!(run, drain);
        match finished {
            Some((_, _, true)) => bail!(
                "step {step} timed out after {timeout}s (startup_timeout_minutes); see its log"
            ),
            Some((0, _, _)) => Ok(()),
            Some((exit, tail, _)) => {
                bail!("step {step} failed (exit {exit}); see its log:\n{tail}")
            }
            None => bail!("step {step} ended without a result"),
        }
    }

    /// Run the warm-up steps, then tag this instance warm (or failed).
    pub async fn warm_up(&self, runner: &StepRunner, steps: Vec<WarmStep>) {
        let requests = steps
            .into_iter()
            .map(|s| RunStepRequest {
                step: s.step,
                script: s.script,
                key: s.key,
                timeout_seconds: s.timeout_seconds,
                ..RunStepRequest::default()
            })
            .collect();
        self.warm_up_with(runner, requests).await;
    }

    /// A cloud pool instance: render the pool's warm-up here (this node's
    /// paths), run it, and tag this instance warm (or failed).
    pub async fn warm_up_from_spec(
        &self,
        runner: &StepRunner,
        dir: &std::path::Path,
        spec: &BootSpec,
    ) {
        let rendered = node_step_context(dir).and_then(|ctx| {
            boot_steps::warm_up(&Templates::new(), &ctx, spec)
                .map_err(|e| anyhow!("cannot render the warm-up steps: {e}"))
        });
        match rendered {
            Ok(requests) => self.warm_up_with(runner, requests).await,
            Err(e) => {
                eprintln!("motorpool agent: {e:#}");
                let _ = self
                    .report_step(&format!("failed:{}", Step::Runtime.name()), &[])
                    .await;
            }
        }
    }

    async fn warm_up_with(&self, runner: &StepRunner, requests: Vec<RunStepRequest>) {
        for request in requests {
            let step = request.step.clone();
            if let Err(e) = Self::run_one(runner, request).await {
                eprintln!("motorpool agent: warm-up {e:#}");
                let mut set = BTreeMap::new();
                set.insert(tags::STEP.to_string(), format!("failed:{step}"));
                let _ = self.tag_self(set).await;
                return;
            }
        }
        if let Err(e) = self.report_step(Step::Runtime.name(), &[]).await {
            eprintln!("motorpool agent: cannot tag itself warm: {e:#}");
        }
    }

    /// A cloud node in a cluster: run the cluster's startup saga on
    /// itself, tagging itself after each step, `ready` at the end, or
    /// `failed:<step>` (with the reason in the agent's log).
    pub async fn start_in_cluster(
        &self,
        runner: &StepRunner,
        runtime: &RuntimeHost,
        dir: &std::path::Path,
        boot: &ClusterBoot,
    ) {
        if let Err(e) = self.run_saga(runner, runtime, dir, boot).await {
            eprintln!(
                "motorpool agent {}: startup of cluster {} failed at {e}",
                self.instance_id, boot.cluster,
            );
            if let Err(e) = self
                .report_step(&format!("failed:{}", e.step.name()), &[])
                .await
            {
                eprintln!("motorpool agent: {e:#}");
            }
        }
    }

    async fn run_saga(
        &self,
        runner: &StepRunner,
        runtime: &RuntimeHost,
        dir: &std::path::Path,
        boot: &ClusterBoot,
    ) -> Result<(), saga::StartupError> {
        let ctx = node_step_context(dir)
            .map_err(|e| saga::StartupError::at(Step::Runtime, format!("{e:#}")))?;
        let me = self
            .find_self(&boot.cluster)
            .await
            .map_err(|e| saga::StartupError::at(Step::Formation, format!("{e:#}")))?;
        let nodes = SelfStart {
            node: self,
            runner,
            runtime,
            cluster: &boot.cluster,
            is_driver: me.tag(tags::ROLE).and_then(Role::parse) == Some(Role::Driver),
            published: tokio::sync::Mutex::new(None),
        };
        let templates = Templates::new();
        let input = saga::SagaInput {
            templates: &templates,
            steps: &ctx,
            spec: &boot.spec,
            formation: saga::Formation::new(&boot.cluster, boot.credential.clone(), &boot.spec),
            allocate: Duration::ZERO,
            ready_timeout: match boot.ready_timeout_seconds {
                0 => DEFAULT_READY_TIMEOUT,
                seconds => Duration::from_secs(seconds),
            },
            progress: &|line| eprintln!("motorpool agent: {line}"),
        };
        saga::run(&nodes, &input).await.map(|_| ())
    }

    /// A cloud pool instance after its warm-up: watch its own tags; once
    /// apply draws it into a cluster, read the cluster's startup from the
    /// provider and run it; once it is back in its pool, stop its runtime.
    pub async fn serve_as_pool_instance(
        &self,
        runner: &StepRunner,
        runtime: &RuntimeHost,
        dir: &std::path::Path,
    ) {
        let mut joined: Option<String> = None;
        loop {
            tokio::time::sleep(self.watch_interval).await;
            let cluster = match self.own_cluster().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("motorpool agent: cannot read its own tags: {e:#}");
                    continue;
                }
            };
            let Some(cluster) = cluster else {
                if joined.take().is_some() {
                    eprintln!(
                        "motorpool agent {}: back in its pool, stopping its runtime",
                        self.instance_id
                    );
                    runtime.stop().await;
                }
                continue;
            };
            if joined.as_deref() == Some(cluster.as_str()) {
                continue;
            }
            let name = cluster_boot_name(&self.project, &cluster);
            let boot = match self.provider.get_cluster_boot(&name).await {
                Ok(Some(document)) => {
                    serde_json::from_str::<ClusterBoot>(&document).with_context(|| {
                        format!("the boot document of cluster {cluster} is not valid")
                    })
                }
                // Not published yet: apply publishes it before drawing; look again.
                Ok(None) => continue,
                Err(e) => Err(anyhow::Error::new(e).context("cannot read the cluster's startup")),
            };
            match boot {
                Ok(boot) => {
                    eprintln!(
                        "motorpool agent {}: drawn into cluster {cluster}, starting",
                        self.instance_id
                    );
                    joined = Some(cluster);
                    self.start_in_cluster(runner, runtime, dir, &boot).await;
                }
                Err(e) => eprintln!("motorpool agent: {e:#}"),
            }
        }
    }

    /// The cluster this instance is a member of now, if any: its own
    /// record, read by id (never a list of the project's instances).
    async fn own_cluster(&self) -> anyhow::Result<Option<String>> {
        let me = self
            .provider
            .describe(std::slice::from_ref(&self.instance_id))
            .await?;
        Ok(me
            .iter()
            .find(|i| i.id == self.instance_id)
            .filter(|i| {
                i.tag(tags::KIND) == Some("cluster")
                    && i.tag(tags::PROJECT) == Some(self.project.as_str())
            })
            .and_then(|i| i.tag(tags::NAME))
            .map(str::to_string))
    }

    /// The cluster's live instances, as the provider lists them.
    async fn cluster_members(&self, cluster: &str) -> anyhow::Result<Vec<Instance>> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::KIND.into(), "cluster".into());
        filter.insert(tags::NAME.into(), cluster.to_string());
        let members = self.provider.list_all(&filter).await?;
        Ok(members.into_iter().filter(|i| i.state.is_live()).collect())
    }

    /// This instance as its provider lists it (a new instance may take a
    /// few seconds to show up in a cloud's listing).
    async fn find_self(&self, cluster: &str) -> anyhow::Result<Instance> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let listed = self.cluster_members(cluster).await;
            if let Ok(members) = &listed
                && let Some(me) = members.iter().find(|i| i.id == self.instance_id)
            {
                return Ok(me.clone());
            }
            if Instant::now() >= deadline {
                return match listed {
                    Err(e) => Err(e.context("cannot list the cluster's instances")),
                    Ok(_) => Err(anyhow!(
                        "instance {} is not listed as a member of cluster {cluster}",
                        self.instance_id
                    )),
                };
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The address the cluster's driver published, once it has.
    async fn find_driver(&self, cluster: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + PEER_TIMEOUT;
        let mut delay = Duration::from_millis(250);
        loop {
            let listed = self.cluster_members(cluster).await;
            if let Ok(members) = &listed
                && let Some(address) = members
                    .iter()
                    .filter(|i| i.tag(tags::ROLE) == Some(Role::Driver.as_str()))
                    .find_map(|i| i.tag(tags::DRIVER_ADDRESS))
            {
                return Ok(address.to_string());
            }
            if Instant::now() >= deadline {
                return Err(match listed {
                    Err(e) => e.context("cannot list the cluster's instances"),
                    Ok(_) => anyhow!(
                        "the driver of cluster {cluster} did not publish its address within {}s",
                        PEER_TIMEOUT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Stop an idle cluster: workers back to their pool or away, the driver marked and stopped.
    pub async fn autoterminate(&self, cluster: &str) -> anyhow::Result<()> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::KIND.into(), "cluster".into());
        filter.insert(tags::NAME.into(), cluster.to_string());
        let members = self.provider.list_all(&filter).await?;
        let now = now_unix().to_string();
        let mut terminate = Vec::new();
        for w in members
            .iter()
            .filter(|i| i.id != self.instance_id && i.state.is_live())
        {
            // Its executor stops before it changes hands.
            if let Some(address) = &w.address
                && let Ok(mut agent) =
                    crate::bootstrap::run::connect(address, &self.agent_credential).await
            {
                let _ = agent.stop_runtime(StopRuntimeRequest {}).await;
            }
            match (w.tag(tags::POOL), w.tag(tags::POOL_SPEC)) {
                (Some(pool), Some(pool_spec)) => {
                    let mut set = BTreeMap::new();
                    set.insert(tags::KIND.to_string(), "pool".to_string());
                    set.insert(tags::NAME.to_string(), pool.to_string());
                    set.insert(tags::ROLE.to_string(), Role::Idle.as_str().to_string());
                    set.insert(tags::SPEC.to_string(), pool_spec.to_string());
                    set.insert(tags::IDLE_SINCE.to_string(), now.clone());
                    set.insert(
                        tags::STEP.to_string(),
                        crate::bootstrap::Step::Runtime.name().to_string(),
                    );
                    let mut remove: Vec<String> =
                        vec![tags::POOL.into(), tags::POOL_SPEC.into(), tags::BOOT.into()];
                    remove.extend(
                        w.tags
                            .keys()
                            .filter(|k| !k.starts_with("motorpool-"))
                            .cloned(),
                    );
                    self.provider
                        .retag(std::slice::from_ref(&w.id), &Retag { set, remove })
                        .await?;
                }
                _ => terminate.push(w.id.clone()),
            }
        }
        if !terminate.is_empty() {
            self.provider.terminate(&terminate).await?;
        }
        let mut set = BTreeMap::new();
        set.insert(tags::AUTOTERMINATED.to_string(), now);
        self.tag_self(set).await?;
        // Last: this stops the very process running it.
        self.provider
            .stop(std::slice::from_ref(&self.instance_id))
            .await?;
        Ok(())
    }
}

/// A cloud node starting itself: the saga's nodes are this one node, and
/// what it finished it reports in its own tags.
struct SelfStart<'a> {
    node: &'a Node,
    runner: &'a StepRunner,
    runtime: &'a RuntimeHost,
    cluster: &'a str,
    is_driver: bool,
    /// The driver's address, once formation started it (published with the formation tag).
    published: tokio::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl StartupNodes for SelfStart<'_> {
    async fn record(&self, step: Step, took: Duration) -> Result<(), saga::StartupError> {
        Node::run_one(
            self.runner,
            boot_steps::recorded(step, took.as_millis() as u64),
        )
        .await
        .map_err(|e| saga::StartupError::at(step, format!("{e:#}")))
    }

    async fn run_script(
        &self,
        step: Step,
        request: RunStepRequest,
    ) -> Result<Duration, saga::StartupError> {
        let t = Instant::now();
        Node::run_one(self.runner, request)
            .await
            .map_err(|e| saga::StartupError::at(step, format!("{e:#}")))?;
        Ok(t.elapsed())
    }

    /// A node starting itself forms its own part anew.
    async fn form(&self, formation: &saga::Formation) -> Result<bool, saga::StartupError> {
        let failed = |e: String| saga::StartupError::at(Step::Formation, e);
        let request = if self.is_driver {
            formation.start_request(None)
        } else {
            let driver = self
                .node
                .find_driver(self.cluster)
                .await
                .map_err(|e| failed(format!("{e:#}")))?;
            formation.start_request(Some(&driver))
        };
        // The engine's role listens on the agent's (private) address.
        let address = self
            .runtime
            .start(request, None)
            .await
            .map_err(|e| failed(format!("the runtime did not start: {}", e.message())))?;
        if self.is_driver {
            *self.published.lock().await = Some(address);
        }
        Ok(true)
    }

    async fn registered_workers(&self) -> Result<Option<usize>, saga::StartupError> {
        if !self.is_driver {
            return Ok(None);
        }
        let status = self.runtime.driver_status().await.map_err(|e| {
            saga::StartupError::at(
                Step::Ready,
                format!("the driver does not answer: {}", e.message()),
            )
        })?;
        Ok(Some(status.executors.len()))
    }

    async fn finished(
        &self,
        step: Step,
        boot_hash: Option<&str>,
    ) -> Result<(), saga::StartupError> {
        // Request and allocate were apply's work: the node reports what it did.
        if matches!(step, Step::Request | Step::Allocate) {
            return Ok(());
        }
        let published = self.published.lock().await.clone();
        let mut more: Vec<(&str, &str)> = Vec::new();
        if step == Step::Formation
            && let Some(address) = published.as_deref()
        {
            more.push((tags::DRIVER_ADDRESS, address));
        }
        if let Some(hash) = boot_hash {
            more.push((tags::BOOT, hash));
        }
        self.node
            .report_step(step.name(), &more)
            .await
            .map_err(|e| saga::StartupError::at(step, format!("{e:#}")))
    }

    async fn stop_roles(&self) {
        self.runtime.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;
    use motorpool_provider::{
        LaunchRequest, NodeType, Page, Provider, ProviderError, ProviderPlugin,
    };

    use super::*;

    /// Counts, on the way to the provider, the calls idle nodes make.
    struct Counting {
        inner: Arc<dyn Provider>,
        lists: AtomicU64,
        describes: AtomicU64,
    }

    #[async_trait]
    impl Provider for Counting {
        fn kind(&self) -> &str {
            self.inner.kind()
        }
        fn catalog(&self) -> &[NodeType] {
            self.inner.catalog()
        }
        fn default_image(&self) -> String {
            self.inner.default_image()
        }
        async fn list_page(
            &self,
            filter: &TagFilter,
            token: Option<String>,
        ) -> Result<Page, ProviderError> {
            self.lists.fetch_add(1, Ordering::Relaxed);
            self.inner.list_page(filter, token).await
        }
        async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>, ProviderError> {
            self.describes.fetch_add(1, Ordering::Relaxed);
            self.inner.describe(ids).await
        }
        async fn launch(&self, r: &LaunchRequest) -> Result<Vec<Instance>, ProviderError> {
            self.inner.launch(r).await
        }
        async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
            self.inner.terminate(ids).await
        }
        async fn stop(&self, ids: &[String]) -> Result<(), ProviderError> {
            self.inner.stop(ids).await
        }
        async fn start(&self, ids: &[String]) -> Result<(), ProviderError> {
            self.inner.start(ids).await
        }
        async fn retag(&self, ids: &[String], change: &Retag) -> Result<(), ProviderError> {
            self.inner.retag(ids, change).await
        }
    }

    /// A minute of a thousand idle pool nodes, in fast motion: each node
    /// watches every 50 ms instead of every 2 s, for 30 intervals (what a
    /// real minute holds).
    #[cfg(feature = "sim")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_idle_pool_nodes_make_no_list_calls_and_a_fixed_number_of_look_ups() {
        const NODES: u32 = 1000;
        let interval = Duration::from_millis(50);
        let intervals_per_minute = 60 / POOL_WATCH_INTERVAL.as_secs();
        let home = tempfile::tempdir().expect("home");
        let plugin = motorpool_sim::SimPlugin;
        let env = motorpool_provider::ConnectEnv {
            home: home.path().to_path_buf(),
            agent_program: PathBuf::from("motorpool"),
        };
        let sim = plugin.connect(&serde_json::Value::Null, &env).expect("sim");
        let mut pool_tags = BTreeMap::new();
        pool_tags.insert(tags::PROJECT.to_string(), "busy".to_string());
        pool_tags.insert(tags::KIND.to_string(), "pool".to_string());
        pool_tags.insert(tags::NAME.to_string(), "general".to_string());
        pool_tags.insert(tags::ROLE.to_string(), "idle".to_string());
        let instances = sim
            .launch(&LaunchRequest {
                count: NODES,
                node_type: "small".into(),
                image: None,
                tags: pool_tags,
                user_data: String::new(),
                client_token: "pool-general".into(),
            })
            .await
            .expect("launch the pool");
        let counting = Arc::new(Counting {
            inner: sim,
            lists: AtomicU64::new(0),
            describes: AtomicU64::new(0),
        });
        let mut watchers = tokio::task::JoinSet::new();
        for instance in instances {
            let dir = home.path().join("nodes").join(&instance.id);
            std::fs::create_dir_all(&dir).expect("node dir");
            // Each node is its own process in real life: its own client.
            let node = Node {
                instance_id: instance.id.clone(),
                project: "busy".into(),
                provider: Arc::new(ProviderClient::new(counting.clone(), plugin.capabilities())),
                agent_credential: Credential::new("agent"),
                watch_interval: interval,
                published_address: None,
            };
            let runner = Arc::new(StepRunner::new(&dir));
            let runtime = RuntimeHost::new(
                dir.clone(),
                runner.clone(),
                super::super::service::RuntimeTls {
                    server: None,
                    trust: None,
                    listen_ip: std::net::IpAddr::from([127, 0, 0, 1]),
                    runtime_port: 0,
                },
            );
            watchers.spawn(async move {
                node.serve_as_pool_instance(&runner, &runtime, &dir).await;
            });
        }
        tokio::time::sleep(interval * intervals_per_minute as u32).await;
        watchers.abort_all();
        while watchers.join_next().await.is_some() {}
        let lists = counting.lists.load(Ordering::Relaxed);
        let describes = counting.describes.load(Ordering::Relaxed);
        assert_eq!(lists, 0, "idle pool nodes listed the project's instances");
        // At most one look-up of its own record per node per watch interval.
        assert!(
            describes <= u64::from(NODES) * intervals_per_minute,
            "{describes} look-ups in a minute"
        );
        assert!(
            describes >= u64::from(NODES),
            "the nodes did not watch: {describes}"
        );
    }
}
