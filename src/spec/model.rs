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

/// The provider a spec gets when it names none: every node a local process.
pub const DEFAULT_PROVIDER: &str = motorpool_local::plugin::KIND;

/// The engine a cluster gets when it names none: the bundled runtime.
pub const DEFAULT_ENGINE: &str = "motorpool";

/// The provider and its own settings, selected by `kind`.
///
/// The engine reads only `kind` and the settings every provider shares
/// ([`SharedProviderSettings`]); the rest belongs to the provider's crate,
/// which brings its JSON Schema and its checks (see
/// [`motorpool_provider::ProviderPlugin`]) and reads it at connect time.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderBlock {
    /// A kind registered in [`crate::registry::Registry`].
    pub kind: String,
    /// What every provider understands.
    pub shared: SharedProviderSettings,
    /// The provider's own settings, as its crate reads them.
    pub settings: serde_json::Map<String, serde_json::Value>,
}

impl Default for ProviderBlock {
    fn default() -> Self {
        ProviderBlock {
            kind: DEFAULT_PROVIDER.to_string(),
            shared: SharedProviderSettings::default(),
            settings: serde_json::Map::new(),
        }
    }
}

impl ProviderBlock {
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The provider's own settings as one JSON object.
    pub fn settings_value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.settings.clone())
    }
}

/// Settings every provider shares, next to `kind` in the provider block.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharedProviderSettings {
    /// Where nodes download the motorpool runtime (the `motorpool` executable
    /// for the nodes' architecture) at boot: an https:// (or http://) URL.
    /// Required by providers whose nodes start themselves (clouds) when the
    /// spec has pools, clusters or jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_url: Option<String>,
    /// The SHA-256 (64 hex digits) of the file at `runtime_url`: a node
    /// refuses a download that does not match. Required with `runtime_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_sha256: Option<String>,
    /// How long apply waits for new nodes to start and report `ready`
    /// (fractions allowed, e.g. 0.5); default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_minutes: Option<f64>,
}

impl SharedProviderSettings {
    /// The keys of the provider block that are shared settings.
    pub const KEYS: [&'static str; 3] = ["runtime_url", "runtime_sha256", "ready_timeout_minutes"];
    /// The shared keys that only providers whose nodes download the runtime take.
    pub const RUNTIME_KEYS: [&'static str; 2] = ["runtime_url", "runtime_sha256"];
}

impl Serialize for ProviderBlock {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serde_json::Map::new();
        map.insert("kind".into(), serde_json::Value::String(self.kind.clone()));
        if let Ok(serde_json::Value::Object(shared)) = serde_json::to_value(&self.shared) {
            map.extend(shared);
        }
        map.extend(self.settings.clone());
        map.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ProviderBlock {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let kind = match map.remove("kind") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "`kind` must be a string, found {other}"
                )));
            }
            None => return Err(D::Error::missing_field("kind")),
        };
        let mut shared = serde_json::Map::new();
        for key in SharedProviderSettings::KEYS {
            if let Some(v) = map.remove(key) {
                shared.insert(key.to_string(), v);
            }
        }
        let shared = SharedProviderSettings::deserialize(serde_json::Value::Object(shared))
            .map_err(D::Error::custom)?;
        Ok(ProviderBlock {
            kind,
            shared,
            settings: map,
        })
    }
}

impl JsonSchema for ProviderBlock {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ProviderBlock".into()
    }

    /// A placeholder: the spec's schema replaces it with one branch per
    /// registered provider (`crate::spec::schema::spec_schema`).
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "The provider and its own settings, selected by `kind`.",
            "type": "object",
            "required": ["kind"],
            "properties": { "kind": { "type": "string" } }
        })
    }
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
    /// An engine installed ahead of time (`{ kind: spark, version: "4.0.1" }`):
    /// Java and the pinned pyspark, the slow part of a Spark node's setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineVersion>,
}

/// An environment variable's value: text, or a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EnvValue {
    Text(String),
    Secret(SecretValue),
}

impl From<&str> for EnvValue {
    fn from(text: &str) -> EnvValue {
        EnvValue::Text(text.to_string())
    }
}

fn yes() -> bool {
    true
}

/// A secret env value: shown as `(secret)` in every output, and (with
/// `from_env` or `from_file`) never written in the spec or in a saved
/// plan, but read when the plan is made and again at apply. Exactly one of
/// `from_env`, `from_file` or `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    /// Marks the value secret (the default; a value read from the
    /// environment or a file is always secret).
    #[serde(default = "yes")]
    pub secret: bool,
    /// The environment variable of the machine running motorpool that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    /// A file of the project (relative to the spec file) that holds the
    /// value; one trailing newline is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<String>,
    /// The value itself, written in the spec but shown nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
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
    /// Minutes without a running task after which `motorpool controller`
    /// shrinks the cluster back to `min` (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_minutes: Option<u32>,
}

/// Minutes an autoscaled cluster idles before the controller shrinks it.
pub const DEFAULT_SCALE_DOWN_MINUTES: u32 = 10;

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
    /// What the cluster runs: `motorpool` (the bundled runtime, the
    /// default), or `{ kind: ..., version: ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineRef>,
    /// The bundled runtime's version (default "1"); the same as
    /// `engine: { kind: motorpool, version: ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Spark properties for the cluster's daemons and every application
    /// (`spark.sql.shuffle.partitions: "8"`); values are strings. Only on
    /// a cluster with `engine: spark`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "text_only_map")]
    pub spark_conf: BTreeMap<String, String>,
    /// Scripts run on every node, in order, after the libraries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_scripts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<Library>,
    /// Environment variables of the nodes' startup steps and tasks: text,
    /// or a secret (`{ secret: true, from_env: NAME }`, `{ from_file:
    /// PATH }`, `{ secret: true, value: TEXT }`) that no output shows.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Extra tags on every instance of the cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The default runtime version.
pub const DEFAULT_RUNTIME: &str = "1";

/// The engine a cluster runs: `engine: motorpool`, or
/// `engine: { kind: motorpool, version: "1" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EngineRef {
    /// A registered engine's kind, at its default version.
    Kind(String),
    /// An engine's kind and version.
    Versioned(EngineVersion),
}

/// An engine and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineVersion {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl EngineRef {
    pub fn kind(&self) -> &str {
        match self {
            EngineRef::Kind(kind) => kind,
            EngineRef::Versioned(v) => &v.kind,
        }
    }

    pub fn version(&self) -> Option<&str> {
        match self {
            EngineRef::Kind(_) => None,
            EngineRef::Versioned(v) => v.version.as_deref(),
        }
    }
}

impl Cluster {
    /// The engine the cluster runs (a registered kind).
    pub fn engine_kind(&self) -> &str {
        self.engine.as_ref().map_or(DEFAULT_ENGINE, EngineRef::kind)
    }

    /// What the cluster's nodes run, as one word: the bundled runtime's
    /// version (`1`), else `<engine>` or `<engine>-<version>`. Recorded in
    /// the `motorpool-runtime` tag; a change forces a replace.
    pub fn runtime(&self) -> String {
        let version = self.engine.as_ref().and_then(EngineRef::version);
        let kind = self.engine_kind();
        if kind == DEFAULT_ENGINE {
            return version
                .or(self.runtime.as_deref())
                .unwrap_or(DEFAULT_RUNTIME)
                .to_string();
        }
        match version {
            Some(v) => format!("{kind}-{v}"),
            None => kind.to_string(),
        }
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
    /// When `motorpool controller` starts runs of the job by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<JobSchedule>,
    /// Environment variables of the job's tasks, over its cluster's: text,
    /// or a secret (`{ secret: true, from_env: NAME }`, `{ from_file: PATH
    /// }`, `{ secret: true, value: TEXT }`) read by `run` when it submits
    /// the job and never printed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    pub tasks: BTreeMap<String, Task>,
}

/// A job's schedule: `{ cron: "0 2 * * *", timezone: Europe/Berlin }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSchedule {
    /// Five cron fields (minute hour day-of-month month day-of-week), or
    /// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    pub cron: String,
    /// The IANA time zone the fields are read in (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl JobSchedule {
    /// The zone's name (`UTC` when not given).
    pub fn timezone(&self) -> &str {
        self.timezone.as_deref().unwrap_or("UTC")
    }
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
    /// A PySpark application handed to `spark-submit` on the driver node
    /// (clusters with `engine: spark`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spark: Option<SparkTask>,
    /// Where `part-NNNNN` files are written, relative to the spec file; or
    /// an object storage prefix (`s3://bucket/out/`, `gs://...`, `az://...`)
    /// the executors write `part-NNNNN` objects under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
}

/// The schema keyword that keeps a string from being written as a YAML
/// number or boolean (elsewhere `2` is read as `"2"`).
pub const TEXT_ONLY: &str = "x-motorpool-text-only";

/// A map of strings whose values must be written as text: Spark properties,
/// where YAML would silently turn `1e3` or `0x10` into other text.
fn text_only_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "type": "string", TEXT_ONLY: true }
    })
}

/// A PySpark application: `spark-submit [--py-files ...] [--conf k=v ...] script args...`
/// from the job's directory on the driver node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SparkTask {
    /// The application's main Python file, relative to the spec file.
    pub script: String,
    /// Arguments after the script (relative paths resolve in the job's directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Python files or zips put on the application's path, relative to the spec file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub py_files: Vec<String>,
    /// Spark properties for this application, over the cluster's `spark_conf`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "text_only_map")]
    pub conf: BTreeMap<String, String>,
}

/// The map side: input split into partitions, each fed to a command or a Python function.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapStage {
    /// A file or glob, relative to the spec file; or an object storage URL
    /// or glob (`s3://bucket/logs/*.txt`, `gs://...`, `az://container/...`)
    /// that the executors list and read themselves.
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
    /// Or the largest partition in MiB: the input is cut into partitions no
    /// larger (give or take Hadoop's 10% slop, so a few bytes over do not
    /// add a partition), as many as fill whole waves over the cluster's cores.
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
