//! Building a plan: the spec's pools and clusters against what the provider
//! reports, into changes with reasons and ops.
//!
//! The rules, in the order they are applied:
//! 1. Every observed pool instance is sorted: healthy and available, gone
//!    (drift), stopped against `warm: running` (drift), retyped (drift), tag
//!    removed (drift), or built from an older spec (replace).
//! 2. Clusters, by name: created, replaced when a replace-forcing field
//!    changed (worker or driver node type, image, runtime), healed one for one
//!    when instances drifted, scaled to the spec's workers, retagged when their
//!    tags changed, or deleted. Instances come from the cluster's pool first
//!    (re-tagged), and the shortfall is launched, never beyond the pool's
//!    max_capacity; deleted or surplus instances go back to their pool.
//! 3. Pools: refilled to min_idle (within max_capacity), trimmed above
//!    min_idle once instances have idled past idle_timeout_minutes, deleted
//!    when gone from the spec.
//! 4. Instances whose kind or name tag was removed are terminated.
//!
//! Client tokens are derived from the plan's own content and its nonce, so
//! building the same plan twice with one nonce gives the same tokens, and two
//! plans never share one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use motorpool_provider::{Instance, InstanceState, NodeType, Tags, cheapest_fit, tags};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{APPLY_TIME, Action, Change, FORMAT_VERSION, Op, Plan, Role, Summary, plural};
use crate::observe::{Observed, ResourceKind, hex};
use crate::spec::{Cluster, Library, Pool, Resources, Spec, WarmMode};
use crate::words::{BootSpec, MountSpec, NamedFile, Step};

/// A pool instance that has not tagged itself warm this long after launch has failed to warm up.
const WARM_UP_LIMIT_SECS: u64 = 15 * 60;

/// A spec that cannot be planned against what exists.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("{address}: {message}")]
    Impossible { address: String, message: String },
}

/// What to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// Make reality match the spec.
    Normal,
    /// Only heal drift: bring back what the last apply left, ignore spec changes.
    RefreshOnly,
    /// Remove everything the project has.
    Destroy,
    /// What the controller keeps between applies, nothing the spec changed:
    /// pools refilled to `min_idle` and trimmed after their idle timeout,
    /// job clusters that outlived their run removed, and (`heal`) drift
    /// healed as `RefreshOnly` heals it. Pools and clusters new in the spec,
    /// gone from it or changed in a way that forces replacement are left to
    /// `apply`.
    Maintain { heal: bool },
}

impl PlanMode {
    /// Whether clusters are only healed (kept as the last apply left them),
    /// never changed to match the spec.
    fn clusters_only_heal(self) -> bool {
        matches!(self, PlanMode::RefreshOnly | PlanMode::Maintain { .. })
    }

    fn maintains(self) -> bool {
        matches!(self, PlanMode::Maintain { .. })
    }

    fn heals(self) -> bool {
        !matches!(self, PlanMode::Maintain { heal: false })
    }
}

/// Everything a plan is built from.
pub struct PlanInput<'a> {
    pub spec: &'a Spec,
    pub observed: &'a Observed,
    pub catalog: &'a [NodeType],
    pub default_image: &'a str,
    pub mode: PlanMode,
    /// Unix seconds, for idle timeouts.
    pub now: u64,
    /// How long a minute of the spec's `*_minutes` settings lasts (one real
    /// minute, but for tests: `MOTORPOOL_MINUTE_MS`).
    pub minute: std::time::Duration,
    /// Where the spec's relative paths (init scripts, mounts, requirements) resolve.
    pub base_dir: &'a Path,
    /// Clusters the user asked to start again after they stopped themselves.
    pub start: &'a BTreeSet<String>,
    /// Unique to this plan (random, from the engine): part of every client
    /// token, so that two plans from the same observed state (nothing, after
    /// a destroy) never share a token, which a cloud would answer with the
    /// instances of the first one, terminated. A saved plan keeps its tokens,
    /// and an interrupted apply replays its own from the journal.
    pub nonce: &'a str,
    /// The project's keys for secret env values (digests, sealing).
    pub secrets: &'a crate::secrets::SecretKey,
    /// What the controller decided from what clusters' drivers said
    /// (nothing, for every other command).
    pub choices: &'a ControllerChoices,
}

/// The controller's decisions a plan carries out, besides what the spec
/// and the observed state say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerChoices {
    /// Worker counts for autoscaled clusters (by name), from their load;
    /// kept within the spec's bounds. A cluster not here keeps the size it
    /// has (its `motorpool-size` tag).
    pub autoscaled: BTreeMap<String, u32>,
    /// Clusters to stop as their driver's autotermination would have: its
    /// agent stopped answering and the cluster idled past its
    /// `autotermination_minutes`.
    pub stop_idle: BTreeSet<String>,
}

impl ControllerChoices {
    /// Whether the controller decided something about cluster `name`.
    fn touches(&self, name: &str) -> bool {
        self.autoscaled.contains_key(name) || self.stop_idle.contains(name)
    }
}

/// Observed states this large have their fingerprint hashed on a thread of
/// its own while the changes are drafted (below it, a thread costs more
/// than it saves).
const FINGERPRINT_THREAD_FROM: usize = 5_000;

/// Build the plan.
pub fn build(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    // The fingerprint reads only the observed state, and at 100,000
    // instances it takes about as long as drafting the clusters' changes:
    // the two run side by side when a thread can be had.
    let (changes, fingerprint) = std::thread::scope(|scope| {
        let hashing = (input.observed.instance_count() >= FINGERPRINT_THREAD_FROM)
            .then(|| {
                std::thread::Builder::new()
                    .name("fingerprint".into())
                    .spawn_scoped(scope, || input.observed.fingerprint())
                    .ok()
            })
            .flatten();
        let changes = draft_changes(input);
        let fingerprint = match hashing {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => input.observed.fingerprint(),
        };
        (changes, fingerprint)
    });
    let mut changes = changes?;
    assign_tokens(&mut changes, &input.spec.project, &fingerprint, input.nonce);

    let summary = Summary::of(&changes);
    Ok(Plan {
        format_version: FORMAT_VERSION.to_string(),
        project: input.spec.project.clone(),
        provider: input.spec.provider.clone(),
        refresh_only: input.mode == PlanMode::RefreshOnly,
        destroy: input.mode == PlanMode::Destroy,
        created_at: input.now,
        observed_fingerprint: fingerprint,
        observed_instances: input.observed.instance_count() as u32,
        observed_pages: input.observed.pages,
        changes,
        summary,
    })
}

/// Every change, without client tokens yet (they hash the fingerprint).
fn draft_changes(input: &PlanInput<'_>) -> Result<Vec<Change>, PlanError> {
    let mut planner = Planner::new(input)?;
    let mut changes = Vec::new();

    let cluster_names: BTreeSet<String> = input
        .spec_clusters()
        .keys()
        .cloned()
        .chain(
            input
                .observed
                .names(ResourceKind::Cluster)
                .map(str::to_string),
        )
        .collect();
    for name in &cluster_names {
        let spec = input.spec_clusters().get(name);
        let members = input.observed.members(ResourceKind::Cluster, name);
        changes.push(planner.plan_cluster(name, spec, members)?);
    }
    let pool_names: Vec<String> = planner.pools.keys().cloned().collect();
    for name in &pool_names {
        changes.push(planner.plan_pool(name));
    }
    for orphan in &input.observed.orphans {
        if input.mode.heals() {
            changes.push(plan_orphan(orphan));
        }
    }

    add_dependencies(&mut changes, input.observed);
    if input.mode == PlanMode::RefreshOnly {
        for c in changes.iter_mut().filter(|c| !c.drift) {
            c.action = Action::NoOp;
            c.ops.clear();
        }
    }
    if input.mode.maintains() {
        // Clusters: only drift is healed, and outlived job clusters removed.
        for c in changes.iter_mut().filter(|c| {
            c.kind == ResourceKind::Cluster
                && !c.drift
                && c.action != Action::Delete
                && !input.choices.touches(&c.name)
        }) {
            c.action = Action::NoOp;
            c.ops.clear();
        }
    }
    Ok(changes)
}

impl PlanInput<'_> {
    fn spec_clusters(&self) -> &BTreeMap<String, Cluster> {
        static EMPTY: BTreeMap<String, Cluster> = BTreeMap::new();
        if self.mode == PlanMode::Destroy {
            &EMPTY
        } else {
            &self.spec.clusters
        }
    }

    fn spec_pools(&self) -> &BTreeMap<String, Pool> {
        static EMPTY: BTreeMap<String, Pool> = BTreeMap::new();
        if self.mode == PlanMode::Destroy {
            &EMPTY
        } else {
            &self.spec.pools
        }
    }
}

/// A change being drafted.
struct Draft {
    change: Change,
    /// Set when the action is decided by the rules (create, replace, delete);
    /// otherwise update when there are ops, no-op when there are none.
    action: Option<Action>,
}

impl Draft {
    fn new(kind: ResourceKind, name: &str) -> Draft {
        Draft {
            change: Change {
                address: kind.address(name),
                kind,
                name: name.to_string(),
                action: Action::NoOp,
                reasons: Vec::new(),
                drift: false,
                depends_on: Vec::new(),
                nodes_after: 0,
                hourly_cost_after: 0.0,
                ops: Vec::new(),
            },
            action: None,
        }
    }

    fn reason(&mut self, r: impl Into<String>) {
        self.change.reasons.push(r.into());
    }

    fn drift(&mut self, r: impl Into<String>) {
        self.change.drift = true;
        self.change.reasons.push(format!("drift: {}", r.into()));
    }

    fn op(&mut self, op: Op) {
        let empty = match &op {
            Op::Launch { count, .. } => *count == 0,
            Op::Retag { ids, .. }
            | Op::Start { ids }
            | Op::Stop { ids }
            | Op::Terminate { ids } => ids.is_empty(),
            Op::Bootstrap { .. } => false,
        };
        if !empty {
            self.change.ops.push(op);
        }
    }

    /// `takes N idle instances from pool P`, one reason per pool however many roles took.
    fn took_from_pool(&mut self, pool: &str, n: u32) {
        let prefix = "takes ";
        let suffix = format!(" from pool `{pool}`");
        let earlier = self
            .change
            .reasons
            .iter()
            .position(|r| r.starts_with(prefix) && r.ends_with(&suffix));
        let before: u32 = earlier
            .and_then(|i| {
                self.change.reasons[i][prefix.len()..]
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        let reason = format!("takes {}{suffix}", plural(before + n, "idle instance"));
        match earlier {
            Some(i) => self.change.reasons[i] = reason,
            None => self.change.reasons.push(reason),
        }
    }

    fn terminate(&mut self, instances: &[&Instance]) {
        self.op(Op::Terminate {
            ids: ids(instances),
        });
    }

    fn finish(mut self) -> Change {
        self.change.action = match self.action {
            Some(a) => a,
            None if self.change.ops.is_empty() => Action::NoOp,
            None => Action::Update,
        };
        self.change
    }
}

fn ids(instances: &[&Instance]) -> Vec<String> {
    instances.iter().map(|i| i.id.clone()).collect()
}

/// Where a cluster's driver or workers come from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Pool(String),
    NodeType(String),
}

/// A pool while the plan is being built: what it has, and what clusters take and give back.
struct PoolLedger<'a> {
    spec: Option<&'a Pool>,
    node_type: String,
    runtime: String,
    hash: String,
    /// Healthy idle instances clusters may take, running ones first.
    available: Vec<Instance>,
    /// Instances clusters give back in this plan (not available to other clusters in it).
    returned: Vec<Instance>,
    /// Live cluster instances drawn from this pool, after this plan.
    in_use: u32,
    /// Live cluster instances drawn from this pool before this plan.
    observed_in_use: u32,
    /// The pool's change, begun while sorting its instances.
    draft: Draft,
    /// The idle count the last apply left (its `motorpool-size` tag).
    recorded_size: Option<u32>,
    /// What idle instances set up on themselves (runtime, preloaded libraries).
    boot: Option<BootSpec>,
    /// Idle instances still warming up: not handed out, but counted as idle.
    warming: u32,
}

struct Planner<'a> {
    input: &'a PlanInput<'a>,
    pools: BTreeMap<String, PoolLedger<'a>>,
}

fn spec_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize()[..6])
}

fn resolve_node_type(
    address: &str,
    node_type: Option<&str>,
    resources: Option<&Resources>,
    catalog: &[NodeType],
) -> Result<String, PlanError> {
    let impossible = |message: String| PlanError::Impossible {
        address: address.to_string(),
        message,
    };
    match (node_type, resources) {
        (Some(t), _) => {
            if catalog.iter().any(|n| n.name == t) {
                Ok(t.to_string())
            } else {
                Err(impossible(format!(
                    "node type `{t}` is not offered by this provider"
                )))
            }
        }
        (None, Some(r)) => cheapest_fit(catalog, r.cpus, r.memory_gb)
            .map(|n| n.name.clone())
            .ok_or_else(|| {
                impossible(format!(
                    "no node type has {} cpus and {} GB of memory",
                    r.cpus, r.memory_gb
                ))
            }),
        (None, None) => Err(impossible(
            "names neither a pool, a node_type nor resources".into(),
        )),
    }
}

fn parse_u32_tag(i: &Instance, key: &str) -> Option<u32> {
    i.tag(key).and_then(|v| v.parse().ok())
}

/// What the spec asks of one cluster (see `Planner::cluster_shape`).
struct ClusterShape {
    worker_source: Source,
    driver_source: Source,
    worker_type: String,
    driver_type: String,
    /// What the nodes run (the `motorpool-runtime` tag).
    runtime: String,
    /// The replace-forcing fields' hash (the `motorpool-spec` tag).
    hash: String,
    /// The worker count the last apply left (the `motorpool-size` tag).
    recorded: Option<u32>,
    desired_workers: u32,
    /// Tags every instance of the cluster carries.
    base: Tags,
    boot: BootSpec,
}

/// What [`Planner::restart_if_autoterminated`] decided for a cluster.
enum Restart {
    /// It did not stop itself: plan on its members as observed.
    NotStopped,
    /// It stopped itself and stays so: nothing more to plan.
    StaysStopped,
    /// It starts again: its members as they will be.
    Starts(Vec<Instance>),
}

/// The name in a change's address (`cluster.etl` -> `etl`).
fn address_name(address: &str) -> &str {
    address.split_once('.').map_or(address, |(_, name)| name)
}

/// Mend the size tag and the user's tags on the instances that stay.
fn mend_cluster_tags(d: &mut Draft, shape: &ClusterShape, staying: &[&Instance]) {
    let mut set = Tags::new();
    let mut remove = BTreeSet::new();
    if staying
        .iter()
        .any(|i| parse_u32_tag(i, tags::SIZE) != Some(shape.desired_workers))
    {
        set.insert(tags::SIZE.to_string(), shape.desired_workers.to_string());
    }
    let wanted = user_tags_of(&shape.base);
    for i in staying {
        for (k, v) in &wanted {
            if i.tags.get(k) != Some(v) {
                set.insert(k.clone(), v.clone());
            }
        }
        for k in i.tags.keys() {
            if !k.starts_with("motorpool-") && !wanted.contains_key(k) && !remove.contains(k) {
                remove.insert(k.clone());
            }
        }
    }
    let user_changed = set.keys().any(|k| !k.starts_with("motorpool-")) || !remove.is_empty();
    if user_changed {
        d.reason("tags changed");
    }
    if !set.is_empty() || !remove.is_empty() {
        d.op(Op::Retag {
            ids: ids(staying),
            set,
            remove: remove.into_iter().collect(),
        });
    }
}

/// The largest `motorpool-size` tag among instances: what the last apply left.
fn recorded_size(instances: &[&Instance]) -> Option<u32> {
    instances
        .iter()
        .filter_map(|i| parse_u32_tag(i, tags::SIZE))
        .max()
}

/// User tags (not motorpool's own) of an instance.
fn user_tags(i: &Instance) -> Tags {
    i.tags
        .iter()
        .filter(|(k, _)| !k.starts_with("motorpool-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn read_file(
    input: &PlanInput<'_>,
    address: &str,
    what: &str,
    path: &str,
) -> Result<NamedFile, PlanError> {
    let relative = crate::confine::project_path(path).map_err(|e| PlanError::Impossible {
        address: address.to_string(),
        message: format!("{what} `{path}`: {e}"),
    })?;
    // Lexically inside, and inside through symlinks too.
    crate::confine::resolved_inside(input.base_dir, &relative).map_err(|e| {
        PlanError::Impossible {
            address: address.to_string(),
            message: format!("{what} `{path}`: {e}"),
        }
    })?;
    let full = input.base_dir.join(relative);
    let content = std::fs::read_to_string(&full).map_err(|e| PlanError::Impossible {
        address: address.to_string(),
        message: format!("cannot read {what} {}: {e}", full.display()),
    })?;
    Ok(NamedFile {
        name: path.to_string(),
        content,
    })
}

fn libraries(
    input: &PlanInput<'_>,
    address: &str,
    libs: &[Library],
) -> Result<(Vec<String>, Vec<NamedFile>), PlanError> {
    let mut pip = Vec::new();
    let mut requirements = Vec::new();
    for l in libs {
        if let Some(p) = &l.pip {
            pip.push(p.clone());
        }
        if let Some(r) = &l.requirements {
            requirements.push(read_file(input, address, "requirements file", r)?);
        }
    }
    Ok((pip, requirements))
}

/// What a pool's idle instances set up on themselves.
fn pool_boot(
    input: &PlanInput<'_>,
    address: &str,
    pool: &Pool,
    runtime: &str,
) -> Result<BootSpec, PlanError> {
    let libs = pool
        .preload
        .as_ref()
        .map(|p| p.libraries.as_slice())
        .unwrap_or(&[]);
    let (pip, requirements) = libraries(input, address, libs)?;
    let engine = pool.preload.as_ref().and_then(|p| p.engine.as_ref());
    Ok(BootSpec {
        runtime: runtime.to_string(),
        engine: engine.map(|e| e.kind.clone()).unwrap_or_default(),
        engine_version: engine.and_then(|e| e.version.clone()).unwrap_or_default(),
        engine_conf: BTreeMap::new(),
        pip,
        requirements,
        init_scripts: vec![],
        env: BTreeMap::new(),
        secret_env: BTreeMap::new(),
        mounts: vec![],
        autotermination_minutes: None,
        workers: 0,
        startup_timeout_minutes: pool.startup_timeout_minutes,
        worker_cores: 0,
        worker_memory_mb: 0,
    })
}

/// What a cluster's nodes run at startup.
fn cluster_boot(
    input: &PlanInput<'_>,
    address: &str,
    c: &Cluster,
    workers: u32,
    worker_type: Option<&NodeType>,
) -> Result<BootSpec, PlanError> {
    let (pip, requirements) = libraries(input, address, &c.libraries)?;
    let init_scripts = c
        .init_scripts
        .iter()
        .map(|s| read_file(input, address, "init script", s))
        .collect::<Result<Vec<_>, _>>()?;
    let unconfined =
        |m: &crate::spec::Mount, e: crate::confine::PathProblem| PlanError::Impossible {
            address: address.to_string(),
            message: format!("mount {:?} -> {:?}: {e}", m.source, m.target),
        };
    let mounts = c
        .mounts
        .iter()
        .map(|m| {
            let source = if m.source.contains("://") {
                m.source.clone()
            } else {
                let relative =
                    crate::confine::project_path(&m.source).map_err(|e| unconfined(m, e))?;
                crate::confine::resolved_inside(input.base_dir, &relative)
                    .map_err(|e| unconfined(m, e))?;
                crate::confine::resolve_below(input.base_dir, &relative)
                    .display()
                    .to_string()
            };
            Ok(MountSpec {
                source,
                target: crate::confine::node_target(&m.target).map_err(|e| unconfined(m, e))?,
                read_only: m.read_only,
            })
        })
        .collect::<Result<Vec<_>, PlanError>>()?;
    let (env, secret_env) = crate::secrets::boot_env(&c.env, input.base_dir, input.secrets)
        .map_err(|e| PlanError::Impossible {
            address: address.to_string(),
            message: e.to_string(),
        })?;
    Ok(BootSpec {
        runtime: c.runtime(),
        engine: match c.engine_kind() {
            crate::engines::DEFAULT_ENGINE => String::new(),
            other => other.to_string(),
        },
        engine_version: match c.engine_kind() {
            crate::engines::DEFAULT_ENGINE => String::new(),
            _ => c
                .engine
                .as_ref()
                .and_then(|e| e.version())
                .unwrap_or_default()
                .to_string(),
        },
        engine_conf: c.spark_conf.clone(),
        pip,
        requirements,
        init_scripts,
        env,
        secret_env,
        mounts,
        autotermination_minutes: c.autotermination_minutes,
        workers,
        startup_timeout_minutes: c.startup_timeout_minutes,
        // Sizes only engines other than the bundled one read, so that a
        // bundled cluster's boot document stays as it was.
        worker_cores: match (c.engine_kind(), worker_type) {
            (crate::engines::DEFAULT_ENGINE, _) | (_, None) => 0,
            (_, Some(t)) => t.cpus,
        },
        worker_memory_mb: match (c.engine_kind(), worker_type) {
            (crate::engines::DEFAULT_ENGINE, _) | (_, None) => 0,
            (_, Some(t)) => (t.memory_gb * 1024.0) as u32,
        },
    })
}

impl<'a> Planner<'a> {
    fn new(input: &'a PlanInput<'a>) -> Result<Planner<'a>, PlanError> {
        let mut pools = BTreeMap::new();
        let names: BTreeSet<&str> = input
            .spec_pools()
            .keys()
            .map(String::as_str)
            .chain(input.observed.names(ResourceKind::Pool))
            .collect();
        for name in names {
            let spec = input.spec_pools().get(name);
            let address = ResourceKind::Pool.address(name);
            let (node_type, runtime) = match spec {
                Some(p) => (
                    resolve_node_type(
                        &address,
                        p.node_type.as_deref(),
                        p.resources.as_ref(),
                        input.catalog,
                    )?,
                    p.preload
                        .as_ref()
                        .and_then(|pl| pl.runtime.clone())
                        .unwrap_or_else(|| crate::spec::DEFAULT_RUNTIME.to_string()),
                ),
                None => (String::new(), String::new()),
            };
            let libraries: Vec<String> = spec
                .and_then(|p| p.preload.as_ref())
                .map(|pl| {
                    pl.libraries
                        .iter()
                        .map(|l| format!("{:?}{:?}", l.pip, l.requirements))
                        .collect()
                })
                .unwrap_or_default();
            let hash = spec_hash(&[
                "pool",
                &node_type,
                input.default_image,
                &runtime,
                &libraries.join(","),
            ]);
            let boot = match spec {
                Some(p) => Some(pool_boot(input, &address, p, &runtime)?),
                None => None,
            };
            pools.insert(
                name.to_string(),
                PoolLedger {
                    spec,
                    node_type,
                    runtime,
                    hash,
                    available: Vec::new(),
                    returned: Vec::new(),
                    in_use: 0,
                    observed_in_use: 0,
                    draft: Draft::new(ResourceKind::Pool, name),
                    recorded_size: None,
                    boot,
                    warming: 0,
                },
            );
        }
        // Live cluster instances drawn from each pool (none without pools).
        for ((kind, _), members) in &input.observed.resources {
            if *kind != ResourceKind::Cluster || pools.is_empty() {
                continue;
            }
            for i in members
                .iter()
                .filter(|i| i.state != InstanceState::Terminated)
            {
                if let Some(ledger) = i.tag(tags::POOL).and_then(|p| pools.get_mut(p)) {
                    ledger.in_use += 1;
                    ledger.observed_in_use += 1;
                }
            }
        }
        let mut planner = Planner { input, pools };
        let names: Vec<String> = planner.pools.keys().cloned().collect();
        for name in names {
            planner.sort_pool_instances(&name);
        }
        Ok(planner)
    }

    /// Rule 1: sort a pool's observed idle instances.
    fn sort_pool_instances(&mut self, name: &str) {
        let members = self.input.observed.members(ResourceKind::Pool, name);
        let ledger = self
            .pools
            .get_mut(name)
            .expect("ledger exists for every pool name");
        let live: Vec<&Instance> = members
            .iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .collect();
        ledger.recorded_size = recorded_size(&live);
        let Some(spec) = ledger.spec else {
            return; // deleted: plan_pool terminates everything
        };
        let d = &mut ledger.draft;
        let mut to_terminate: Vec<&Instance> = Vec::new();
        let mut stale_fields: BTreeSet<String> = BTreeSet::new();
        for i in members {
            if i.state == InstanceState::Terminated {
                d.drift(format!("idle instance {} gone ({})", i.id, i.state));
                to_terminate.push(i);
                continue;
            }
            match i.tag(tags::SPEC) {
                None => {
                    d.drift(format!("tag {} removed from {}", tags::SPEC, i.id));
                    let mut set = Tags::new();
                    set.insert(tags::SPEC.into(), ledger.hash.clone());
                    d.op(Op::Retag {
                        ids: vec![i.id.clone()],
                        set,
                        remove: vec![],
                    });
                }
                Some(h) if h != ledger.hash => {
                    if i.node_type != ledger.node_type {
                        stale_fields.insert(format!(
                            "node_type ({} -> {})",
                            i.node_type, ledger.node_type
                        ));
                    } else if i.tag(tags::RUNTIME) != Some(ledger.runtime.as_str()) {
                        stale_fields.insert(format!(
                            "runtime ({} -> {})",
                            i.tag(tags::RUNTIME).unwrap_or("none"),
                            ledger.runtime
                        ));
                    } else if i.image != self.input.default_image {
                        stale_fields.insert(format!(
                            "image ({} -> {})",
                            i.image, self.input.default_image
                        ));
                    } else {
                        stale_fields.insert("preload".into());
                    }
                    to_terminate.push(i);
                    continue;
                }
                Some(_) => {}
            }
            if i.node_type != ledger.node_type {
                d.drift(format!(
                    "idle instance {} retyped ({} -> {})",
                    i.id, ledger.node_type, i.node_type
                ));
                to_terminate.push(i);
                continue;
            }
            if i.tag(tags::ROLE) != Some(Role::Idle.as_str()) {
                d.drift(format!("tag {} removed from {}", tags::ROLE, i.id));
                let mut set = Tags::new();
                set.insert(tags::ROLE.into(), Role::Idle.as_str().into());
                d.op(Op::Retag {
                    ids: vec![i.id.clone()],
                    set,
                    remove: vec![],
                });
            }
            match i.tag(tags::STEP) {
                Some(step) if step.starts_with("failed:") => {
                    d.reason(format!(
                        "warm-up of {} failed at {}",
                        i.id,
                        &step["failed:".len()..]
                    ));
                    to_terminate.push(i);
                    continue;
                }
                Some(step) if Step::parse(step).is_some_and(|s| s >= Step::Runtime) => {}
                _ if i.launched_at + WARM_UP_LIMIT_SECS > self.input.now => {
                    ledger.warming += 1;
                    continue;
                }
                _ => {
                    d.reason(format!(
                        "{} did not warm up within {} minutes",
                        i.id,
                        WARM_UP_LIMIT_SECS / 60
                    ));
                    to_terminate.push(i);
                    continue;
                }
            }
            let stopped = matches!(i.state, InstanceState::Stopped | InstanceState::Stopping);
            if stopped && spec.warm == WarmMode::Running {
                d.drift(format!("idle instance {} stopped", i.id));
                d.op(Op::Start {
                    ids: vec![i.id.clone()],
                });
                let mut started = i.clone();
                started.state = InstanceState::Pending;
                ledger.available.push(started);
                continue;
            }
            ledger.available.push(i.clone());
        }
        if !stale_fields.is_empty() {
            d.action = Some(Action::Replace);
            for f in stale_fields {
                d.reason(format!("{f} changed and forces replace of idle instances"));
            }
        }
        d.terminate(&to_terminate);
        // Running instances are handed out first, then the longest idle.
        ledger.available.sort_by_key(|i| {
            (
                !i.state.is_live(),
                parse_u32_tag(i, tags::IDLE_SINCE).unwrap_or(0),
                i.id.clone(),
            )
        });
    }

    fn source_of(
        &self,
        address: &str,
        pool: Option<&str>,
        node_type: Option<&str>,
        resources: Option<&Resources>,
    ) -> Result<Source, PlanError> {
        match pool {
            Some(p) => match self.pools.get(p) {
                Some(l) if l.spec.is_some() => Ok(Source::Pool(p.to_string())),
                _ => Err(PlanError::Impossible {
                    address: address.to_string(),
                    message: format!("pool `{p}` is not in the spec"),
                }),
            },
            None => resolve_node_type(address, node_type, resources, self.input.catalog)
                .map(Source::NodeType),
        }
    }

    fn node_type_of(&self, source: &Source) -> String {
        match source {
            Source::Pool(p) => self
                .pools
                .get(p)
                .map(|l| l.node_type.clone())
                .unwrap_or_default(),
            Source::NodeType(t) => t.clone(),
        }
    }

    fn price(&self, node_type: &str) -> f64 {
        self.input
            .catalog
            .iter()
            .find(|n| n.name == node_type)
            .map(|n| n.hourly_price)
            .unwrap_or(0.0)
    }

    /// Give a cluster `count` instances of `role`: idle ones from the pool
    /// first (re-tagged), the rest launched.
    fn allocate(
        &mut self,
        d: &mut Draft,
        role: Role,
        count: u32,
        source: &Source,
        base_tags: &Tags,
    ) -> Result<(), PlanError> {
        if count == 0 {
            return Ok(());
        }
        let mut tags = base_tags.clone();
        tags.insert(tags::ROLE.into(), role.as_str().into());
        match source {
            Source::NodeType(t) => {
                d.op(Op::Launch {
                    role,
                    count,
                    node_type: t.clone(),
                    image: None,
                    tags,
                    token: String::new(),
                    then_stop: false,
                    warm: None,
                });
            }
            Source::Pool(p) => {
                let ledger = self
                    .pools
                    .get_mut(p)
                    .expect("source_of checked the pool exists");
                let max = ledger.spec.map(|s| s.max_capacity).unwrap_or(0);
                tags.insert(tags::POOL.into(), p.clone());
                tags.insert(tags::POOL_SPEC.into(), ledger.hash.clone());
                let take = (count as usize).min(ledger.available.len());
                let taken: Vec<Instance> = ledger.available.drain(..take).collect();
                let shortfall = count - take as u32;
                if ledger.in_use + count > max {
                    return Err(PlanError::Impossible {
                        address: d.change.address.clone(),
                        message: format!(
                            "needs {} from pool `{p}`, which has room for {} (max_capacity {max}, {} in use)",
                            plural(count, "instance"),
                            max.saturating_sub(ledger.in_use),
                            ledger.in_use
                        ),
                    });
                }
                ledger.in_use += count;
                let stopped: Vec<&Instance> = taken.iter().filter(|i| !i.state.is_live()).collect();
                d.op(Op::Start { ids: ids(&stopped) });
                let taken_refs: Vec<&Instance> = taken.iter().collect();
                if !taken_refs.is_empty() {
                    d.took_from_pool(p, take as u32);
                }
                d.op(Op::Retag {
                    ids: ids(&taken_refs),
                    set: tags.clone(),
                    remove: vec![tags::IDLE_SINCE.to_string()],
                });
                let node_type = ledger.node_type.clone();
                d.op(Op::Launch {
                    role,
                    count: shortfall,
                    node_type,
                    image: None,
                    tags,
                    token: String::new(),
                    then_stop: false,
                    warm: None,
                });
            }
        }
        Ok(())
    }

    /// Let go of a cluster's live instances: back to their pool when it still
    /// exists and they fit it, terminated otherwise.
    fn release(&mut self, d: &mut Draft, instances: &[&Instance]) {
        let mut by_pool: BTreeMap<String, Vec<&Instance>> = BTreeMap::new();
        let mut terminate: Vec<&Instance> = Vec::new();
        for &i in instances {
            let pool = i
                .tag(tags::POOL)
                .and_then(|p| self.pools.get_mut(p).map(|l| (p, l)));
            match pool {
                Some((p, ledger)) => {
                    ledger.in_use = ledger.in_use.saturating_sub(1);
                    let fits = ledger.spec.is_some()
                        && i.state.is_live()
                        && i.node_type == ledger.node_type
                        && i.tag(tags::RUNTIME) == Some(ledger.runtime.as_str());
                    if fits {
                        by_pool.entry(p.to_string()).or_default().push(i);
                    } else {
                        terminate.push(i);
                    }
                }
                None => terminate.push(i),
            }
        }
        for (p, back) in by_pool {
            let ledger = self.pools.get_mut(&p).expect("grouped by existing pools");
            let mut set = Tags::new();
            set.insert(tags::KIND.into(), "pool".into());
            set.insert(tags::NAME.into(), p.clone());
            set.insert(tags::ROLE.into(), Role::Idle.as_str().into());
            set.insert(tags::SPEC.into(), ledger.hash.clone());
            set.insert(tags::IDLE_SINCE.into(), APPLY_TIME.into());
            set.insert(
                tags::SIZE.into(),
                ledger.spec.map(|s| s.min_idle).unwrap_or(0).to_string(),
            );
            set.insert(tags::STEP.into(), Step::Runtime.name().into());
            let mut remove: BTreeSet<String> = BTreeSet::new();
            remove.insert(tags::POOL.to_string());
            remove.insert(tags::POOL_SPEC.to_string());
            remove.insert(tags::BOOT.to_string());
            remove.insert(tags::JOB.to_string());
            remove.insert(tags::EXPIRES.to_string());
            for i in &back {
                remove.extend(user_tags(i).into_keys());
            }
            d.reason(format!(
                "returns {} to pool `{p}`",
                plural(back.len() as u32, "instance")
            ));
            d.op(Op::Retag {
                ids: ids(&back),
                set,
                remove: remove.into_iter().collect(),
            });
            ledger.returned.extend(back.into_iter().cloned());
        }
        d.terminate(&terminate);
    }

    /// A cluster's change, in named stages: removal when the spec no
    /// longer has it; else its shape from the spec, a restart when it had
    /// stopped itself, then create, replace, or heal and resize, and last
    /// the tags and the startup.
    fn plan_cluster(
        &mut self,
        name: &str,
        spec: Option<&Cluster>,
        members: &[Instance],
    ) -> Result<Change, PlanError> {
        let mut d = Draft::new(ResourceKind::Cluster, name);
        let gone: Vec<&Instance> = members
            .iter()
            .filter(|i| i.state == InstanceState::Terminated)
            .collect();
        let live: Vec<&Instance> = members
            .iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .collect();
        if let PlanMode::Maintain { heal } = self.input.mode {
            let outlived_job_cluster = spec.is_none()
                && live.iter().any(|i| i.tag(tags::JOB).is_some())
                && job_cluster_in_use(&live, self.input.now).is_none();
            let heals_this = heal && spec.is_some();
            let chosen = spec.is_some() && self.input.choices.touches(name);
            if !heals_this && !outlived_job_cluster && !chosen {
                return Ok(d.finish()); // the spec's business: apply's
            }
            if let Some(c) = spec.filter(|_| self.input.choices.stop_idle.contains(name)) {
                self.stop_idle_cluster(&mut d, c, &live);
                return Ok(d.finish());
            }
        }
        let Some(c) = spec else {
            self.remove_cluster(&mut d, &live, &gone);
            return Ok(d.finish());
        };
        let shape = self.cluster_shape(&d.change.address, c, &live)?;
        d.change.nodes_after = 1 + shape.desired_workers;
        d.change.hourly_cost_after = self.price(&shape.driver_type)
            + shape.desired_workers as f64 * self.price(&shape.worker_type);

        let restarted: Vec<Instance>;
        let live: Vec<&Instance> = match self.restart_if_autoterminated(&mut d, name, c, &live) {
            Restart::StaysStopped => return Ok(d.finish()),
            Restart::NotStopped => live,
            Restart::Starts(members) => {
                restarted = members;
                restarted.iter().collect()
            }
        };
        if live.is_empty() {
            if self.input.mode.clusters_only_heal() && gone.is_empty() {
                return Ok(d.finish()); // never applied: not drift
            }
            self.create_cluster(&mut d, &shape, &gone)?;
            return Ok(d.finish());
        }
        let stale: Vec<&Instance> = live
            .iter()
            .copied()
            .filter(|i| i.tag(tags::SPEC).is_some_and(|h| h != shape.hash))
            .collect();
        if !stale.is_empty() && self.input.mode.maintains() {
            return Ok(Draft::new(ResourceKind::Cluster, name).finish()); // apply replaces it
        }
        if !stale.is_empty() && self.input.mode != PlanMode::RefreshOnly {
            self.replace_cluster(&mut d, &shape, &stale, &live, &gone)?;
            return Ok(d.finish());
        }
        let staying = self.heal_and_resize(&mut d, &shape, &live, &gone)?;
        if !self.input.mode.clusters_only_heal() || self.input.choices.autoscaled.contains_key(name)
        {
            mend_cluster_tags(&mut d, &shape, &staying);
        }
        if let Some(a) = &c.autoscale
            && d.change.ops.is_empty()
            && d.action.is_none()
        {
            d.reason(format!(
                "autoscaled: {} now (min {}, max {}; the controller sizes it by load)",
                plural(shape.desired_workers, "worker"),
                a.min,
                a.max
            ));
        }
        self.schedule_startup(&mut d, shape.boot, &staying);
        Ok(d.finish())
    }

    /// The spec no longer has the cluster (or it is destroyed): its
    /// instances go back to their pool or away; a job cluster is left to
    /// its run.
    fn remove_cluster(&mut self, d: &mut Draft, live: &[&Instance], gone: &[&Instance]) {
        if self.input.mode == PlanMode::RefreshOnly {
            return;
        }
        if self.input.mode != PlanMode::Destroy
            && let Some((job, left)) = job_cluster_in_use(live, self.input.now)
        {
            // A job cluster belongs to its `motorpool run`, which removes it.
            d.reason(format!(
                "job cluster of a run of `{job}`: its run removes it (or plan does, {} from now)",
                minutes(left)
            ));
            return;
        }
        d.action = Some(Action::Delete);
        d.reason(
            match (self.input.mode, live.iter().find_map(|i| i.tag(tags::JOB))) {
                (PlanMode::Destroy, _) => "destroy".to_string(),
                (_, Some(job)) => format!("job cluster of a run of `{job}` that outlived its run"),
                _ => "not in spec any more".to_string(),
            },
        );
        d.terminate(gone);
        self.release(d, live);
    }

    /// Stop a cluster as its driver's autotermination would (the
    /// controller's choice when that driver's agent stopped answering):
    /// workers back to their pool or away, the driver marked and stopped.
    fn stop_idle_cluster(&mut self, d: &mut Draft, c: &Cluster, live: &[&Instance]) {
        if live.iter().any(|i| i.tag(tags::AUTOTERMINATED).is_some()) {
            return; // stopped already
        }
        let (drivers, workers): (Vec<&Instance>, Vec<&Instance>) = live
            .iter()
            .partition(|i| i.tag(tags::ROLE) == Some(Role::Driver.as_str()));
        d.reason(format!(
            "its driver's agent stopped answering and it idled {} minutes: stopped as its \
             autotermination would have (`motorpool apply --start` or `motorpool run` starts it again)",
            c.autotermination_minutes.unwrap_or(0)
        ));
        self.release(d, &workers);
        let mut set = Tags::new();
        set.insert(tags::AUTOTERMINATED.into(), APPLY_TIME.into());
        d.op(Op::Retag {
            ids: ids(&drivers),
            set,
            remove: vec![],
        });
        d.op(Op::Stop { ids: ids(&drivers) });
    }

    /// What the spec asks of the cluster: where its nodes come from, their
    /// types, what they run, how many workers, its tags and its startup.
    fn cluster_shape(
        &mut self,
        address: &str,
        c: &Cluster,
        live: &[&Instance],
    ) -> Result<ClusterShape, PlanError> {
        let worker_source = self.source_of(
            address,
            c.pool.as_deref(),
            c.node_type.as_deref(),
            c.resources.as_ref(),
        )?;
        let driver_source = match &c.driver {
            Some(dr) if dr.pool.is_some() || dr.node_type.is_some() || dr.resources.is_some() => {
                self.source_of(
                    address,
                    dr.pool.as_deref(),
                    dr.node_type.as_deref(),
                    dr.resources.as_ref(),
                )?
            }
            _ => worker_source.clone(),
        };
        let worker_type = self.node_type_of(&worker_source);
        let driver_type = self.node_type_of(&driver_source);
        let runtime = c.runtime();
        let hash = spec_hash(&[
            "cluster",
            &worker_type,
            &driver_type,
            self.input.default_image,
            &runtime,
        ]);

        let recorded = recorded_size(live);
        let healthy_workers_now = live
            .iter()
            .filter(|i| {
                i.tag(tags::ROLE) == Some(Role::Worker.as_str()) && i.node_type == worker_type
            })
            .count() as u32;
        let chosen = self.input.choices.autoscaled.get(address_name(address));
        let desired_workers = match (self.input.mode, &c.autoscale, c.workers) {
            (_, Some(a), None) if chosen.is_some() => {
                chosen.copied().unwrap_or(a.min).clamp(a.min, a.max)
            }
            (m, _, _) if m.clusters_only_heal() => recorded.unwrap_or(healthy_workers_now),
            (_, _, Some(n)) => n,
            (_, Some(a), None) => recorded.unwrap_or(a.min).clamp(a.min, a.max),
            (_, None, None) => 0,
        };

        let mut base = Tags::new();
        for (k, v) in &c.tags {
            if !k.starts_with("motorpool-") {
                base.insert(k.clone(), v.clone());
            }
        }
        base.insert(tags::PROJECT.into(), self.input.spec.project.clone());
        base.insert(tags::KIND.into(), "cluster".into());
        base.insert(tags::NAME.into(), address_name(address).to_string());
        base.insert(tags::SPEC.into(), hash.clone());
        base.insert(tags::RUNTIME.into(), runtime.clone());
        base.insert(tags::SIZE.into(), desired_workers.to_string());
        let worker_node = self.input.catalog.iter().find(|t| t.name == worker_type);
        let boot = cluster_boot(self.input, address, c, desired_workers, worker_node)?;
        Ok(ClusterShape {
            worker_source,
            driver_source,
            worker_type,
            driver_type,
            runtime,
            hash,
            recorded,
            desired_workers,
            base,
            boot,
        })
    }

    /// A cluster that stopped itself (autotermination) stays stopped until
    /// the user asks; asked, its instances start again, and the members as
    /// they will be are returned (copies: only such a cluster's members are
    /// copied, every other cluster is planned on the observed ones).
    fn restart_if_autoterminated(
        &mut self,
        d: &mut Draft,
        name: &str,
        c: &Cluster,
        live: &[&Instance],
    ) -> Restart {
        if !live.iter().any(|i| i.tag(tags::AUTOTERMINATED).is_some()) {
            return Restart::NotStopped;
        }
        if !self.input.start.contains(name) || self.input.mode.clusters_only_heal() {
            d.reason(format!(
                "stopped itself after {} idle minutes (autotermination); `motorpool apply --start {name}` or `motorpool run` starts it again",
                c.autotermination_minutes.unwrap_or(0)
            ));
            return Restart::StaysStopped;
        }
        d.reason("starts again (it had stopped itself after idling)");
        let stopped: Vec<&Instance> = live
            .iter()
            .copied()
            .filter(|i| !i.state.is_live())
            .collect();
        d.op(Op::Start { ids: ids(&stopped) });
        d.op(Op::Retag {
            ids: ids(live),
            set: Tags::new(),
            remove: vec![tags::AUTOTERMINATED.to_string()],
        });
        let mut members_now: Vec<Instance> = live.iter().map(|i| (*i).clone()).collect();
        for m in members_now.iter_mut() {
            m.state = InstanceState::Running;
            m.tags.remove(tags::AUTOTERMINATED);
        }
        Restart::Starts(members_now)
    }

    /// No live instance: make the cluster (again), then start it.
    fn create_cluster(
        &mut self,
        d: &mut Draft,
        shape: &ClusterShape,
        gone: &[&Instance],
    ) -> Result<(), PlanError> {
        d.action = Some(Action::Create);
        if gone.is_empty() {
            d.reason("new in spec");
        } else {
            d.drift(format!(
                "all {} gone",
                plural(gone.len() as u32, "instance")
            ));
        }
        d.terminate(gone);
        self.allocate_and_start(d, shape)
    }

    /// The driver and the workers allocated, then the startup.
    fn allocate_and_start(&mut self, d: &mut Draft, shape: &ClusterShape) -> Result<(), PlanError> {
        self.allocate(d, Role::Driver, 1, &shape.driver_source, &shape.base)?;
        self.allocate(
            d,
            Role::Worker,
            shape.desired_workers,
            &shape.worker_source,
            &shape.base,
        )?;
        d.op(Op::Bootstrap {
            spec: shape.boot.clone(),
        });
        Ok(())
    }

    /// A replace-forcing field changed: every instance goes (none back to a
    /// pool: they were built from the old spec) and the cluster is made anew.
    fn replace_cluster(
        &mut self,
        d: &mut Draft,
        shape: &ClusterShape,
        stale: &[&Instance],
        live: &[&Instance],
        gone: &[&Instance],
    ) -> Result<(), PlanError> {
        d.action = Some(Action::Replace);
        let mut fields = BTreeSet::new();
        for i in stale {
            let is_driver = i.tag(tags::ROLE) == Some(Role::Driver.as_str());
            let expected = if is_driver {
                &shape.driver_type
            } else {
                &shape.worker_type
            };
            if &i.node_type != expected {
                let which = if is_driver {
                    "driver node_type"
                } else {
                    "node_type"
                };
                fields.insert(format!(
                    "{which} changed ({} -> {expected}) and forces replace",
                    i.node_type
                ));
            }
            let rt = i.tag(tags::RUNTIME).unwrap_or("none");
            if rt != shape.runtime {
                fields.insert(format!(
                    "runtime changed ({rt} -> {}) and forces replace",
                    shape.runtime
                ));
            }
            if i.image != self.input.default_image {
                fields.insert(format!(
                    "image changed ({} -> {}) and forces replace",
                    i.image, self.input.default_image
                ));
            }
        }
        if fields.is_empty() {
            fields.insert("replace-forcing fields changed".to_string());
        }
        for f in fields {
            d.reason(f);
        }
        d.terminate(gone);
        for i in live {
            if let Some(l) = i.tag(tags::POOL).and_then(|p| self.pools.get_mut(p)) {
                l.in_use = l.in_use.saturating_sub(1);
            }
        }
        d.terminate(live);
        self.allocate_and_start(d, shape)
    }

    /// Heal drift one for one (gone, retyped, stopped, tags removed), keep
    /// one driver, then follow the spec's size. Returns the instances that
    /// stay.
    fn heal_and_resize<'i>(
        &mut self,
        d: &mut Draft,
        shape: &ClusterShape,
        live: &[&'i Instance],
        gone: &[&Instance],
    ) -> Result<Vec<&'i Instance>, PlanError> {
        let mut missing_driver = 0u32;
        let mut missing_workers = 0u32;
        for i in gone {
            let role = i.tag(tags::ROLE).unwrap_or("node");
            d.drift(format!("{role} {} gone ({})", i.id, i.state));
        }
        d.terminate(gone);
        let mut drivers: Vec<&Instance> = Vec::new();
        let mut workers: Vec<&Instance> = Vec::new();
        let mut retyped: Vec<&Instance> = Vec::new();
        let has_driver_tag = live
            .iter()
            .any(|o| o.tag(tags::ROLE) == Some(Role::Driver.as_str()));
        for &i in live {
            let role = match i.tag(tags::ROLE).and_then(Role::parse) {
                Some(r @ (Role::Driver | Role::Worker)) => r,
                _ => {
                    let r = if drivers.is_empty() && !has_driver_tag {
                        Role::Driver
                    } else {
                        Role::Worker
                    };
                    d.drift(format!("tag {} removed from {}", tags::ROLE, i.id));
                    let mut set = Tags::new();
                    set.insert(tags::ROLE.into(), r.as_str().into());
                    d.op(Op::Retag {
                        ids: vec![i.id.clone()],
                        set,
                        remove: vec![],
                    });
                    r
                }
            };
            let spec_tag = i.tag(tags::SPEC);
            if spec_tag.is_none() {
                d.drift(format!("tag {} removed from {}", tags::SPEC, i.id));
                let mut set = Tags::new();
                set.insert(tags::SPEC.into(), shape.hash.clone());
                d.op(Op::Retag {
                    ids: vec![i.id.clone()],
                    set,
                    remove: vec![],
                });
            }
            let expected = if role == Role::Driver {
                &shape.driver_type
            } else {
                &shape.worker_type
            };
            // Built from this spec (or its spec tag lost), yet another type: changed behind our back.
            let from_this_spec = spec_tag.is_none_or(|h| h == shape.hash);
            if &i.node_type != expected && from_this_spec {
                d.drift(format!(
                    "{} {} retyped ({expected} -> {})",
                    role.as_str(),
                    i.id,
                    i.node_type
                ));
                retyped.push(i);
                match role {
                    Role::Driver => missing_driver += 1,
                    _ => missing_workers += 1,
                }
                continue;
            }
            if matches!(i.state, InstanceState::Stopped | InstanceState::Stopping) {
                d.drift(format!("{} {} stopped", role.as_str(), i.id));
                d.op(Op::Start {
                    ids: vec![i.id.clone()],
                });
            }
            match role {
                Role::Driver => drivers.push(i),
                _ => workers.push(i),
            }
        }
        if !retyped.is_empty() {
            for i in &retyped {
                if let Some(l) = i.tag(tags::POOL).and_then(|p| self.pools.get_mut(p)) {
                    l.in_use = l.in_use.saturating_sub(1);
                }
            }
            d.terminate(&retyped);
        }
        for i in gone {
            match i.tag(tags::ROLE).and_then(Role::parse) {
                Some(Role::Driver) => missing_driver += 1,
                _ => missing_workers += 1,
            }
        }
        // More than one driver: keep the oldest.
        if drivers.len() > 1 {
            drivers.sort_by_key(|i| (i.launched_at, i.id.clone()));
            let extra: Vec<&Instance> = drivers.split_off(1);
            d.reason(format!("{} extra drivers", extra.len()));
            self.release(d, &extra);
        }
        if drivers.is_empty() {
            if missing_driver == 0 {
                d.drift("driver missing");
            }
            self.allocate(d, Role::Driver, 1, &shape.driver_source, &shape.base)?;
        }

        let desired = shape.desired_workers;
        let have = workers.len() as u32;
        if let Some(s) = shape.recorded {
            let accounted = have + missing_workers;
            if accounted < s {
                d.drift(format!("{} missing", plural(s - accounted, "worker")));
            }
        }
        if shape.recorded.is_some_and(|s| s != desired) {
            d.reason(format!(
                "workers {} -> {desired}",
                shape.recorded.unwrap_or(have)
            ));
        } else if shape.recorded.is_none() && have != desired {
            d.reason(format!("workers {have} -> {desired}"));
        }
        if have < desired {
            self.allocate(
                d,
                Role::Worker,
                desired - have,
                &shape.worker_source,
                &shape.base,
            )?;
        } else if have > desired {
            workers.sort_by_key(|i| {
                (
                    std::cmp::Reverse(i.launched_at),
                    std::cmp::Reverse(i.id.clone()),
                )
            });
            let extra: Vec<&Instance> = workers.drain(..(have - desired) as usize).collect();
            self.release(d, &extra);
        }
        Ok(drivers.into_iter().chain(workers).collect())
    }

    /// Startup: for nodes added or started, nodes that never reached ready,
    /// or when what the nodes run changed.
    fn schedule_startup(&self, d: &mut Draft, boot: BootSpec, staying: &[&Instance]) {
        let joined = d.change.ops.iter().any(|o| match o {
            Op::Launch { .. } | Op::Start { .. } => true,
            Op::Retag { set, .. } => set.get(tags::KIND).is_some_and(|k| k == "cluster"),
            _ => false,
        });
        let unfinished: Vec<&Instance> = staying
            .iter()
            .copied()
            .filter(|i| i.tag(tags::STEP) != Some(Step::Ready.name()))
            .collect();
        let boot_hash = boot.hash();
        let changed = staying
            .iter()
            .any(|i| i.tag(tags::BOOT).is_some_and(|h| h != boot_hash));
        let refresh_only = self.input.mode.clusters_only_heal();
        // A node that marked itself failed (its engine's daemon died) is
        // drift, healed by forming the cluster again, also on refresh.
        let failed: Vec<&Instance> = unfinished
            .iter()
            .copied()
            .filter(|i| i.tag(tags::STEP).is_some_and(|s| s.starts_with("failed:")))
            .collect();
        for i in &failed {
            let step = i.tag(tags::STEP).unwrap_or_default();
            d.drift(format!(
                "node {} failed at {} (its agent.log says why)",
                i.id,
                &step["failed:".len()..]
            ));
        }
        if !unfinished.is_empty() && failed.is_empty() && !joined && !refresh_only {
            let last = unfinished[0].tag(tags::STEP).unwrap_or("none");
            d.reason(format!(
                "startup incomplete on {} (last step finished: {last})",
                plural(unfinished.len() as u32, "node")
            ));
        }
        if changed && !refresh_only {
            d.reason("startup changed (libraries, init scripts, env or mounts)");
        }
        if joined || !failed.is_empty() || (!refresh_only && (changed || !unfinished.is_empty())) {
            d.op(Op::Bootstrap { spec: boot });
        }
    }

    /// Rule 3: one pool, after every cluster has taken and given back.
    fn plan_pool(&mut self, name: &str) -> Change {
        let now = self.input.now;
        let refresh_only = self.input.mode == PlanMode::RefreshOnly;
        let project = self.input.spec.project.clone();
        let observed = self.input.observed.members(ResourceKind::Pool, name);
        let unit_price = self
            .pools
            .get(name)
            .map(|l| self.price(&l.node_type))
            .unwrap_or(0.0);
        let ledger = self
            .pools
            .get_mut(name)
            .expect("ledger exists for every pool name");
        let maintains = self.input.mode.maintains();
        let Some(spec) = ledger.spec else {
            let mut d = Draft::new(ResourceKind::Pool, name);
            if refresh_only || maintains {
                return d.finish();
            }
            d.action = Some(Action::Delete);
            d.reason(if self.input.mode == PlanMode::Destroy {
                "destroy"
            } else {
                "not in spec any more"
            });
            let all: Vec<&Instance> = observed.iter().collect();
            d.terminate(&all);
            return d.finish();
        };
        let mut d = std::mem::replace(&mut ledger.draft, Draft::new(ResourceKind::Pool, name));
        let brand_new = observed.is_empty() && ledger.observed_in_use == 0;
        if maintains && (brand_new || d.action == Some(Action::Replace)) {
            return Draft::new(ResourceKind::Pool, name).finish(); // apply's: new or replaced
        }
        if !self.input.mode.heals() {
            // Mending tags and starting stopped instances is healing drift.
            d.change
                .ops
                .retain(|op| !matches!(op, Op::Retag { .. } | Op::Start { .. }));
        }
        if brand_new {
            if refresh_only {
                return d.finish();
            }
            d.action = Some(Action::Create);
            d.reason("new in spec");
        }

        let idle_after = (ledger.available.len() + ledger.returned.len()) as u32 + ledger.warming;
        let room = spec.max_capacity.saturating_sub(ledger.in_use);
        let target = if refresh_only {
            ledger.recorded_size.unwrap_or(idle_after).min(room)
        } else {
            spec.min_idle.min(room)
        };
        let mut idle_tags = Tags::new();
        idle_tags.insert(tags::PROJECT.into(), project);
        idle_tags.insert(tags::KIND.into(), "pool".into());
        idle_tags.insert(tags::NAME.into(), name.to_string());
        idle_tags.insert(tags::ROLE.into(), Role::Idle.as_str().into());
        idle_tags.insert(tags::SPEC.into(), ledger.hash.clone());
        idle_tags.insert(tags::RUNTIME.into(), ledger.runtime.clone());
        idle_tags.insert(tags::SIZE.into(), spec.min_idle.to_string());
        idle_tags.insert(tags::IDLE_SINCE.into(), APPLY_TIME.into());

        let mut idle_final = idle_after;
        if idle_after < target {
            let n = target - idle_after;
            if !brand_new {
                d.reason(format!(
                    "idle {idle_after} -> {target} (min_idle {})",
                    spec.min_idle
                ));
            }
            d.op(Op::Launch {
                role: Role::Idle,
                count: n,
                node_type: ledger.node_type.clone(),
                image: None,
                tags: idle_tags,
                token: String::new(),
                then_stop: spec.warm == WarmMode::Stopped,
                warm: ledger.boot.clone(),
            });
            idle_final = target;
        } else if idle_after > target && !refresh_only {
            // Over max_capacity: trim at once. Above min_idle: trim what idled past the timeout.
            let over_capacity = (idle_after + ledger.in_use).saturating_sub(spec.max_capacity);
            let timeout_ms = u64::from(spec.idle_timeout_minutes)
                .saturating_mul(self.input.minute.as_millis() as u64);
            let mut trim: Vec<&Instance> = Vec::new();
            let mut expired = 0u32;
            // Oldest idle first; returned instances have just become idle.
            for i in &ledger.available {
                if (trim.len() as u32) >= idle_after - target {
                    break;
                }
                let since = parse_u32_tag(i, tags::IDLE_SINCE)
                    .map(u64::from)
                    .unwrap_or(0);
                if (trim.len() as u32) < over_capacity {
                    trim.push(i);
                } else if since.saturating_mul(1000).saturating_add(timeout_ms)
                    <= now.saturating_mul(1000)
                {
                    trim.push(i);
                    expired += 1;
                }
            }
            if over_capacity > 0 {
                d.reason(format!(
                    "{} over max_capacity {}",
                    plural(over_capacity.min(trim.len() as u32), "idle instance"),
                    spec.max_capacity
                ));
            }
            if expired > 0 {
                d.reason(format!(
                    "{} above min_idle idle longer than {} minutes",
                    plural(expired, "instance"),
                    spec.idle_timeout_minutes
                ));
            }
            idle_final = idle_after - trim.len() as u32;
            d.terminate(&trim);
        }
        if ledger.warming > 0 {
            d.reason(format!(
                "{} warming up",
                plural(ledger.warming, "idle instance")
            ));
        }
        if spec.warm == WarmMode::Stopped && !refresh_only {
            let running: Vec<&Instance> = ledger
                .available
                .iter()
                .filter(|i| i.state.is_live())
                .collect();
            if !running.is_empty() {
                d.reason("warm: stopped");
                d.op(Op::Stop { ids: ids(&running) });
            }
        }
        d.change.nodes_after = idle_final;
        if spec.warm == WarmMode::Running {
            d.change.hourly_cost_after = f64::from(idle_final) * unit_price;
        }
        d.finish()
    }
}

fn user_tags_of(t: &Tags) -> Tags {
    t.iter()
        .filter(|(k, _)| !k.starts_with("motorpool-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Rule 4: an instance of the project whose kind or name tag was removed.
fn plan_orphan(i: &Instance) -> Change {
    let mut d = Draft::new(ResourceKind::Instance, &i.id);
    d.action = Some(Action::Delete);
    let missing: Vec<&str> = [tags::KIND, tags::NAME]
        .into_iter()
        .filter(|k| i.tag(k).is_none_or(str::is_empty))
        .collect();
    d.drift(format!(
        "tag {} removed; it belongs to no pool or cluster",
        missing.join(" and ")
    ));
    d.terminate(&[i]);
    d.finish()
}

/// Pools are created before the clusters that draw from them; clusters that
/// drew from a pool are deleted before it.
fn add_dependencies(changes: &mut [Change], observed: &Observed) {
    let pool_actions: BTreeMap<String, Action> = changes
        .iter()
        .filter(|c| c.kind == ResourceKind::Pool)
        .map(|c| (c.name.clone(), c.action))
        .collect();
    if pool_actions.is_empty() {
        // Only a pool's change depends on clusters or has clusters depend on it.
        return;
    }
    let mut cluster_pools: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in changes.iter().filter(|c| c.kind == ResourceKind::Cluster) {
        let mut pools = BTreeSet::new();
        for op in &c.ops {
            if let Op::Launch { tags: t, .. } | Op::Retag { set: t, .. } = op
                && let Some(p) = t.get(tags::POOL)
            {
                pools.insert(p.clone());
            }
        }
        for i in observed.members(ResourceKind::Cluster, &c.name) {
            if let Some(p) = i.tag(tags::POOL) {
                pools.insert(p.to_string());
            }
        }
        cluster_pools.insert(c.name.clone(), pools);
    }
    let cluster_actions: BTreeMap<String, Action> = changes
        .iter()
        .filter(|c| c.kind == ResourceKind::Cluster)
        .map(|c| (c.name.clone(), c.action))
        .collect();
    for c in changes.iter_mut() {
        match c.kind {
            ResourceKind::Cluster => {
                for p in cluster_pools.get(&c.name).into_iter().flatten() {
                    if pool_actions.get(p) == Some(&Action::Create) && c.action != Action::NoOp {
                        c.depends_on.push(ResourceKind::Pool.address(p));
                    }
                }
            }
            ResourceKind::Pool if c.action == Action::Delete => {
                for (cluster, pools) in &cluster_pools {
                    let acts = cluster_actions
                        .get(cluster)
                        .copied()
                        .unwrap_or(Action::NoOp);
                    if pools.contains(&c.name) && acts != Action::NoOp {
                        c.depends_on.push(ResourceKind::Cluster.address(cluster));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Client tokens from the plan's content and nonce: a retried launch of one
/// plan never makes a second batch, and no two plans share a token.
fn assign_tokens(changes: &mut [Change], project: &str, fingerprint: &str, nonce: &str) {
    for c in changes.iter_mut() {
        for (index, op) in c.ops.iter_mut().enumerate() {
            if let Op::Launch {
                role,
                count,
                node_type,
                token,
                ..
            } = op
            {
                let digest = spec_hash(&[
                    project,
                    fingerprint,
                    nonce,
                    &c.address,
                    &index.to_string(),
                    role.as_str(),
                    &count.to_string(),
                    node_type,
                ]);
                *token = format!("mp-{digest}");
            }
        }
    }
}

/// A job cluster whose run may still be going: the job's name and the
/// seconds left before it counts as outlived (`motorpool-expires`).
fn job_cluster_in_use(live: &[&Instance], now: u64) -> Option<(String, u64)> {
    live.iter().find_map(|i| {
        let job = i.tag(tags::JOB)?;
        let expires: u64 = i.tag(tags::EXPIRES)?.parse().ok()?;
        (expires > now).then(|| (job.to_string(), expires - now))
    })
}

fn minutes(seconds: u64) -> String {
    match seconds.div_ceil(60) {
        1 => "1 minute".to_string(),
        m => format!("{m} minutes"),
    }
}
