//! The spec's data model: the Rust types a `motorpool.yaml` tree becomes.
//!
//! These types are the single source of truth for the spec: serde reads them,
//! and schemars turns them into `specs/motorpool.schema.json`, which both
//! editors and the loader's one-pass validator use. This module owns the
//! shapes and defaults only; loading, variables, includes and the checks that
//! span resources live in the sibling modules.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A whole project: one spec tree after includes, targets and variables are applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The project's name; every resource motorpool creates is tagged with it.
    pub project: String,
    /// Where instances run.
    #[serde(default)]
    pub provider: ProviderBlock,
    /// More spec files (globs, relative to this file) merged into this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Variables used as `${var.NAME}` anywhere in the spec.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, Variable>,
    /// Named overrides selected with `--target NAME`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, Target>,
    /// Pre-warmed idle instances that clusters draw from.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, Pool>,
    /// Limits that clusters opt into with `policy:`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, Policy>,
    /// Driver + workers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, Cluster>,
    /// DAGs of tasks that run on a cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jobs: BTreeMap<String, Job>,
}

/// The provider and its own settings, selected by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderBlock {
    /// Every instance is a real `motorpool agent` process on this machine.
    Local(LocalSettings),
    /// A simulated cloud: records in a file, with latency, throttling and errors.
    Sim(SimSettings),
    /// Amazon EC2: credentials and region from the standard AWS chain.
    Aws(AwsSettings),
}

impl Default for ProviderBlock {
    fn default() -> Self {
        ProviderBlock::Local(LocalSettings::default())
    }
}

impl ProviderBlock {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderBlock::Local(_) => "local",
            ProviderBlock::Sim(_) => "sim",
            ProviderBlock::Aws(_) => "aws",
        }
    }
}

/// Settings of the local provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// Instances listed per page (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
}

/// Settings of the simulated cloud.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimSettings {
    /// Latency of every API call, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Fraction (0..1) of calls refused as throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_rate: Option<f64>,
    /// Fraction (0..1) of calls failing with a server error (some after the change was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Most live (pending or running) instances at once; launches beyond fail with a capacity error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Instances listed per page (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Seconds from launch until an instance reports running (a simulated VM boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_seconds: Option<f64>,
}

/// Settings of the AWS provider (EC2). Credentials always come from the
/// standard AWS chain (environment, profile, instance role), never from the spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// The region, e.g. `us-east-1`; default: `AWS_REGION` or the AWS profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An AMI id (`ami-...`) or an SSM parameter name (`/aws/service/...`,
    /// resolved by EC2 at launch); default: the latest Amazon Linux 2023 (x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Subnets to launch into: launches are spread over them, and a subnet
    /// without capacity fails over to the next. Default: the default VPC's choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// An instance profile name or ARN, for the instances' own AWS access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// An EC2 key pair for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// Launch spot instances, falling back to on-demand when spot has no capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
    /// Root volume size in GiB (gp3); default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_gb: Option<u32>,
    /// Extra tags on every instance and volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The EC2 endpoint (e.g. a local emulator); default: `AWS_ENDPOINT_URL_EC2`,
    /// `AWS_ENDPOINT_URL`, else the region's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Instances per DescribeInstances page, 5 to 1000 (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Where nodes download the motorpool runtime (the `motorpool` executable
    /// for the nodes' architecture) at boot: an https:// (or http://) URL.
    /// Required when the spec has pools, clusters or jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_url: Option<String>,
    /// The SHA-256 (64 hex digits) of the file at `runtime_url`: a node
    /// refuses a download that does not match. Required with `runtime_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_sha256: Option<String>,
    /// How long apply waits for new nodes to start themselves and report
    /// `ready` (fractions allowed, e.g. 0.5); default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_minutes: Option<f64>,
}

/// A variable: its default, and what it is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    /// The value when neither `--var` nor the target sets one; a variable with no default must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Overrides applied by `--target NAME`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Variable values for this target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, serde_json::Value>,
    /// Provider settings merged over the top-level `provider` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Machine size as cpus and memory; the provider picks its cheapest type that fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpus: u32,
    pub memory_gb: f64,
}

/// Whether idle pool instances are kept running or stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WarmMode {
    /// Fastest to hand out.
    #[default]
    Running,
    /// Cheaper; started on demand.
    Stopped,
}

/// A pool: idle, already set-up instances that clusters draw from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// A provider catalog name (local: small, medium, large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// Or a size; the cheapest fitting type is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Idle instances kept warm on top of those in use.
    #[serde(default)]
    pub min_idle: u32,
    /// Idle + in use; never exceeded.
    pub max_capacity: u32,
    /// Idle instances above `min_idle` are removed after this many minutes.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_minutes: u32,
    #[serde(default)]
    pub warm: WarmMode,
    /// Most minutes each warm-up step (runtime setup, preloaded libraries) may
    /// take on an instance before it counts as failed (default 30, at most 1440).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_minutes: Option<u32>,
    /// Set-up done ahead of time on idle instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<Preload>,
}

fn default_idle_timeout() -> u32 {
    60
}

/// What a pool installs on its idle instances ahead of time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<Library>,
}

/// A library installed into a node's runtime: exactly one of `pip` or `requirements`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Library {
    /// A pip requirement, e.g. `requests==2.32.3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pip: Option<String>,
    /// A requirements file, relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<String>,
}

/// Limits a cluster opts into with `policy: NAME`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Most workers (for autoscale: the maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// Node types allowed for the driver and the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_types: Option<Vec<String>>,
    /// The cluster must set `autotermination_minutes`.
    #[serde(default)]
    pub require_autotermination: bool,
    /// Upper bound for `autotermination_minutes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_autotermination_minutes: Option<u32>,
}

/// Where the driver comes from when it differs from the workers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DriverSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// Bounds for an autoscaling cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
}

/// A path linked (local) or mounted (cloud) into every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// A local path (relative to the spec file), or s3://, gs://, az:// on clouds.
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A cluster: one driver node and N worker nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Draw instances from this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Or launch this node type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// Or launch the cheapest type with these resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The driver, when it comes from elsewhere than the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverSpec>,
    /// A fixed number of workers (default 0: a driver alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// Or a range of workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// Stop the cluster after this many idle minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autotermination_minutes: Option<u32>,
    /// Most minutes each startup step on a node may take (runtime setup,
    /// libraries, each init script, mounts) before startup fails (default 30,
    /// at most 1440).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_minutes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The motorpool runtime version (default "1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Scripts run on every node, in order, after the libraries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_scripts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<Library>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Extra tags on every instance of the cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The default runtime version.
pub const DEFAULT_RUNTIME: &str = "1";

impl Cluster {
    pub fn runtime(&self) -> &str {
        self.runtime.as_deref().unwrap_or(DEFAULT_RUNTIME)
    }

    /// The number of workers the cluster should have when created: `workers`,
    /// or the autoscale minimum.
    pub fn initial_workers(&self) -> u32 {
        match (&self.workers, &self.autoscale) {
            (Some(n), _) => *n,
            (None, Some(a)) => a.min,
            (None, None) => 0,
        }
    }
}

/// A job: a DAG of tasks run on a cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Run on this cluster (created first if it is not there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Or on a job cluster made for the run and removed after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_cluster: Option<Box<Cluster>>,
    /// Attempts after the first, for every task that does not set its own.
    #[serde(default)]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub tasks: BTreeMap<String, Task>,
}

/// A task: a command, or a map (with an optional reduce) over input partitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Task {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// A shell command run on the driver node in the job's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<ReduceStage>,
    /// Where `part-NNNNN` files are written, relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
}

/// The map side: input split into partitions, each fed to a command or a Python function.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapStage {
    /// A file or glob, relative to the spec file.
    pub input: String,
    /// Reads the partition's lines on stdin, writes `key<TAB>value` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Or a Python function: one record in, an iterable of (key, value) out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonFunction>,
    /// How many partitions to split the input into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Or a target partition size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_mb: Option<u32>,
}

/// The reduce side: map output grouped by key into `partitions` reducers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReduceStage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Reads `key<TAB>value` lines sorted by key on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Or an associative Python function (a, b) -> value, also used as a combiner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonFunction>,
}

/// A function in a Python file of the job's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PythonFunction {
    pub file: String,
    pub function: String,
    /// What one call of a map function receives: `record` (the default: one
    /// line in, an iterable of (key, value) out) or `partition` (an iterator
    /// over the partition's lines in, an iterable of (key, value) or a
    /// mapping out, as Spark's mapPartitions). Maps only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<PythonPer>,
}

/// What one call of a Python map function receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PythonPer {
    /// One record (a line without its newline).
    Record,
    /// An iterator over every record of the partition.
    Partition,
}
