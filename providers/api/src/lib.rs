//! `motorpool-provider`: the contract between motorpool's engine and a cloud.
//!
//! This crate owns the [`Provider`] trait, the types that cross it
//! ([`Instance`], [`LaunchRequest`], [`Page`], [`NodeType`]), the tag names
//! every provider stores on the instances it launches ([`tags`]), the typed
//! errors ([`ProviderError`]) the engine uses to decide what to retry, and
//! what a provider crate registers ([`plugin`]: its settings, capabilities
//! and node-side bootstrap), and [`private_files`]: how anything that can
//! hold a credential is written (0600 files in 0700 directories).
//!
//! It must not know about specs, plans or any cloud SDK: the engine depends on
//! this crate, every provider crate depends on this crate, and nothing here
//! depends on either.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod catalog;
pub mod lock;
pub mod plugin;
pub mod private_files;

pub use catalog::{NodeType, cheapest_fit};
pub use lock::{LockAttempt, LockInfo};
pub use plugin::{
    Capabilities, ConnectEnv, NodeStartup, ProviderPlugin, SettingProblem, node_home_settings,
    settings_from, with_home,
};

/// Tags (labels on GCP) as key -> value. Ordered so that hashes and renders are stable.
pub type Tags = BTreeMap<String, String>;

/// The tag names motorpool writes on every instance it creates.
///
/// Observed state is found by these tags alone: there is no state file.
/// These are *logical* tags: a provider stores them as its cloud allows
/// (EC2 tags as they are; GCP labels cannot hold `.` or `:`, so a value that
/// is no label goes to instance metadata) and lists them back decoded. The
/// engine never assumes a value fits a cloud's rules as it is.
pub mod tags {
    /// The project (spec tree) that owns the instance.
    pub const PROJECT: &str = "motorpool-project";
    /// `pool` or `cluster`: which kind of resource the instance belongs to now.
    pub const KIND: &str = "motorpool-kind";
    /// The name of the pool or cluster the instance belongs to now.
    pub const NAME: &str = "motorpool-name";
    /// `idle`, `driver` or `worker`.
    pub const ROLE: &str = "motorpool-role";
    /// Hash of the spec fields that force a replace when they change.
    pub const SPEC: &str = "motorpool-spec";
    /// The last startup step the node finished.
    pub const STEP: &str = "motorpool-step";
    /// Unix seconds since when a pool instance has been idle.
    pub const IDLE_SINCE: &str = "motorpool-idle-since";
    /// The pool a cluster instance was drawn from, so it can go back when the cluster goes.
    pub const POOL: &str = "motorpool-pool";
    /// That pool's spec hash, restored as `motorpool-spec` when the instance goes back.
    pub const POOL_SPEC: &str = "motorpool-pool-spec";
    /// How many instances of this role the last apply left (workers of a cluster,
    /// idle instances of a pool): fewer live ones than this is drift.
    pub const SIZE: &str = "motorpool-size";
    /// The runtime version the node was set up with (a replace-forcing field).
    pub const RUNTIME: &str = "motorpool-runtime";
    /// Hash of what the node's startup ran (libraries, init scripts, env, mounts).
    pub const BOOT: &str = "motorpool-boot";
    /// Unix seconds when a cluster stopped itself after idling (autotermination).
    pub const AUTOTERMINATED: &str = "motorpool-autoterminated";
    /// On a job cluster's instances: the job whose run made the cluster (`motorpool run`).
    pub const JOB: &str = "motorpool-job";
    /// On a job cluster's instances: unix seconds after which the cluster has
    /// outlived its run (the run was killed before it could remove it), so
    /// plan removes it. Until then plan leaves the cluster to its run.
    pub const EXPIRES: &str = "motorpool-expires";
    /// On a self-started cluster's driver node: where its driver listens,
    /// published for the workers (and the CLI) to find. A provider whose
    /// tags cannot hold an address stores it where the cloud keeps such
    /// values (GCP: instance metadata).
    pub const DRIVER_ADDRESS: &str = "motorpool-driver-address";
    /// On a self-started node: where its agent listens (`HOST:PORT`),
    /// published by the agent itself for the CLI (`status`, `logs`, `run`)
    /// to dial. Like the driver's address, a provider whose tags cannot hold
    /// it stores it where the cloud keeps such values.
    pub const AGENT_ADDRESS: &str = "motorpool-agent-address";
    /// Beside a `failed:<step>` step: why, in words, when the node could
    /// say (its user data failed before its agent ran: a runtime download
    /// that does not match its checksum).
    pub const FAILURE: &str = "motorpool-failure";
}

/// The lifecycle state of an instance, as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    /// Gone: terminated by someone, or (local provider) its process is dead.
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Terminated => "terminated",
        }
    }

    /// Pending or running: the instance is (about to be) doing work.
    pub fn is_live(self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine's IP addresses as its cloud reports them: the private one
/// inside its network, and the public one where it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<String>,
}

impl NodeIps {
    pub fn is_empty(&self) -> bool {
        self.private.is_none() && self.public.is_none()
    }
}

/// One machine as the provider reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub node_type: String,
    /// The image (AMI, local runtime, ...) the instance was launched from.
    pub image: String,
    pub state: InstanceState,
    pub tags: Tags,
    /// Where the node's agent listens, when the provider knows (`127.0.0.1:PORT` on local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The agent's process id (local provider only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The machine's network addresses, as its cloud reports them.
    #[serde(default, skip_serializing_if = "NodeIps::is_empty")]
    pub ips: NodeIps,
    /// Unix seconds of the launch.
    pub launched_at: u64,
}

impl Instance {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// A filter on tags: every listed key must be present with exactly that value.
pub type TagFilter = Tags;

/// One page of a paginated list.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub instances: Vec<Instance>,
    /// Pass back to get the next page; `None` on the last one.
    pub next_token: Option<String>,
}

/// Launch `count` identical instances, tagged at birth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub count: u32,
    pub node_type: String,
    /// `None`: the provider's default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub tags: Tags,
    /// Rendered user data (cloud-init) for cloud providers; the local provider ignores it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_data: String,
    /// Idempotency token: a second launch with the same token returns the
    /// instances of the first instead of making new ones.
    pub client_token: String,
}

/// The port a cloud node's agent listens on, on its private address (with TLS).
pub const CLOUD_AGENT_PORT: u16 = 7443;

/// The port the driver or executor a cloud node's agent hosts listens on:
/// fixed (the agent's plus one) so that a firewall rule can name both.
pub const CLOUD_RUNTIME_PORT: u16 = CLOUD_AGENT_PORT + 1;

/// The runtime binary `apply` publishes for cloud nodes ([`Provider::publish_runtime`]).
#[derive(Debug, Clone)]
pub struct RuntimeUpload {
    /// The file to upload (a stripped `motorpool` for the nodes' platform).
    pub path: std::path::PathBuf,
    /// Its SHA-256, lower-case hex: the object's name carries it, so an
    /// object already there under that name is the same file.
    pub sha256: String,
    /// e.g. `0.1.0`, for the object's name.
    pub version: String,
    /// e.g. `x86_64-linux`, for the object's name.
    pub platform: String,
    /// The project, for the tags of a bucket made for it.
    pub project: String,
    /// How long the URL handed to nodes must work.
    pub valid_for: Duration,
}

impl RuntimeUpload {
    /// The object's name in the bucket: one per version, platform and content.
    pub fn object_name(&self) -> String {
        format!(
            "motorpool/runtime/{}/{}/{}/motorpool",
            self.version, self.platform, self.sha256
        )
    }
}

/// A change of tags on a set of instances: `set` is written, `remove` is deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Retag {
    pub set: Tags,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// What went wrong at the provider, typed so the engine knows what to retry.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProviderError {
    /// Rate limited (RequestLimitExceeded, 429): retry after a backoff.
    #[error("throttled by the provider: {0}")]
    Throttled(String),
    /// A server-side failure (5xx): retry after a backoff.
    #[error("provider server error: {0}")]
    Server(String),
    /// Not enough capacity for this node type here right now.
    #[error("insufficient capacity: {0}")]
    Capacity(String),
    /// An account limit (vCPU, instance count) would be exceeded.
    #[error("quota exceeded: {0}")]
    Quota(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Credentials missing, expired or not allowed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A bad request; `field` names the spec field when the provider can tell.
    #[error("invalid request{}: {message}", field.as_deref().map(|f| format!(" (spec field `{f}`)")).unwrap_or_default())]
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// The provider's own machinery failed (I/O, a process would not start, ...).
    #[error("{0}")]
    Internal(String),
}

impl ProviderError {
    /// Throttling and server errors are worth retrying with backoff; the rest are not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Throttled(_) | ProviderError::Server(_))
    }

    pub fn invalid(field: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ProviderError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// A cloud (or the local machine) that can run instances.
///
/// Every call may fail with a typed [`ProviderError`]; the engine retries the
/// retryable ones, so implementations must make `launch` idempotent per
/// `client_token` and `terminate`/`retag`/`stop`/`start` safe to repeat.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's kind, as in the spec (for messages; the engine never
    /// branches on it: it asks the plugin's [`Capabilities`]).
    fn kind(&self) -> &str;

    /// The node types this provider offers.
    fn catalog(&self) -> &[NodeType];

    /// The image used when a launch names none.
    fn default_image(&self) -> String;

    /// A suggested client-side rate limit for this provider, in calls per second.
    fn calls_per_second(&self) -> f64 {
        50.0
    }

    /// Put the motorpool runtime where this cloud's nodes can download it
    /// (the bucket the provider's settings name, made and tagged as the
    /// project's when missing), at most once per content, and hand back a
    /// URL that works for [`RuntimeUpload::valid_for`]. `Ok(None)`: these
    /// settings name no such place (the spec must give `runtime_url`).
    async fn publish_runtime(&self, runtime: &RuntimeUpload) -> Result<Option<String>> {
        let _ = runtime;
        Ok(None)
    }

    /// One page of the instances whose tags match `filter` (terminated ones
    /// may be included while the provider still reports them).
    async fn list_page(&self, filter: &TagFilter, page_token: Option<String>) -> Result<Page>;

    /// The instances among `ids` that exist, with their tags: how a node
    /// reads its own record (was it drawn into a cluster?) at a cost that
    /// does not grow with the project. A look-up by id, never a list of the
    /// account.
    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>>;

    /// Launch a batch of instances, tagged at birth.
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>>;

    /// Terminate instances; ids that are already gone are not an error.
    async fn terminate(&self, ids: &[String]) -> Result<()>;

    /// Stop instances (keep their disk, stop paying for compute).
    async fn stop(&self, ids: &[String]) -> Result<()>;

    /// Start stopped instances.
    async fn start(&self, ids: &[String]) -> Result<()>;

    /// Change tags on instances.
    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()>;

    /// Store `document` (a cluster's startup, as its nodes read it) under
    /// `name`, replacing what was there. Where the engine can reach the nodes
    /// (local, sim) there is nothing to store: the default does nothing.
    /// Clouds store it where a node drawn into the cluster from a pool can
    /// read it with its instance role (EC2: a launch template's user data).
    async fn put_cluster_boot(&self, name: &str, document: &str) -> Result<()> {
        let _ = (name, document);
        Ok(())
    }

    /// The document [`Provider::put_cluster_boot`] stored under `name`, if any.
    async fn get_cluster_boot(&self, name: &str) -> Result<Option<String>> {
        let _ = name;
        Ok(None)
    }

    /// Forget the document stored under `name` (gone already is fine).
    async fn delete_cluster_boot(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    // ---- the project lock held in the cloud ([`lock`]) ------------------
    //
    // The defaults mean "no cloud lock": the engine's local file lock is all
    // there is, which is enough where the project lives on this machine
    // (local, sim). A cloud that implements one implements all four.

    /// Take the project's lock as `lock` says (its id, holder and expiry),
    /// atomically: of two callers at once, one gets [`LockAttempt::Taken`].
    /// A held lock whose expiry passed is taken over, race-free (two takers
    /// of one expired lock never both win).
    async fn try_lock(&self, project: &str, lock: &LockInfo) -> Result<LockAttempt> {
        let _ = (project, lock);
        Ok(LockAttempt::NoCloudLock)
    }

    /// Extend the lease of the lock this caller holds to `lock.expires`.
    /// [`ProviderError::NotFound`] when it is no longer this caller's (it
    /// expired and was taken over, or was force-unlocked).
    async fn renew_lock(&self, project: &str, lock: &LockInfo) -> Result<()> {
        let _ = (project, lock);
        Ok(())
    }

    /// The project's lock as the cloud holds it now, if any (expired or not).
    async fn read_lock(&self, project: &str) -> Result<Option<LockInfo>> {
        let _ = project;
        Ok(None)
    }

    /// Remove the project's lock if its id is `id` (release by its holder,
    /// or `force-unlock`). Gone already is fine; a lock with another id is
    /// left alone and is [`ProviderError::NotFound`].
    async fn unlock(&self, project: &str, id: &str) -> Result<()> {
        let _ = (project, id);
        Ok(())
    }
}

/// How long to wait before retry number `attempt` (0-based): exponential
/// backoff from `base`, capped at `cap`, with full jitter from `jitter` in [0, 1).
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(cap);
    // "Equal jitter": never less than half the backoff, so retries still spread out.
    let half = capped / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors_are_throttling_and_server_errors_only() {
        assert!(ProviderError::Throttled("x".into()).is_retryable());
        assert!(ProviderError::Server("x".into()).is_retryable());
        assert!(!ProviderError::Capacity("x".into()).is_retryable());
        assert!(
            !ProviderError::invalid(Some("pools.a.node_type".to_string()), "bad").is_retryable()
        );
    }

    #[test]
    fn invalid_error_names_the_spec_field() {
        let e = ProviderError::invalid(Some("provider.image".to_string()), "no such AMI");
        assert_eq!(
            e.to_string(),
            "invalid request (spec field `provider.image`): no such AMI"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        assert_eq!(backoff_delay(0, base, cap, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(3, base, cap, 0.999).as_millis(), 799);
        assert_eq!(backoff_delay(30, base, cap, 0.0), Duration::from_secs(1));
    }
}
