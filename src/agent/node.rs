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
use motorpool_provider::{Instance, Provider, Retag, TagFilter, tags};
use serde::{Deserialize, Serialize};

use super::proto::{RunStepRequest, StartRuntimeRequest, StopRuntimeRequest};
use super::runtime_host::RuntimeHost;
use super::steps::StepRunner;
use crate::auth::Credential;
use crate::bootstrap::steps::{self as boot_steps, StepContext};
use crate::bootstrap::template::Templates;
use crate::bootstrap::{BootSpec, Step};

/// The tag where a self-started driver node publishes its driver's address.
pub const DRIVER_ADDRESS_TAG: &str = "motorpool-driver-address";

/// How the node reaches its own provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SelfProvider {
    /// The local provider under this home directory.
    Local { home: PathBuf },
    /// EC2 in `region` (default: the standard chain, i.e. the instance's own
    /// region), through `endpoint` (default: the region's), with the
    /// instance role's credentials (the standard credential chain).
    Aws {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

/// A cluster's startup as a cloud node runs it on itself: the cluster, its
/// credential (which guards its driver and executors) and what to run. The
/// node learns its role (driver or worker) from its own `motorpool-role` tag.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterBoot {
    pub cluster: String,
    pub credential: String,
    pub spec: BootSpec,
}

impl std::fmt::Debug for ClusterBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBoot")
            .field("cluster", &self.cluster)
            .field("credential", &"<redacted>")
            .field("spec", &self.spec)
            .finish()
    }
}

/// A step the node runs on itself at start (pool warm-up), as rendered by the engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmStep {
    pub step: String,
    pub script: String,
    pub key: String,
    #[serde(default)]
    pub timeout_seconds: u32,
}

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
    pub provider: Arc<dyn Provider>,
    pub agent_credential: Credential,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SelfProvider {
    pub fn connect(&self) -> anyhow::Result<Arc<dyn Provider>> {
        match self {
            SelfProvider::Local { home } => {
                let program = std::env::current_exe()?;
                let config = motorpool_local::LocalConfig::new(home.clone(), program);
                Ok(Arc::new(motorpool_local::LocalProvider::new(config)?))
            }
            SelfProvider::Aws { region, endpoint } => {
                let config = motorpool_aws::AwsConfig {
                    region: region.clone(),
                    endpoint_url: endpoint.clone(),
                    ..motorpool_aws::AwsConfig::default()
                };
                Ok(Arc::new(motorpool_aws::AwsProvider::new(config)?))
            }
        }
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
const POOL_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The name a cluster's startup is stored under at its provider
/// (`Provider::put_cluster_boot`), for pool instances drawn into it.
pub fn cluster_boot_name(project: &str, cluster: &str) -> String {
    format!("{project}-{cluster}")
}

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
    async fn report_step(&self, step: &str, more: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut set = BTreeMap::new();
        set.insert(tags::STEP.to_string(), step.to_string());
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

    /// A cloud node in a cluster: run the cluster's startup on itself,
    /// tagging itself after each step, `ready` at the end, or
    /// `failed:<step>` (with the reason in the agent's log).
    pub async fn start_in_cluster(
        &self,
        runner: &StepRunner,
        runtime: &RuntimeHost,
        dir: &std::path::Path,
        boot: &ClusterBoot,
    ) {
        if let Err((step, e)) = self.run_cluster_steps(runner, runtime, dir, boot).await {
            eprintln!(
                "motorpool agent {}: startup of cluster {} failed at {}: {e:#}",
                self.instance_id,
                boot.cluster,
                step.name()
            );
            if let Err(e) = self
                .report_step(&format!("failed:{}", step.name()), &[])
                .await
            {
                eprintln!("motorpool agent: {e:#}");
            }
        }
    }

    async fn run_cluster_steps(
        &self,
        runner: &StepRunner,
        runtime: &RuntimeHost,
        dir: &std::path::Path,
        boot: &ClusterBoot,
    ) -> Result<(), (Step, anyhow::Error)> {
        let at = |step: Step| move |e: anyhow::Error| (step, e);
        let render = |step: Step| move |e: minijinja::Error| (step, anyhow!("cannot render: {e}"));
        let templates = Templates::new();
        let ctx = node_step_context(dir).map_err(at(Step::Runtime))?;
        let spec = &boot.spec;

        // 3. os & runtime setup (skipped by its key when the node warmed up in a pool).
        let request = boot_steps::runtime(&templates, &ctx, spec).map_err(render(Step::Runtime))?;
        Self::run_one(runner, request)
            .await
            .map_err(at(Step::Runtime))?;
        self.report_step(Step::Runtime.name(), &[])
            .await
            .map_err(at(Step::Runtime))?;

        // 4. formation: the driver starts and publishes its address; workers find it.
        let me = self
            .find_self(&boot.cluster)
            .await
            .map_err(at(Step::Formation))?;
        let is_driver = me.tag(tags::ROLE) == Some("driver");
        let mut request = StartRuntimeRequest {
            role: if is_driver { "driver" } else { "executor" }.into(),
            cluster: boot.cluster.clone(),
            cluster_credential: boot.credential.clone(),
            driver_address: String::new(),
            cores: 0,
            autotermination_minutes: spec.autotermination_minutes.unwrap_or(0),
        };
        if !is_driver {
            request.autotermination_minutes = 0;
            request.driver_address = self
                .find_driver(&boot.cluster)
                .await
                .map_err(at(Step::Formation))?;
        }
        // The runtime listens on the agent's (private) address.
        let address = runtime.start(request, None).await.map_err(|e| {
            (
                Step::Formation,
                anyhow!("the runtime did not start: {}", e.message()),
            )
        })?;
        let published: &[(&str, &str)] = if is_driver {
            &[(DRIVER_ADDRESS_TAG, address.as_str())]
        } else {
            &[]
        };
        self.report_step(Step::Formation.name(), published)
            .await
            .map_err(at(Step::Formation))?;

        // 5. libraries, then the init scripts in order.
        if let Some(request) =
            boot_steps::libraries(&templates, &ctx, spec).map_err(render(Step::Libraries))?
        {
            Self::run_one(runner, request)
                .await
                .map_err(at(Step::Libraries))?;
        }
        for request in
            boot_steps::init_scripts(&templates, &ctx, spec).map_err(render(Step::Libraries))?
        {
            Self::run_one(runner, request)
                .await
                .map_err(at(Step::Libraries))?;
        }
        self.report_step(Step::Libraries.name(), &[])
            .await
            .map_err(at(Step::Libraries))?;

        // 6. security & access: mounts.
        if let Some(request) =
            boot_steps::mounts(&templates, &ctx, spec).map_err(render(Step::Security))?
        {
            Self::run_one(runner, request)
                .await
                .map_err(at(Step::Security))?;
        }
        self.report_step(Step::Security.name(), &[])
            .await
            .map_err(at(Step::Security))?;

        // 7. ready: on the driver, once every executor registered.
        if is_driver {
            let deadline = Instant::now() + PEER_TIMEOUT;
            loop {
                let registered = runtime
                    .driver_status()
                    .await
                    .map(|s| s.executors.len())
                    .map_err(|e| {
                        (
                            Step::Ready,
                            anyhow!("the driver does not answer: {}", e.message()),
                        )
                    })?;
                if registered >= spec.workers as usize {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err((
                        Step::Ready,
                        anyhow!("only {registered} of {} executors registered", spec.workers),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let hash = spec.hash();
        self.report_step(Step::Ready.name(), &[(tags::BOOT, hash.as_str())])
            .await
            .map_err(at(Step::Ready))
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
            tokio::time::sleep(POOL_WATCH_INTERVAL).await;
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

    /// The cluster this instance is a member of now, if any.
    async fn own_cluster(&self) -> anyhow::Result<Option<String>> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::KIND.into(), "cluster".into());
        let mut token = None;
        loop {
            let page = self.provider.list_page(&filter, token).await?;
            if let Some(me) = page.instances.iter().find(|i| i.id == self.instance_id) {
                return Ok(me.tag(tags::NAME).map(str::to_string));
            }
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(None),
            }
        }
    }

    /// The cluster's live instances, as the provider lists them.
    async fn cluster_members(&self, cluster: &str) -> anyhow::Result<Vec<Instance>> {
        let mut filter = TagFilter::new();
        filter.insert(tags::PROJECT.into(), self.project.clone());
        filter.insert(tags::KIND.into(), "cluster".into());
        filter.insert(tags::NAME.into(), cluster.to_string());
        let mut members = Vec::new();
        let mut token = None;
        loop {
            let page = self.provider.list_page(&filter, token).await?;
            members.extend(page.instances.into_iter().filter(|i| i.state.is_live()));
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(members),
            }
        }
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
                    .filter(|i| i.tag(tags::ROLE) == Some("driver"))
                    .find_map(|i| i.tag(DRIVER_ADDRESS_TAG))
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
        let mut members = Vec::new();
        let mut token = None;
        loop {
            let page = self.provider.list_page(&filter, token).await?;
            members.extend(page.instances);
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
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
                    set.insert(tags::ROLE.to_string(), "idle".to_string());
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
