//! The words every part of motorpool shares: a node's [`Role`], the seven
//! startup [`Step`]s, and the [`BootSpec`] a cluster's or a pool's nodes
//! start from (plan data, carried from the planner to apply, the agent and
//! the nodes).
//!
//! A leaf: this module imports nothing else of the crate, so the planner,
//! apply, bootstrap, the agent and the engines can all depend on it without
//! depending on each other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The part an instance plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Driver,
    Worker,
    Idle,
}

impl Role {
    /// The value of the `motorpool-role` tag.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Worker => "worker",
            Role::Idle => "idle",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "driver" => Some(Role::Driver),
            "worker" => Some(Role::Worker),
            "idle" => Some(Role::Idle),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `1 worker`, `3 workers`.
pub fn plural(n: u32, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The first 12 hex digits of a SHA-256 over `parts`.
pub fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The seven steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Request,
    Allocate,
    Runtime,
    Formation,
    Libraries,
    Security,
    Ready,
}

pub const STEPS: [Step; 7] = [
    Step::Request,
    Step::Allocate,
    Step::Runtime,
    Step::Formation,
    Step::Libraries,
    Step::Security,
    Step::Ready,
];

impl Step {
    /// The name in tags (`motorpool-step`) and state files.
    pub fn name(self) -> &'static str {
        match self {
            Step::Request => "request",
            Step::Allocate => "allocate",
            Step::Runtime => "runtime",
            Step::Formation => "formation",
            Step::Libraries => "libraries",
            Step::Security => "security",
            Step::Ready => "ready",
        }
    }

    /// How status shows it.
    pub fn title(self) -> &'static str {
        match self {
            Step::Request => "request",
            Step::Allocate => "allocate",
            Step::Runtime => "os & runtime setup",
            Step::Formation => "formation",
            Step::Libraries => "libraries",
            Step::Security => "security & access",
            Step::Ready => "ready",
        }
    }

    pub fn parse(name: &str) -> Option<Step> {
        STEPS.into_iter().find(|s| s.name() == name)
    }
}

/// A file shipped to nodes with a step (an init script, a requirements file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedFile {
    pub name: String,
    pub content: String,
}

/// A mount, with its source resolved (an absolute local path, or a URL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Everything a pool's or a cluster's nodes need to start: plan data, so a
/// saved plan starts exactly what was reviewed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootSpec {
    /// What the nodes run, as recorded in the `motorpool-runtime` tag.
    pub runtime: String,
    /// The cluster's engine (a pool's preloaded one); empty: the bundled runtime.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
    /// The engine's version; empty: its default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine_version: String,
    /// The engine's settings (`spark_conf`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub engine_conf: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pip: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<NamedFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_scripts: Vec<NamedFile>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Env values that are secret (marked in the spec, or named like one):
    /// where each is read at apply and its keyed digest, never the value
    /// (which only what goes to the nodes holds: [`SecretEnv::revealed`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, SecretEnv>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Clusters: stop after this many minutes without a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autotermination_minutes: Option<u32>,
    /// Clusters: how many executors must register before the cluster is ready.
    #[serde(default)]
    pub workers: u32,
    /// Most minutes one step may take on a node (None: the engine's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_minutes: Option<u32>,
    /// The worker node type's cores and memory, for engines that size their
    /// workers by the node (0: not told; a node type change replaces nodes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub worker_cores: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub worker_memory_mb: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What every output shows in place of a secret value.
pub const SECRET_SHOWN: &str = "(secret)";

fn secret_shown() -> String {
    SECRET_SHOWN.to_string()
}

/// One secret env value of a [`BootSpec`]: where apply reads it (exactly
/// one of `from_env`, `from_file`, `sealed`) and a digest of the value
/// keyed with the project secret, so that a changed value changes the
/// boot hash (and shows in the plan) without the plan holding it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretEnv {
    /// Always `(secret)`: what a reader of a plan sees.
    #[serde(default = "secret_shown")]
    pub value: String,
    /// The CLI's environment variable it is read from at apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    /// The file (absolute, inside the project) it is read from at apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<String>,
    /// A value written in the spec itself, encrypted with a key derived
    /// from the project secret (hex: nonce, ciphertext, tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// `hmac-sha256:<hex>` of the value, keyed with the project secret.
    pub digest: String,
    /// The value itself: set by apply in what it sends to the nodes
    /// (private agent configs, user data, boot documents), never in a plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revealed: Option<String>,
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEnv")
            .field("from_env", &self.from_env)
            .field("from_file", &self.from_file)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl BootSpec {
    /// The environment the node's steps run with: the plain values and the
    /// revealed secret ones.
    pub fn node_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        for (name, secret) in &self.secret_env {
            if let Some(value) = &secret.revealed {
                env.insert(name.clone(), value.clone());
            }
        }
        env
    }

    /// What identifies the env without a secret value: the plain values
    /// and each secret's digest.
    pub fn env_identity(&self) -> String {
        if self.secret_env.is_empty() {
            // As before secrets existed: a node's finished steps stay finished.
            return serde_json::to_string(&self.env).unwrap_or_default();
        }
        let digests: BTreeMap<&String, &String> = self
            .secret_env
            .iter()
            .map(|(k, s)| (k, &s.digest))
            .collect();
        serde_json::to_string(&(&self.env, digests)).unwrap_or_default()
    }

    /// A hash of what the nodes run (not how many there are): stored in the
    /// `motorpool-boot` tag, so a change of libraries, scripts, env or mounts
    /// shows in the plan. A secret counts by its digest and its source only
    /// (the same whether or not apply revealed it).
    pub fn hash(&self) -> String {
        let mut copy = self.clone();
        for secret in copy.secret_env.values_mut() {
            secret.revealed = None;
            secret.sealed = None;
        }
        copy.workers = 0;
        copy.autotermination_minutes = None;
        copy.startup_timeout_minutes = None;
        copy.worker_cores = 0;
        copy.worker_memory_mb = 0;
        let text = serde_json::to_string(&copy).unwrap_or_default();
        short_hash(&[&text])
    }
}

/// How the node reaches its own provider: the provider's kind and what its
/// plugin's `node_settings` told the node (never the CLI's credentials: a
/// cloud node uses its own instance identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "NodeProviderOnDisk")]
pub struct NodeProvider {
    pub kind: String,
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// A node's provider as agent configs hold it: `{kind, settings}`, or as
/// agents of an earlier motorpool wrote it, the settings next to `kind`
/// (`{"kind": "local", "home": ...}`, `{"kind": "aws", "region": ...}`),
/// which a restarted node must still read.
#[derive(Deserialize)]
struct NodeProviderOnDisk {
    kind: String,
    #[serde(default)]
    settings: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl From<NodeProviderOnDisk> for NodeProvider {
    fn from(d: NodeProviderOnDisk) -> Self {
        let settings = match d.settings {
            Some(settings) => settings,
            None if d.rest.is_empty() => serde_json::Value::Null,
            None => serde_json::Value::Object(d.rest),
        };
        NodeProvider {
            kind: d.kind,
            settings,
        }
    }
}

/// A cluster's startup as a cloud node runs it on itself: the cluster, its
/// credential (which guards its driver and executors) and what to run. The
/// node learns its role (driver or worker) from its own `motorpool-role` tag.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterBoot {
    pub cluster: String,
    pub credential: String,
    pub spec: BootSpec,
    /// How long the driver may take to see every worker registered
    /// (the provider's `ready_timeout_minutes`); 0: the default, 2 minutes.
    #[serde(default)]
    pub ready_timeout_seconds: u64,
}

impl std::fmt::Debug for ClusterBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBoot")
            .field("cluster", &self.cluster)
            .field("credential", &"<redacted>")
            .field("spec", &self.spec)
            .field("ready_timeout_seconds", &self.ready_timeout_seconds)
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

/// The name a cluster's startup is stored under at its provider
/// (`Provider::put_cluster_boot`), for pool instances drawn into it.
pub fn cluster_boot_name(project: &str, cluster: &str) -> String {
    format!("{project}-{cluster}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_provider_reads_its_own_shape_and_the_earlier_flat_one() {
        let now: NodeProvider =
            serde_json::from_str(r#"{"kind":"sim","settings":{"home":"/h","settings":null}}"#)
                .expect("current shape");
        assert_eq!(now.settings["home"], "/h");
        let back = serde_json::to_string(&now).expect("encode");
        assert_eq!(
            serde_json::from_str::<NodeProvider>(&back).expect("again"),
            now
        );
        let earlier: NodeProvider = serde_json::from_str(
            r#"{"kind":"aws","region":"eu-west-1","endpoint":"http://127.0.0.1:5000"}"#,
        )
        .expect("earlier shape");
        assert_eq!(earlier.kind, "aws");
        assert_eq!(earlier.settings["region"], "eu-west-1");
        assert_eq!(earlier.settings["endpoint"], "http://127.0.0.1:5000");
    }
}
