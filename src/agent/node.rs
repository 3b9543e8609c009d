//! What a node does on its own, through its provider, as a cloud VM does
//! with its instance role: warm itself up when it joins a pool (runtime setup
//! and preloaded libraries, then tag itself `motorpool-step=runtime`), and,
//! on a driver node, stop its idle cluster (autotermination).
//!
//! Autotermination sends each worker back to its pool (re-tagged idle, its
//! executor stopped) or terminates it, then marks the driver instance
//! `motorpool-autoterminated` and stops it. The stopped driver is the record
//! that the cluster ended on purpose: `plan` shows it as such, not as drift,
//! and only `apply --start CLUSTER` or `run` brings it back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use motorpool_provider::{Provider, Retag, TagFilter, tags};
use serde::{Deserialize, Serialize};

use super::proto::{RunStepRequest, StopRuntimeRequest};
use super::steps::StepRunner;
use crate::auth::Credential;

/// How the node reaches its own provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SelfProvider {
    /// The local provider under this home directory.
    Local { home: PathBuf },
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
        }
    }
}

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

    /// Run the warm-up steps, then tag this instance warm (or failed).
    pub async fn warm_up(&self, runner: &StepRunner, steps: Vec<WarmStep>) {
        for s in steps {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let request = RunStepRequest {
                step: s.step.clone(),
                script: s.script,
                key: s.key,
                timeout_seconds: s.timeout_seconds,
                ..RunStepRequest::default()
            };
            let run = runner.run(request, tx);
            let mut exit = -1;
            let mut timed_out = false;
            let drain = async {
                while let Some(Ok(event)) = rx.recv().await {
                    if let Some(super::proto::step_event::Event::Finished(f)) = event.event {
                        exit = f.exit_code;
                        timed_out = f.timed_out;
                    }
                }
            };
            tokio::join!(run, drain);
            if timed_out {
                eprintln!(
                    "motorpool agent: warm-up step {} timed out after {}s (startup_timeout_minutes); see its log",
                    s.step, s.timeout_seconds
                );
            } else if exit != 0 {
                eprintln!(
                    "motorpool agent: warm-up step {} failed (exit {exit}); see its log",
                    s.step
                );
            }
            if exit != 0 {
                let mut set = BTreeMap::new();
                set.insert(tags::STEP.to_string(), format!("failed:{}", s.step));
                let _ = self.tag_self(set).await;
                return;
            }
        }
        let mut set = BTreeMap::new();
        set.insert(
            tags::STEP.to_string(),
            crate::bootstrap::Step::Runtime.name().to_string(),
        );
        if let Err(e) = self.tag_self(set).await {
            eprintln!("motorpool agent: cannot tag itself warm: {e:#}");
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
