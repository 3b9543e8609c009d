//! The local provider: every instance is a real, detached `motorpool agent`
//! process with its own directory and loopback address under `$MOTORPOOL_HOME`.
//!
//! Layout under `<home>/local/`:
//!
//! ```text
//! instances/<id>/instance.json   the record (id, node type, image, tags, state, pid, address, ...)
//! instances/<id>/agent.log       the agent's stdout and stderr
//! instances/<id>/agent.pid       the agent's pid, written by the forked child itself before exec
//! instances/<id>/agent.json      written by the agent once it listens (address, pid)
//! tokens/<client token>          the ids a launch with that idempotency token made
//! ```
//!
//! Every file here is private (0600 in 0700 directories, through
//! `motorpool_provider::private_files`): records and user data hold the
//! agent credential. Every record write is atomic (temporary file + rename). Records are
//! written before their agents are spawned, so a launch killed half way
//! leaves records that the next list reports (as terminated when their
//! process never started). No agent exists without its pid on disk: the
//! forked child writes `agent.pid` before it execs the agent, so a launcher
//! killed between fork and its record write leaves an agent that list,
//! terminate and a replayed launch still find. A record that says running but whose process is
//! dead (or whose pid now belongs to another program) is reported as
//! [`InstanceState::Terminated`]: that is drift for the engine to see.
//!
//! This crate never imports the engine: it only spawns `agent_program`.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, NodeType, Page, Provider, ProviderError, Result, Retag,
    TagFilter, Tags, private_files,
};
use serde::{Deserialize, Serialize};

pub mod plugin;
mod process;

pub use plugin::{LocalPlugin, LocalSettings};

use process::Liveness;

/// The local machine's node types: they size what an agent may use, and cost nothing.
pub fn catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 1, 2.0, 0.0),
        NodeType::new("medium", 2, 4.0, 0.0),
        NodeType::new("large", 4, 8.0, 0.0),
    ]
}

/// The only image the local provider runs: the motorpool binary's own runtime.
pub const DEFAULT_IMAGE: &str = "local-runtime-1";

/// How many instances a list page holds unless configured otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// How long a launch or start waits for an agent to write its `agent.json`.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long terminate and stop wait after SIGTERM before they SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(3);

const RECORD_FILE: &str = "instance.json";
const AGENT_FILE: &str = "agent.json";
/// The agent's pid, written by the child between fork and exec.
const PID_FILE: &str = "agent.pid";
/// The launch's user data, handed to the agent as `--config`.
const USER_DATA_FILE: &str = "user-data";
const LOG_FILE: &str = "agent.log";
const ID_PREFIX: &str = "local-";
/// How long a record may stay pending without a process before it counts as
/// dead even when its launcher still seems alive (its pid may have been reused).
const PENDING_LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(5);

/// The home directory motorpool uses when `$MOTORPOOL_HOME` is not set: `~/.motorpool`.
pub fn default_home() -> Option<PathBuf> {
    match std::env::var_os("MOTORPOOL_HOME") {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".motorpool")),
    }
}

/// How the local provider is set up.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// `$MOTORPOOL_HOME`; the provider keeps its state under `<home>/local/`.
    pub home: PathBuf,
    /// The motorpool binary: instances run
    /// `<agent_program> agent --dir DIR --listen 127.0.0.1:0 --instance-id ID`.
    pub agent_program: PathBuf,
    /// Instances per list page (default 100).
    pub page_size: usize,
}

impl LocalConfig {
    /// A configuration with the default page size.
    pub fn new(home: impl Into<PathBuf>, agent_program: impl Into<PathBuf>) -> Self {
        LocalConfig {
            home: home.into(),
            agent_program: agent_program.into(),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// The local provider. Cheap to share: clones see the same state.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    agent_program: PathBuf,
    page_size: usize,
    catalog: Vec<NodeType>,
    start_timeout: Duration,
    stop_grace: Duration,
    /// One lock per instance id (and per client token): the writers of a record
    /// in this process take turns. Across processes the engine's project lock rules.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// The record of one instance: `instances/<id>/instance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: String,
    node_type: String,
    image: String,
    #[serde(default)]
    tags: Tags,
    /// pending, running or stopped: what the provider last did to it.
    state: InstanceState,
    launched_at: u64,
    #[serde(default)]
    client_token: String,
    /// The agent's process id (from its agent.json once it listens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    /// The process group the agent runs in (the pid of the spawned program).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pgid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    /// The `--dir` the agent was started with: how its process is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dir: Option<PathBuf>,
    /// The process that is launching (or starting) the instance while it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    launcher_pid: Option<u32>,
    /// Unix seconds of the last spawn of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spawned_at: Option<u64>,
}

/// What a client token maps to: `tokens/<token>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TokenRecord {
    client_token: String,
    count: u32,
    node_type: String,
    image: String,
    ids: Vec<String>,
}

/// The content of an agent's `agent.json`.
#[derive(Debug, Clone, Deserialize)]
struct AgentFile {
    address: String,
    pid: u32,
    #[serde(default)]
    instance_id: Option<String>,
}

/// An agent spawned by this process and not yet known to listen.
struct Spawned {
    id: String,
    dir: PathBuf,
    pgid: u32,
    exited: Arc<Mutex<Option<ExitStatus>>>,
}

impl LocalProvider {
    /// Checks the configuration; creates nothing until the first launch.
    pub fn new(config: LocalConfig) -> Result<Self> {
        if config.page_size == 0 {
            return Err(ProviderError::invalid(
                None,
                "the local provider's page size must be at least 1",
            ));
        }
        if config.home.as_os_str().is_empty() {
            return Err(ProviderError::invalid(
                None,
                "the local provider needs a home directory ($MOTORPOOL_HOME)",
            ));
        }
        let home = std::path::absolute(&config.home).map_err(|e| {
            ProviderError::Internal(format!(
                "cannot resolve the motorpool home {}: {e}",
                config.home.display()
            ))
        })?;
        let root = home.join("local");
        for path in [&home, &root, &root.join("instances"), &root.join("tokens")] {
            match fs::metadata(path) {
                Ok(meta) if !meta.is_dir() => {
                    return Err(ProviderError::Internal(format!(
                        "{} is not a directory (the local provider keeps its instances there)",
                        path.display()
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ProviderError::Internal(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(LocalProvider {
            inner: Arc::new(Inner {
                root,
                agent_program: config.agent_program,
                page_size: config.page_size,
                catalog: catalog(),
                start_timeout: DEFAULT_START_TIMEOUT,
                stop_grace: DEFAULT_STOP_GRACE,
                locks: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Changes how long launch and start wait for an agent to listen (default 15 s).
    pub fn with_start_timeout(mut self, timeout: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.start_timeout = timeout;
        }
        self
    }

    /// Changes how long terminate and stop wait after SIGTERM before SIGKILL (default 3 s).
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.stop_grace = grace;
        }
        self
    }

    /// The directory of instance `id`: `<home>/local/instances/<id>`
    /// (`None` when `id` is not a local instance id).
    pub fn instance_dir(&self, id: &str) -> Option<PathBuf> {
        valid_id(id).then(|| self.inner.instance_dir(id))
    }

    /// The agent log of instance `id`: `<home>/local/instances/<id>/agent.log`
    /// (`None` when `id` is not a local instance id).
    pub fn log_path(&self, id: &str) -> Option<PathBuf> {
        self.instance_dir(id).map(|dir| dir.join(LOG_FILE))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ProviderError::Internal(format!("the local provider failed: {e}")))?
    }

    /// Runs `f` for every id at once (each on its own blocking thread) and
    /// collects the failures.
    async fn each(
        &self,
        ids: &[String],
        f: impl Fn(&Inner, &str) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let f = Arc::new(f);
        let mut tasks = Vec::with_capacity(ids.len());
        for id in unique(ids) {
            let inner = self.inner.clone();
            let f = f.clone();
            tasks.push(tokio::task::spawn_blocking(move || f(&inner, &id)));
        }
        let mut errors = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(ProviderError::Internal(format!(
                    "the local provider failed: {e}"
                ))),
            }
        }
        combine(errors)
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> &str {
        "local"
    }

    fn catalog(&self) -> &[NodeType] {
        &self.inner.catalog
    }

    fn default_image(&self) -> String {
        DEFAULT_IMAGE.to_string()
    }

    fn calls_per_second(&self) -> f64 {
        1000.0
    }

    async fn list_page(&self, filter: &TagFilter, page_token: Option<String>) -> Result<Page> {
        if let Some(token) = page_token.as_deref().filter(|t| !valid_id(t)) {
            return Err(ProviderError::invalid(
                None,
                format!("not a page token of the local provider: {token:?}"),
            ));
        }
        let filter = filter.clone();
        self.blocking(move |inner| inner.list_page(&filter, page_token.as_deref()))
            .await
    }

    /// One record read per id: the cost does not grow with the instances.
    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>> {
        let ids = ids.to_vec();
        self.blocking(move |inner| {
            let mut found = Vec::new();
            for id in ids.iter().filter(|id| valid_id(id)) {
                if let Some(record) = inner.read_record(id)? {
                    found.push(inner.observe(&record));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>> {
        let request = request.clone();
        self.blocking(move |inner| inner.launch(&request)).await
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        check_ids(ids)?;
        self.each(ids, |inner, id| inner.terminate_one(id)).await
    }

    async fn stop(&self, ids: &[String]) -> Result<()> {
        check_ids(ids)?;
        let ids_owned = ids.to_vec();
        self.blocking(move |inner| inner.require_known(&ids_owned))
            .await?;
        self.each(ids, |inner, id| inner.stop_one(id)).await
    }

    async fn start(&self, ids: &[String]) -> Result<()> {
        check_ids(ids)?;
        let ids = unique(ids);
        self.blocking(move |inner| {
            inner.require_known(&ids)?;
            inner.start(&ids)
        })
        .await
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()> {
        check_ids(ids)?;
        let ids = unique(ids);
        let change = change.clone();
        self.blocking(move |inner| {
            inner.require_known(&ids)?;
            let mut errors = Vec::new();
            for id in &ids {
                if let Err(e) = inner.retag_one(id, &change) {
                    errors.push(e);
                }
            }
            combine(errors)
        })
        .await
    }
}

impl Inner {
    fn instances_dir(&self) -> PathBuf {
        self.root.join("instances")
    }

    fn tokens_dir(&self) -> PathBuf {
        self.root.join("tokens")
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.instances_dir().join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.instance_dir(id).join(RECORD_FILE)
    }

    /// The in-process lock of a record (or token): `key` is `id:<id>` or `token:<t>`.
    fn lock_of(&self, key: &str) -> Arc<Mutex<()>> {
        let mut locks = locked(&self.locks);
        locks
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone()
    }

    fn forget_lock(&self, key: &str) {
        locked(&self.locks).remove(key);
    }

    fn ensure_dirs(&self) -> Result<()> {
        for dir in [self.root.clone(), self.instances_dir(), self.tokens_dir()] {
            private_files::create_dir(&dir).map_err(|e| match fs::metadata(&dir) {
                Ok(meta) if !meta.is_dir() => ProviderError::Internal(format!(
                    "{} is not a directory (the local provider keeps its instances there)",
                    dir.display()
                )),
                _ => internal_io("cannot create", &dir, e),
            })?;
        }
        Ok(())
    }

    // ---- records -------------------------------------------------------

    /// Reads a record; `Ok(None)` when the instance does not exist (any more).
    fn read_record(&self, id: &str) -> Result<Option<Record>> {
        let path = self.record_path(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(internal_io("cannot read the instance record", &path, e)),
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::Internal(format!(
                "the instance record {} is not valid: {e} (terminate the instance or remove its directory)",
                path.display()
            ))
        })?;
        if record.id != id {
            return Err(ProviderError::Internal(format!(
                "the instance record {} names another instance ({:?})",
                path.display(),
                record.id
            )));
        }
        Ok(Some(record))
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| ProviderError::Internal(format!("cannot encode a record: {e}")))?;
        self.write_atomically(&self.record_path(&record.id), &bytes)
    }

    /// Read-modify-write of a record under its lock. `Ok(None)` when it is gone.
    fn update_record(
        &self,
        id: &str,
        change: impl FnOnce(&mut Record) -> bool,
    ) -> Result<Option<Record>> {
        let lock = self.lock_of(&format!("id:{id}"));
        let _guard = lock_guard(&lock);
        let Some(mut record) = self.read_record(id)? else {
            return Ok(None);
        };
        if change(&mut record) {
            self.write_record(&record)?;
        }
        Ok(Some(record))
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        private_files::write(path, bytes).map_err(|e| internal_io("cannot write", path, e))
    }

    /// The ids of every instance directory, sorted.
    fn all_ids(&self) -> Result<Vec<String>> {
        let dir = self.instances_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(internal_io("cannot read", &dir, e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| internal_io("cannot read", &dir, e))?;
            let name = entry.file_name();
            if let Some(name) = name.to_str().filter(|n| valid_id(n)) {
                ids.push(name.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn require_known(&self, ids: &[String]) -> Result<()> {
        let mut missing = Vec::new();
        for id in ids {
            if self.read_record(id)?.is_none() {
                missing.push(id.as_str());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::NotFound(format!(
                "no local instance {}",
                missing.join(", ")
            )))
        }
    }

    // ---- observing -----------------------------------------------------

    /// What is really going on with a record's process.
    fn observe(&self, record: &Record) -> Instance {
        let dir = record
            .dir
            .clone()
            .unwrap_or_else(|| self.instance_dir(&record.id));
        let alive = |pid: Option<u32>| {
            pid.is_some_and(|pid| process::liveness(pid, &dir) == Liveness::Alive)
        };
        let recorded_pid = known_pid(record, &dir);
        let mut address = record.address.clone();
        let state = match record.state {
            InstanceState::Running => {
                if alive(recorded_pid) {
                    InstanceState::Running
                } else {
                    InstanceState::Terminated
                }
            }
            InstanceState::Pending => {
                if alive(recorded_pid) {
                    // Spawned; listening once its agent.json names it.
                    match read_agent_file(&dir) {
                        Some(file) if Some(file.pid) == recorded_pid => {
                            address = Some(file.address);
                            InstanceState::Running
                        }
                        _ => InstanceState::Pending,
                    }
                } else if recorded_pid.is_some() {
                    // It was spawned and is gone.
                    InstanceState::Terminated
                } else if self.launcher_alive(record) {
                    InstanceState::Pending
                } else {
                    // The process that launched it died before it started its agent.
                    InstanceState::Terminated
                }
            }
            InstanceState::Stopping | InstanceState::Stopped => InstanceState::Stopped,
            InstanceState::Terminated => InstanceState::Terminated,
        };
        let pid = match state {
            InstanceState::Running | InstanceState::Pending => recorded_pid,
            _ => None,
        };
        if state != InstanceState::Running {
            address = None;
        }
        Instance {
            id: record.id.clone(),
            node_type: record.node_type.clone(),
            image: record.image.clone(),
            state,
            tags: record.tags.clone(),
            address,
            pid,
            ips: Default::default(),
            launched_at: record.launched_at,
        }
    }

    /// Whether the process that is launching (or starting) a pending record still runs.
    fn launcher_alive(&self, record: &Record) -> bool {
        let Some(launcher) = record.launcher_pid else {
            return false;
        };
        let since = record.spawned_at.unwrap_or(record.launched_at);
        if now_unix().saturating_sub(since) > PENDING_LIMIT.as_secs() {
            return false;
        }
        launcher == std::process::id() || process::exists(launcher)
    }

    fn list_page(&self, filter: &TagFilter, after: Option<&str>) -> Result<Page> {
        let ids = self.all_ids()?;
        let start = match after {
            Some(after) => ids.partition_point(|id| id.as_str() <= after),
            None => 0,
        };
        let mut instances = Vec::new();
        let mut more = false;
        for id in &ids[start..] {
            let Some(record) = self.read_record(id)? else {
                continue; // terminated meanwhile
            };
            if !filter.iter().all(|(k, v)| record.tags.get(k) == Some(v)) {
                continue;
            }
            if instances.len() == self.page_size {
                more = true;
                break;
            }
            instances.push(self.observe(&record));
        }
        let next_token = if more {
            instances.last().map(|i: &Instance| i.id.clone())
        } else {
            None
        };
        Ok(Page {
            instances,
            next_token,
        })
    }

    // ---- launch and start ----------------------------------------------

    fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>> {
        if !self.catalog.iter().any(|t| t.name == request.node_type) {
            let names: Vec<&str> = self.catalog.iter().map(|t| t.name.as_str()).collect();
            return Err(ProviderError::invalid(
                Some("node_type".to_string()),
                format!(
                    "the local provider has no node type {:?} (it has {})",
                    request.node_type,
                    names.join(", ")
                ),
            ));
        }
        let image = request
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        if image != DEFAULT_IMAGE {
            return Err(ProviderError::invalid(
                Some("image".to_string()),
                format!("the local provider only runs the image {DEFAULT_IMAGE:?}, not {image:?}"),
            ));
        }
        if request.count == 0 {
            return Ok(Vec::new());
        }
        let token_file = match request.client_token.as_str() {
            "" => None,
            token => Some(self.tokens_dir().join(token_file_name(token)?)),
        };
        let token_lock = self.lock_of(&format!("token:{}", request.client_token));
        let _token_guard = token_file.as_ref().map(|_| lock_guard(&token_lock));

        let known = match &token_file {
            Some(token_file) => self.read_token(token_file)?,
            None => None,
        };
        if let Some(known) = known {
            if known.count != request.count
                || known.node_type != request.node_type
                || known.image != image
            {
                return Err(ProviderError::invalid(
                    None,
                    format!(
                        "the client token {:?} was used for another launch ({} x {}, {})",
                        request.client_token, known.count, known.node_type, known.image
                    ),
                ));
            }
            // A replay: finish what a killed launcher left half done.
            let mut respawn = Vec::new();
            for id in &known.ids {
                if self.settle_orphan(id)? {
                    respawn.push(id.clone());
                }
            }
            self.spawn_and_wait(&respawn)?;
            let mut instances = Vec::new();
            for id in &known.ids {
                if let Some(record) = self.read_record(id)? {
                    instances.push(self.observe(&record));
                }
            }
            return Ok(instances);
        }

        self.ensure_dirs()?;
        // 1. Records first (pending, no process yet), then the token mapping.
        let launched_at = now_unix();
        let mut records = Vec::with_capacity(request.count as usize);
        for _ in 0..request.count {
            let id = self.create_instance_dir()?;
            let record = Record {
                id: id.clone(),
                node_type: request.node_type.clone(),
                image: image.clone(),
                tags: request.tags.clone(),
                state: InstanceState::Pending,
                launched_at,
                client_token: request.client_token.clone(),
                pid: None,
                pgid: None,
                address: None,
                dir: Some(self.instance_dir(&id)),
                launcher_pid: Some(std::process::id()),
                spawned_at: None,
            };
            let written = self
                .write_user_data(&id, &request.user_data)
                .and_then(|()| self.write_record(&record));
            if let Err(e) = written {
                let _ = fs::remove_dir_all(self.instance_dir(&id));
                return Err(e);
            }
            records.push(record);
        }
        if let Some(token_file) = &token_file {
            let token = TokenRecord {
                client_token: request.client_token.clone(),
                count: request.count,
                node_type: request.node_type.clone(),
                image: image.clone(),
                ids: records.iter().map(|r| r.id.clone()).collect(),
            };
            let bytes = serde_json::to_vec_pretty(&token)
                .map_err(|e| ProviderError::Internal(format!("cannot encode a token: {e}")))?;
            self.write_atomically(token_file, &bytes)?;
        }

        // 2. Spawn every agent, then wait for all of them at once.
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        self.spawn_and_wait(&ids)?;

        let mut instances = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(record) = self.read_record(id)? {
                instances.push(self.observe(&record));
            }
        }
        Ok(instances)
    }

    /// A record still pending after its launcher died: adopt its agent when
    /// that listens, otherwise stop whatever it started (found by the pid the
    /// child wrote) and say it must be spawned again (`true`).
    fn settle_orphan(&self, id: &str) -> Result<bool> {
        let lock = self.lock_of(&format!("id:{id}"));
        let _guard = lock_guard(&lock);
        let Some(record) = self.read_record(id)? else {
            return Ok(false);
        };
        if record.state != InstanceState::Pending || self.launcher_alive(&record) {
            return Ok(false);
        }
        let dir = self.instance_dir(id);
        let pid = known_pid(&record, &dir);
        let alive = pid.is_some_and(|pid| process::liveness(pid, &dir) == Liveness::Alive);
        let listening = read_agent_file(&dir).filter(|file| {
            Some(file.pid) == pid && file.instance_id.as_deref().is_none_or(|i| i == id)
        });
        if let (true, Some(file)) = (alive, listening) {
            let mut adopted = record;
            adopted.state = InstanceState::Running;
            adopted.pid = Some(file.pid);
            adopted.pgid = adopted.pgid.or(Some(file.pid));
            adopted.address = Some(file.address);
            adopted.launcher_pid = None;
            self.write_record(&adopted)?;
            return Ok(false);
        }
        self.kill_agent(id, &record);
        Ok(true)
    }

    /// Makes a fresh `instances/local-XXXXXXXX` directory and returns its id.
    fn create_instance_dir(&self) -> Result<String> {
        for _ in 0..100 {
            let id = format!("{ID_PREFIX}{:08x}", fastrand::u32(..));
            let dir = self.instance_dir(&id);
            match fs::DirBuilder::new()
                .mode(private_files::DIR_MODE)
                .create(&dir)
            {
                Ok(()) => {
                    // Exactly 0700, whatever the umask: it holds the user data.
                    fs::set_permissions(&dir, fs::Permissions::from_mode(private_files::DIR_MODE))
                        .map_err(|e| internal_io("cannot create", &dir, e))?;
                    return Ok(id);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(internal_io("cannot create", &dir, e)),
            }
        }
        Err(ProviderError::Internal(format!(
            "cannot find a free instance id in {}",
            self.instances_dir().display()
        )))
    }

    fn read_token(&self, path: &Path) -> Result<Option<TokenRecord>> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(internal_io("cannot read", path, e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ProviderError::Internal(format!(
                "the token file {} is not valid: {e}",
                path.display()
            ))
        })
    }

    /// Starts stopped (or dead) instances again, with the same id and directory.
    fn start(&self, ids: &[String]) -> Result<()> {
        let mut to_start = Vec::new();
        for id in ids {
            let Some(record) = self.read_record(id)? else {
                continue;
            };
            let live = self.observe(&record).state;
            if !matches!(live, InstanceState::Running | InstanceState::Pending) {
                to_start.push(id.clone());
            }
        }
        self.spawn_and_wait(&to_start)
    }

    /// Spawns the agents of `ids` (records must exist) and waits until each
    /// listens, exits, or the start timeout passes. Records end up running.
    fn spawn_and_wait(&self, ids: &[String]) -> Result<()> {
        let mut errors = Vec::new();
        let mut waiting = Vec::with_capacity(ids.len());
        for id in ids {
            match self.spawn_agent(id) {
                Ok(Some(spawned)) => waiting.push(spawned),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        let deadline = Instant::now() + self.start_timeout;
        while !waiting.is_empty() {
            let mut still = Vec::with_capacity(waiting.len());
            for spawned in waiting {
                match self.check_started(&spawned) {
                    Ok(true) => {}
                    Ok(false) if Instant::now() < deadline => still.push(spawned),
                    Ok(false) => {
                        process::kill_group(spawned.pgid, libc::SIGKILL);
                        wait_for_exit(&spawned.exited, Duration::from_secs(2));
                        errors.push(ProviderError::Internal(format!(
                            "the agent of {} did not start listening within {:?}; see {}",
                            spawned.id,
                            self.start_timeout,
                            spawned.dir.join(LOG_FILE).display()
                        )));
                    }
                    Err(e) => errors.push(e),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                std::thread::sleep(POLL);
            }
        }
        combine(errors)
    }

    /// Whether a spawned agent is up (its record is then running); an error
    /// when it exited before it listened.
    fn check_started(&self, spawned: &Spawned) -> Result<bool> {
        let listening = read_agent_file(&spawned.dir)
            .filter(|file| file.instance_id.as_deref().is_none_or(|i| i == spawned.id));
        if let Some(file) = listening {
            self.update_record(&spawned.id, |record| {
                // Only if nobody stopped or restarted it meanwhile.
                if record.pgid != Some(spawned.pgid) {
                    return false;
                }
                record.state = InstanceState::Running;
                record.pid = Some(file.pid);
                record.address = Some(file.address.clone());
                record.launcher_pid = None;
                true
            })?;
            return Ok(true);
        }
        let exited = *locked(&spawned.exited);
        if let Some(status) = exited {
            return Err(ProviderError::Internal(format!(
                "the agent of {} exited ({}) before it listened; see {}",
                spawned.id,
                describe_exit(status),
                spawned.dir.join(LOG_FILE).display()
            )));
        }
        Ok(false)
    }

    /// Keeps the launch's user data beside the instance (private to it): the
    /// agent reads it as its `--config`, as a cloud VM reads its user data.
    fn write_user_data(&self, id: &str, user_data: &str) -> Result<()> {
        if user_data.is_empty() {
            return Ok(());
        }
        let path = self.instance_dir(id).join(USER_DATA_FILE);
        let mut file = private_files::open(
            &path,
            OpenOptions::new().create(true).write(true).truncate(true),
        )
        .map_err(|e| internal_io("cannot create", &path, e))?;
        std::io::Write::write_all(&mut file, user_data.as_bytes())
            .map_err(|e| internal_io("cannot write", &path, e))
    }

    /// Spawns the agent of one instance, detached: its own process group,
    /// stdin from /dev/null, stdout and stderr to agent.log. A thread reaps it.
    fn spawn_agent(&self, id: &str) -> Result<Option<Spawned>> {
        let lock = self.lock_of(&format!("id:{id}"));
        let _guard = lock_guard(&lock);
        let Some(mut record) = self.read_record(id)? else {
            return Ok(None);
        };
        let dir = self.instance_dir(id);
        let agent_file = dir.join(AGENT_FILE);
        match fs::remove_file(&agent_file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal_io("cannot remove the stale", &agent_file, e)),
        }
        let log_path = dir.join(LOG_FILE);
        let log = private_files::open(&log_path, OpenOptions::new().create(true).append(true))
            .map_err(|e| internal_io("cannot open", &log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| internal_io("cannot open", &log_path, e))?;
        // Emptied now; the child fills it with its own pid before it execs.
        let pid_path = dir.join(PID_FILE);
        let pid_file = private_files::open(
            &pid_path,
            OpenOptions::new().create(true).write(true).truncate(true),
        )
        .map_err(|e| internal_io("cannot open", &pid_path, e))?;
        let pid_fd = pid_file.as_raw_fd();

        // The record says who is starting it before the process exists.
        record.state = InstanceState::Pending;
        record.pid = None;
        record.pgid = None;
        record.address = None;
        record.dir = Some(dir.clone());
        record.launcher_pid = Some(std::process::id());
        record.spawned_at = Some(now_unix());
        self.write_record(&record)?;

        let mut command = Command::new(&self.agent_program);
        command
            .arg("agent")
            .arg("--dir")
            .arg(&dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--instance-id")
            .arg(id);
        let user_data = dir.join(USER_DATA_FILE);
        if user_data.is_file() {
            command.arg("--config").arg(&user_data);
        }
        command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        // SAFETY: the hook runs in the forked child and only calls
        // `write_own_pid` (getpid and write on a stack buffer: async-signal-safe).
        // The descriptor stays open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || process::write_own_pid(pid_fd));
        }
        let child = command.spawn();
        drop(pid_file);
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                // Nobody will start it now: let list report it as terminated.
                record.launcher_pid = None;
                let _ = self.write_record(&record);
                return Err(ProviderError::Internal(format!(
                    "cannot start the agent program {} for {id}: {e}",
                    self.agent_program.display()
                )));
            }
        };
        let pgid = child.id();
        record.pid = Some(pgid);
        record.pgid = Some(pgid);
        let written = self.write_record(&record);

        let exited = Arc::new(Mutex::new(None));
        let exited_by_thread = exited.clone();
        let reaper = std::thread::Builder::new()
            .name(format!("reap-{id}"))
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Ok(status) = child.wait() {
                    *locked(&exited_by_thread) = Some(status);
                }
            });
        if let Err(e) = reaper {
            process::kill_group(pgid, libc::SIGKILL);
            return Err(ProviderError::Internal(format!(
                "cannot watch the agent of {id}: {e}"
            )));
        }
        if let Err(e) = written {
            process::kill_group(pgid, libc::SIGKILL);
            return Err(e);
        }
        Ok(Some(Spawned {
            id: id.to_string(),
            dir,
            pgid,
            exited,
        }))
    }

    // ---- stop, terminate, retag ----------------------------------------

    /// SIGTERM the agent's process group, wait up to the grace, then SIGKILL.
    fn kill_agent(&self, id: &str, record: &Record) {
        let dir = record.dir.clone().unwrap_or_else(|| self.instance_dir(id));
        let pid = known_pid(record, &dir);
        let pgid = record.pgid.or(pid);
        let Some(pgid) = pgid else {
            return;
        };
        let leader = pid.map(|pid| process::liveness(pid, &dir));
        match leader {
            // The pid belongs to another program now: its group is not ours.
            Some(Liveness::Foreign) => return,
            // The agent is gone; its group may still hold its children.
            Some(Liveness::Dead) | None => {
                process::kill_group(pgid, libc::SIGKILL);
                return;
            }
            Some(Liveness::Alive) => {}
        }
        process::kill_group(pgid, libc::SIGTERM);
        let deadline = Instant::now() + self.stop_grace;
        while Instant::now() < deadline {
            if pid.is_none_or(|pid| process::liveness(pid, &dir) != Liveness::Alive) {
                // Also whatever the agent started in its group.
                process::kill_group(pgid, libc::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        process::kill_group(pgid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while pid.is_some_and(|pid| process::liveness(pid, &dir) == Liveness::Alive)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn terminate_one(&self, id: &str) -> Result<()> {
        let key = format!("id:{id}");
        let lock = self.lock_of(&key);
        let guard = lock_guard(&lock);
        let dir = self.instance_dir(id);
        match self.read_record(id) {
            Ok(Some(record)) => self.kill_agent(id, &record),
            Ok(None) => {}
            Err(_) => {
                // A broken record: the agent's own files may still say which process it is.
                let pid = read_agent_file(&dir)
                    .map(|file| file.pid)
                    .or_else(|| process::read_pid_file(&dir.join(PID_FILE)));
                if let Some(pid) = pid {
                    let record = Record {
                        id: id.to_string(),
                        node_type: String::new(),
                        image: String::new(),
                        tags: Tags::new(),
                        state: InstanceState::Running,
                        launched_at: 0,
                        client_token: String::new(),
                        pid: Some(pid),
                        pgid: None,
                        address: None,
                        dir: Some(dir.clone()),
                        launcher_pid: None,
                        spawned_at: None,
                    };
                    self.kill_agent(id, &record);
                }
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal_io("cannot remove", &dir, e)),
        }
        drop(guard);
        self.forget_lock(&key);
        Ok(())
    }

    fn stop_one(&self, id: &str) -> Result<()> {
        let lock = self.lock_of(&format!("id:{id}"));
        let _guard = lock_guard(&lock);
        let Some(record) = self.read_record(id)? else {
            return Err(ProviderError::NotFound(format!("no local instance {id}")));
        };
        let mut stopped = record.clone();
        stopped.state = InstanceState::Stopped;
        stopped.pid = None;
        stopped.pgid = None;
        stopped.address = None;
        stopped.launcher_pid = None;
        let dir = self.instance_dir(id);
        if record.pid == Some(std::process::id()) {
            // A node stopping itself (autotermination): the kill ends this very
            // process, so the record must say stopped first.
            self.write_record(&stopped)?;
            let _ = fs::remove_file(dir.join(AGENT_FILE));
            self.kill_agent(id, &record);
            return Ok(());
        }
        self.kill_agent(id, &record);
        let _ = fs::remove_file(dir.join(AGENT_FILE));
        let _ = fs::remove_file(dir.join(PID_FILE));
        self.write_record(&stopped)
    }

    fn retag_one(&self, id: &str, change: &Retag) -> Result<()> {
        let updated = self.update_record(id, |record| {
            for (k, v) in &change.set {
                record.tags.insert(k.clone(), v.clone());
            }
            for k in &change.remove {
                record.tags.remove(k);
            }
            true
        })?;
        match updated {
            Some(_) => Ok(()),
            None => Err(ProviderError::NotFound(format!("no local instance {id}"))),
        }
    }
}

// ---- helpers -------------------------------------------------------------

/// Ids this provider makes: `local-` and lowercase hex/digits/dashes. Anything
/// else is refused before it can become a path.
fn valid_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX).is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
    })
}

fn check_ids(ids: &[String]) -> Result<()> {
    let bad: Vec<String> = ids
        .iter()
        .filter(|id| !valid_id(id))
        .map(|id| format!("{id:?}"))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ProviderError::invalid(
            None,
            format!("not a local instance id: {}", bad.join(", ")),
        ))
    }
}

fn unique(ids: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    ids.iter()
        .filter(|id| seen.insert(id.as_str()))
        .cloned()
        .collect()
}

/// A file name for a client token: safe characters stay, every other byte is
/// `%XX`-escaped, so different tokens never share a file.
fn token_file_name(token: &str) -> Result<String> {
    let mut name = String::with_capacity(token.len());
    for (i, b) in token.bytes().enumerate() {
        let safe = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if safe {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    if name.len() > 200 {
        return Err(ProviderError::invalid(
            Some("client_token".to_string()),
            format!(
                "the client token is too long for the local provider ({} bytes)",
                token.len()
            ),
        ));
    }
    Ok(name)
}

/// A record's agent pid: the record's own, or else the one its child wrote
/// before exec (the launcher was killed before it could record it).
fn known_pid(record: &Record, dir: &Path) -> Option<u32> {
    record
        .pid
        .or_else(|| process::read_pid_file(&dir.join(PID_FILE)))
}

fn read_agent_file(dir: &Path) -> Option<AgentFile> {
    let mut text = String::new();
    File::open(dir.join(AGENT_FILE))
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits (bounded) until the reaper thread saw the child exit.
fn wait_for_exit(exited: &Mutex<Option<ExitStatus>>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while locked(exited).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn internal_io(what: &str, path: &Path, e: io::Error) -> ProviderError {
    ProviderError::Internal(format!("{what} {}: {e}", path.display()))
}

/// One error as is, several as one Internal error listing them all.
fn combine(mut errors: Vec<ProviderError>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => {
            if errors
                .iter()
                .all(|e| matches!(e, ProviderError::NotFound(_)))
            {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                return Err(ProviderError::NotFound(list.join("; ")));
            }
            let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            Err(ProviderError::Internal(list.join("; ")))
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Locks a mutex, also when another thread panicked while holding it (the data is `()` or a map).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_guard(mutex: &Arc<Mutex<()>>) -> MutexGuard<'_, ()> {
    locked(mutex)
}

#[cfg(test)]
mod tests;
