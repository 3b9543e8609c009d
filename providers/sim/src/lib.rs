//! The sim provider: a simulated cloud, for scale benchmarks and fault tests.
//!
//! One simulated account lives in the SQLite database
//! `$MOTORPOOL_HOME/sim/state.db` (see [`state_path`] and `store.rs`): every
//! instance record, the id counter and the client tokens of past launches.
//! There are no processes; an instance is a record. Every call reads and
//! writes only the records it touches, so an account of 100,000 instances
//! costs per call what one of ten does; several processes may use one
//! account at once.
//!
//! Every API call made through a [`SimProvider`]:
//!
//! 1. sleeps [`SimConfig::latency`];
//! 2. fails with [`ProviderError::Throttled`] with probability
//!    [`SimConfig::throttle_rate`], else with [`ProviderError::Server`] with
//!    probability [`SimConfig::error_rate`]. For mutating calls (launch,
//!    terminate, stop, start, retag) half of those server errors happen *after*
//!    the change was made and saved: the response is lost, and only idempotent
//!    retries come out right;
//! 3. does its work.
//!
//! The fault draws come from one RNG per provider, seeded by
//! [`SimConfig::seed`] (random when `None`).
//!
//! Semantics:
//!
//! - `list_page` returns every instance whose tags hold all the filter pairs,
//!   sorted by id, [`SimConfig::page_size`] per page; the page token is a cursor
//!   (the last id returned), so instances launched or terminated between pages
//!   never make a page skip or repeat the others. Terminated instances are
//!   removed from the record set and never listed; stopped ones are listed.
//! - An instance is `Pending` for [`SimConfig::boot_time`] after its launch and
//!   after every `start`, then `Running`; `stop` makes it `Stopped` at once.
//! - `launch` is idempotent per client token: a known token returns the
//!   instances of the first launch in their current state (terminated ones as
//!   `Terminated`), never new ones; reusing a token with another node type or
//!   count is `Invalid`. An empty token means "no idempotency".
//! - Capacity: [`SimConfig::capacity`] bounds the live (pending or running)
//!   instances of the account; `launch` and `start` that would exceed it fail
//!   with [`ProviderError::Capacity`] and change nothing.
//! - `terminate` ignores unknown ids; `stop`, `start` and `retag` fail with
//!   [`ProviderError::NotFound`] (and change nothing) when any id is unknown, as
//!   EC2 does. All are safe to repeat.

pub mod plugin;
mod store;

pub use plugin::{SimPlugin, SimSettings};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, NodeType, Page, Provider, ProviderError, Result, Retag,
    TagFilter,
};

use store::{Job, Outcome, Rec, Store, TokenRec, Tx, format_id, parse_id};

/// The simulated cloud's node types, priced like a small public cloud.
pub fn catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 2, 4.0, 0.05),
        NodeType::new("medium", 4, 16.0, 0.19),
        NodeType::new("large", 8, 32.0, 0.38),
        NodeType::new("xlarge", 16, 64.0, 0.77),
    ]
}

/// The image instances get when a launch names none.
pub const DEFAULT_IMAGE: &str = "sim-image-1";

/// The provider kind.
pub const KIND: &str = "sim";

/// Where the simulated account of `home` (`$MOTORPOOL_HOME`) is stored.
pub fn state_path(home: &Path) -> PathBuf {
    home.join("sim").join("state.db")
}

/// How the simulated cloud behaves.
///
/// `home` has no sensible default: build with
/// `SimConfig { home, ..SimConfig::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// `$MOTORPOOL_HOME`; the account lives in `home/sim/`.
    pub home: PathBuf,
    /// Slept at the start of every API call.
    pub latency: Duration,
    /// Probability in [0, 1] that a call is throttled.
    pub throttle_rate: f64,
    /// Probability in [0, 1] that a call which was not throttled fails with a
    /// server error (for mutating calls, half of them after the change was saved).
    pub error_rate: f64,
    /// The most live (pending or running) instances the account holds; `None`: unbounded.
    pub capacity: Option<u32>,
    /// Instances per `list_page` page (at least 1).
    pub page_size: usize,
    /// How long an instance stays `Pending` after a launch or a start.
    pub boot_time: Duration,
    /// Seed of the fault-injection RNG; `None`: random.
    pub seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            home: PathBuf::new(),
            latency: Duration::ZERO,
            throttle_rate: 0.0,
            error_rate: 0.0,
            capacity: None,
            page_size: 1000,
            boot_time: Duration::ZERO,
            seed: None,
        }
    }
}

/// What fault injection decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Throttle,
    /// A server error before anything happened.
    ServerBefore,
    /// A server error after the change was made and saved: the response is lost.
    ServerAfter,
}

/// The simulated cloud. See the crate docs for its behaviour.
pub struct SimProvider {
    config: SimConfig,
    catalog: Vec<NodeType>,
    store: Arc<Store>,
    rng: Mutex<fastrand::Rng>,
    calls: AtomicU64,
}

impl std::fmt::Debug for SimProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimProvider")
            .field("config", &self.config)
            .field("api_calls", &self.api_calls())
            .finish_non_exhaustive()
    }
}

fn check_rate(name: &str, rate: f64) -> Result<()> {
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(ProviderError::invalid(
            Some(format!("provider.{name}")),
            format!("{name} must be between 0 and 1, got {rate}"),
        ))
    }
}

impl SimProvider {
    /// A provider on the account in `config.home` (created when missing).
    /// Does not read the state file yet: a corrupt one shows on the first call.
    pub fn new(config: SimConfig) -> Result<Self> {
        if config.home.as_os_str().is_empty() {
            return Err(ProviderError::invalid(
                Some("provider.home".to_string()),
                "the sim provider needs a home directory ($MOTORPOOL_HOME)",
            ));
        }
        check_rate("throttle_rate", config.throttle_rate)?;
        check_rate("error_rate", config.error_rate)?;
        if config.page_size == 0 {
            return Err(ProviderError::invalid(
                Some("provider.page_size".to_string()),
                "page_size must be at least 1",
            ));
        }
        let store = Store::open(config.home.join("sim"))?;
        let rng = match config.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Ok(SimProvider {
            config,
            catalog: catalog(),
            store: Arc::new(store),
            rng: Mutex::new(rng),
            calls: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The file holding this provider's account.
    pub fn state_path(&self) -> PathBuf {
        state_path(&self.config.home)
    }

    /// API calls made through this provider (every `list_page` page counts,
    /// and so do calls that failed by fault injection). The test helpers
    /// ([`vanish`](Self::vanish), [`tamper`](Self::tamper),
    /// [`snapshot`](Self::snapshot)) do not count.
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// How many transactions this provider committed (a launch of any count
    /// is one; concurrent mutations share them; calls that change nothing
    /// commit nothing).
    pub fn state_writes(&self) -> u64 {
        self.store.writes()
    }

    /// Test helper: delete an instance behind motorpool's back (no latency, no
    /// faults, not counted). `Ok(false)` when there was no such instance.
    pub async fn vanish(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        let job: Job = Box::new(move |tx: &Tx<'_>, _now| {
            let found = match parse_id(&id) {
                Some(n) => tx.remove(n)?,
                None => false,
            };
            Ok((Outcome::Found(found), found))
        });
        found(self.store.mutate(job).await?)
    }

    /// Test helper: change an instance behind motorpool's back (no latency, no
    /// faults, not counted), for drift tests. `f` sees the instance as
    /// `list_page` would report it; its changes to `node_type`, `image`, `tags`,
    /// `launched_at` and `state` are kept (`Stopped`/`Stopping`: stopped,
    /// `Terminated`: removed, `Pending`/`Running`: running; `id`, `address` and
    /// `pid` are ignored). `Ok(false)` when there was no such instance.
    pub async fn tamper<F>(&self, id: &str, f: F) -> Result<bool>
    where
        F: FnOnce(&mut Instance) + Send + 'static,
    {
        let id = id.to_string();
        let boot_ms = self.boot_ms();
        let job: Job = Box::new(move |tx: &Tx<'_>, now| {
            let Some((n, old)) = parse_id(&id)
                .map(|n| tx.get(n).map(|rec| rec.map(|rec| (n, rec))))
                .transpose()?
                .flatten()
            else {
                return Ok((Outcome::Found(false), false));
            };
            let before = to_instance(&id, &old, now, boot_ms);
            let mut after = before.clone();
            f(&mut after);
            if after == before {
                return Ok((Outcome::Found(true), false));
            }
            if after.state == InstanceState::Terminated {
                tx.remove(n)?;
                return Ok((Outcome::Found(true), true));
            }
            let mut rec = old.clone();
            rec.node_type = after.node_type;
            rec.image = after.image;
            rec.tags = after.tags;
            rec.stopped = matches!(
                after.state,
                InstanceState::Stopped | InstanceState::Stopping
            );
            if after.launched_at != before.launched_at {
                rec.launched_ms = after.launched_at.saturating_mul(1000);
                rec.started_ms = None;
            }
            tx.update(n, &old, &rec)?;
            Ok((Outcome::Found(true), true))
        });
        found(self.store.mutate(job).await?)
    }

    /// Test helper: every instance of the account, sorted by id, as
    /// `list_page` reports them (no latency, no faults, not counted).
    pub async fn snapshot(&self) -> Result<Vec<Instance>> {
        let boot_ms = self.boot_ms();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list(&TagFilter::new(), after, SNAPSHOT_PAGE)
                .await?;
            let now = store::now_ms();
            let more = page.len() > SNAPSHOT_PAGE;
            for (n, rec) in page.into_iter().take(SNAPSHOT_PAGE) {
                after = Some(n);
                all.push(into_instance(format_id(n), rec, now, boot_ms));
            }
            if !more {
                return Ok(all);
            }
        }
    }

    fn boot_ms(&self) -> u64 {
        u64::try_from(self.config.boot_time.as_millis()).unwrap_or(u64::MAX)
    }

    /// Count the call, sleep the latency, draw the fault. `Err` for a fault
    /// that happens before the call does anything.
    async fn begin(&self, op: &str, mutating: bool) -> Result<Fault> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let fault = self.draw(mutating);
        match fault {
            Fault::Throttle => Err(ProviderError::Throttled(format!(
                "sim: request limit exceeded ({op})"
            ))),
            Fault::ServerBefore => Err(server_error(op)),
            Fault::None | Fault::ServerAfter => Ok(fault),
        }
    }

    fn draw(&self, mutating: bool) -> Fault {
        let (throttle, error) = (self.config.throttle_rate, self.config.error_rate);
        if throttle <= 0.0 && error <= 0.0 {
            return Fault::None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        if rng.f64() < throttle {
            Fault::Throttle
        } else if rng.f64() < error {
            if mutating && rng.bool() {
                Fault::ServerAfter
            } else {
                Fault::ServerBefore
            }
        } else {
            Fault::None
        }
    }

    /// Run a mutating call: fault injection, then `job`; a lost response turns
    /// a success into a server error (the change stays saved).
    async fn mutating(&self, op: &str, job: Job) -> Result<Outcome> {
        let fault = self.begin(op, true).await?;
        let outcome = self.store.mutate(job).await?;
        if fault == Fault::ServerAfter {
            return Err(server_error(op));
        }
        Ok(outcome)
    }

    /// A job that applies `change` to every instance in `ids`, after checking
    /// they all exist (`NotFound` otherwise, changing nothing).
    fn for_existing<F>(&self, op: &'static str, ids: &[String], check_start: bool, change: F) -> Job
    where
        F: Fn(&mut Rec, u64) -> bool + Send + 'static,
    {
        let ids = ids.to_vec();
        let capacity = self.config.capacity;
        Box::new(move |tx: &Tx<'_>, now| {
            let numbers: BTreeSet<u64> = ids.iter().filter_map(|id| parse_id(id)).collect();
            let found = tx.get_many(&numbers)?;
            let known: BTreeSet<u64> = found.iter().map(|(n, _)| *n).collect();
            let missing: Vec<&str> = ids
                .iter()
                .filter(|id| !parse_id(id).is_some_and(|n| known.contains(&n)))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(ProviderError::NotFound(format!(
                    "sim: {op}: no such instance{} {}",
                    if missing.len() == 1 { "" } else { "s" },
                    list_ids(&missing)
                )));
            }
            if let (true, Some(cap)) = (check_start, capacity) {
                let starting = found.iter().filter(|(_, r)| r.stopped).count();
                check_capacity(tx, starting as u64, cap)?;
            }
            let mut changed = false;
            for (n, before) in &found {
                let mut after = before.clone();
                if change(&mut after, now) {
                    tx.update(*n, before, &after)?;
                    changed = true;
                }
            }
            Ok((Outcome::Done, changed))
        })
    }
}

fn found(outcome: Outcome) -> Result<bool> {
    match outcome {
        Outcome::Found(found) => Ok(found),
        other => Err(unexpected(other)),
    }
}

fn unexpected(outcome: Outcome) -> ProviderError {
    ProviderError::Internal(format!("sim: unexpected outcome {outcome:?}"))
}

fn server_error(op: &str) -> ProviderError {
    ProviderError::Server(format!("sim: internal error (503) during {op}"))
}

/// At most a handful of ids, for messages.
fn list_ids(ids: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = ids
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        s.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    s
}

/// Instances per page when [`SimProvider::snapshot`] reads the whole account.
const SNAPSHOT_PAGE: usize = 1000;

fn check_capacity(tx: &Tx<'_>, more: u64, capacity: u32) -> Result<()> {
    let live = tx.live_count()?;
    if live + more > u64::from(capacity) {
        return Err(ProviderError::Capacity(format!(
            "sim: {more} more instance(s) would exceed the account's capacity of {capacity} \
             ({live} live)"
        )));
    }
    Ok(())
}

/// An instance as the API reports it at `now` (Unix ms).
fn to_instance(id: &str, rec: &Rec, now: u64, boot_ms: u64) -> Instance {
    into_instance(id.to_string(), rec.clone(), now, boot_ms)
}

/// [`to_instance`] of a record read for the caller alone: moved, not copied.
fn into_instance(id: String, rec: Rec, now: u64, boot_ms: u64) -> Instance {
    let state = if rec.stopped {
        InstanceState::Stopped
    } else if now < rec.boot_start_ms().saturating_add(boot_ms) {
        InstanceState::Pending
    } else {
        InstanceState::Running
    };
    Instance {
        id,
        node_type: rec.node_type,
        image: rec.image,
        state,
        tags: rec.tags,
        address: None,
        pid: None,
        ips: Default::default(),
        launched_at: rec.launched_ms / 1000,
    }
}

/// The page token for the page after `id`; opaque to callers.
fn make_page_token(last_id: &str) -> String {
    format!("after:{last_id}")
}

fn parse_page_token(token: &str) -> Result<u64> {
    token
        .strip_prefix("after:")
        .and_then(parse_id)
        .ok_or_else(|| {
            ProviderError::invalid(
                None,
                format!("sim: not a page token of this provider: {token:?}"),
            )
        })
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn catalog(&self) -> &[NodeType] {
        &self.catalog
    }

    fn default_image(&self) -> String {
        DEFAULT_IMAGE.to_string()
    }

    /// The simulated API's own limits come from `throttle_rate`, not from a
    /// rate: no client-side limit that counts (a million calls a second), so
    /// that benchmarks measure the engine. (At 1,000 a second, the three or
    /// so calls per cluster alone made an apply of 10,000 clusters take 30 s.)
    fn calls_per_second(&self) -> f64 {
        1_000_000.0
    }

    /// A look-up by id in the account (as EC2's DescribeInstances by id).
    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>> {
        self.begin("describe", false).await?;
        let numbers: BTreeSet<u64> = ids.iter().filter_map(|id| parse_id(id)).collect();
        let found = self.store.get_many(numbers).await?;
        let now = store::now_ms();
        let boot_ms = self.boot_ms();
        Ok(found
            .into_iter()
            .map(|(n, rec)| into_instance(format_id(n), rec, now, boot_ms))
            .collect())
    }

    async fn list_page(&self, filter: &TagFilter, page_token: Option<String>) -> Result<Page> {
        self.begin("list", false).await?;
        let after = page_token.as_deref().map(parse_page_token).transpose()?;
        let size = self.config.page_size;
        let page = self.store.list(filter, after, size).await?;
        let now = store::now_ms();
        let boot_ms = self.boot_ms();
        let more = page.len() > size;
        let instances: Vec<Instance> = page
            .into_iter()
            .take(size)
            .map(|(n, rec)| into_instance(format_id(n), rec, now, boot_ms))
            .collect();
        let next_token = if more {
            instances.last().map(|i| make_page_token(&i.id))
        } else {
            None
        };
        Ok(Page {
            instances,
            next_token,
        })
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>> {
        let fault = self.begin("launch", true).await?;
        if request.count == 0 {
            return Err(ProviderError::invalid(
                Some("count".to_string()),
                "sim: launch needs a count of at least 1",
            ));
        }
        if !self.catalog.iter().any(|t| t.name == request.node_type) {
            let names: Vec<&str> = self.catalog.iter().map(|t| t.name.as_str()).collect();
            return Err(ProviderError::invalid(
                Some("node_type".to_string()),
                format!(
                    "sim: unknown node type {:?} (the sim offers {})",
                    request.node_type,
                    names.join(", ")
                ),
            ));
        }
        let req = request.clone();
        let image = req
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let capacity = self.config.capacity;
        let boot_ms = self.boot_ms();
        let job: Job = Box::new(move |tx: &Tx<'_>, now| {
            // (Empty tokens are never recorded.)
            let known = if req.client_token.is_empty() {
                None
            } else {
                tx.token(&req.client_token)?
            };
            if let Some(tok) = known {
                if tok.node_type != req.node_type || tok.count != req.count {
                    return Err(ProviderError::invalid(
                        Some("client_token".to_string()),
                        format!(
                            "sim: client token {:?} was used for a launch of {} {} \
                             instance(s), not {} {}",
                            req.client_token, tok.count, tok.node_type, req.count, req.node_type
                        ),
                    ));
                }
                let mut instances = Vec::with_capacity(tok.count as usize);
                for n in tok.numbers() {
                    let id = format_id(n);
                    instances.push(match tx.get(n)? {
                        Some(rec) => to_instance(&id, &rec, now, boot_ms),
                        None => Instance {
                            id,
                            node_type: tok.node_type.clone(),
                            image: tok.image.clone(),
                            state: InstanceState::Terminated,
                            tags: req.tags.clone(),
                            address: None,
                            ips: Default::default(),
                            pid: None,
                            launched_at: tok.launched_ms / 1000,
                        },
                    });
                }
                return Ok((Outcome::Instances(instances), false));
            }
            if let Some(cap) = capacity {
                check_capacity(tx, u64::from(req.count), cap)?;
            }
            let first = tx.next_number()?;
            let mut instances = Vec::with_capacity(req.count as usize);
            for n in first..first + u64::from(req.count) {
                let id = format_id(n);
                let rec = Rec {
                    node_type: req.node_type.clone(),
                    image: image.clone(),
                    stopped: false,
                    tags: req.tags.clone(),
                    launched_ms: now,
                    started_ms: None,
                };
                instances.push(to_instance(&id, &rec, now, boot_ms));
                tx.insert(n, &rec)?;
            }
            tx.set_next_number(first + u64::from(req.count))?;
            if !req.client_token.is_empty() {
                tx.insert_token(
                    &req.client_token,
                    &TokenRec {
                        first,
                        count: req.count,
                        node_type: req.node_type.clone(),
                        image,
                        launched_ms: now,
                    },
                )?;
            }
            Ok((Outcome::Instances(instances), true))
        });
        let outcome = self.store.mutate(job).await?;
        if fault == Fault::ServerAfter {
            return Err(server_error("launch"));
        }
        match outcome {
            Outcome::Instances(instances) => Ok(instances),
            other => Err(unexpected(other)),
        }
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        let ids = ids.to_vec();
        let job: Job = Box::new(move |tx: &Tx<'_>, _now| {
            let mut changed = false;
            for n in ids.iter().filter_map(|id| parse_id(id)) {
                changed |= tx.remove(n)?;
            }
            Ok((Outcome::Done, changed))
        });
        self.mutating("terminate", job).await.map(drop)
    }

    async fn stop(&self, ids: &[String]) -> Result<()> {
        let job = self.for_existing("stop", ids, false, |rec, _now| {
            let was = rec.stopped;
            rec.stopped = true;
            !was
        });
        self.mutating("stop", job).await.map(drop)
    }

    /// Starting a stopped instance makes it `Pending` for `boot_time` again;
    /// starting a pending or running one changes nothing.
    async fn start(&self, ids: &[String]) -> Result<()> {
        let job = self.for_existing("start", ids, true, |rec, now| {
            if !rec.stopped {
                return false;
            }
            rec.stopped = false;
            rec.started_ms = Some(now);
            true
        });
        self.mutating("start", job).await.map(drop)
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()> {
        let change = change.clone();
        let job = self.for_existing("retag", ids, false, move |rec, _now| {
            let mut changed = false;
            for (k, v) in &change.set {
                if rec.tags.get(k) != Some(v) {
                    rec.tags.insert(k.clone(), v.clone());
                    changed = true;
                }
            }
            for k in &change.remove {
                changed |= rec.tags.remove(k).is_some();
            }
            changed
        });
        self.mutating("retag", job).await.map(drop)
    }
}

#[cfg(test)]
mod tests;
