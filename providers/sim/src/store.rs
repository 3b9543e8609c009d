//! The simulated account's record set on disk: `$home/sim/state.json`.
//!
//! One JSON document holds everything (instances by id, the id counter, client
//! tokens). Writers serialize on an in-process async mutex plus a cross-process
//! `flock` on `$home/sim/state.lock`, and replace the file atomically (temp file,
//! fsync, rename, fsync of the directory), so a reader or a SIGKILL never sees a
//! half-written file. Readers take no lock: they open the file and read that one
//! inode to the end.
//!
//! Parsing 10,000 records takes milliseconds, so the parsed state is cached and
//! keyed by the file's identity (device, inode, size, mtime, ctime) plus its
//! first bytes, which hold a generation counter bumped by every write: a list of
//! ten pages parses the file at most once.
//!
//! Concurrent mutations from many tasks are group-committed: whoever holds the
//! writer mutex drains every queued mutation, applies them in order to one copy
//! of the state and writes the file once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use motorpool_provider::{Instance, ProviderError, Result, Tags};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The on-disk format version (`"v"`).
pub(crate) const FORMAT_VERSION: u32 = 1;

/// How many leading bytes of the file take part in the cache key: enough for
/// `{"v":1,"gen":<u64>,` whatever the generation.
const HEAD_LEN: usize = 48;

/// The whole simulated account.
///
/// Field order matters: `v` and `gen` come first so that the file's first bytes
/// identify the version of the content (see [`HEAD_LEN`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub v: u32,
    /// Bumped by every write.
    #[serde(rename = "gen")]
    pub generation: u64,
    /// The next instance number; ids are `sim-{next:08x}`.
    pub next: u64,
    /// Live and stopped instances by id (terminated ones are removed).
    pub instances: BTreeMap<String, Rec>,
    /// Client token -> the launch it made.
    pub tokens: BTreeMap<String, TokenRec>,
}

impl Default for State {
    fn default() -> Self {
        State {
            v: FORMAT_VERSION,
            generation: 0,
            next: 1,
            instances: BTreeMap::new(),
            tokens: BTreeMap::new(),
        }
    }
}

/// One instance record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rec {
    #[serde(rename = "type")]
    pub node_type: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stopped: bool,
    pub tags: Tags,
    /// Unix milliseconds of the launch.
    #[serde(rename = "at")]
    pub launched_ms: u64,
    /// Unix milliseconds of the last start after a stop (boot time counts from here).
    #[serde(rename = "up", default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
}

impl Rec {
    /// When the instance last began booting.
    pub fn boot_start_ms(&self) -> u64 {
        self.started_ms.unwrap_or(self.launched_ms)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What one client token launched: `count` consecutive ids from `first`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TokenRec {
    pub first: u64,
    pub count: u32,
    #[serde(rename = "type")]
    pub node_type: String,
    pub image: String,
    #[serde(rename = "at")]
    pub launched_ms: u64,
}

impl TokenRec {
    pub fn ids(&self) -> impl Iterator<Item = String> + '_ {
        (self.first..self.first + u64::from(self.count)).map(format_id)
    }
}

/// `sim-000001a3`.
pub(crate) fn format_id(n: u64) -> String {
    format!("sim-{n:08x}")
}

/// What a mutation returns to its caller.
#[derive(Debug)]
pub(crate) enum Outcome {
    Instances(Vec<Instance>),
    Done,
    Found(bool),
}

/// A mutation: gets the state and the batch's clock (Unix ms), returns its
/// outcome and whether it changed anything. On `Err` it must leave the state
/// untouched (validate first, then change).
pub(crate) type Job = Box<dyn FnOnce(&mut State, u64) -> Result<(Outcome, bool)> + Send>;

struct Pending {
    id: u64,
    job: Job,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// Removes a job from the queue when its caller goes away before a leader took it.
struct Dequeue<'a> {
    queue: &'a Mutex<Vec<Pending>>,
    id: u64,
}

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        lock(self.queue).retain(|p| p.id != self.id);
    }
}

/// What identifies one version of the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    head: Vec<u8>,
}

struct Cached {
    /// `None`: the file did not exist (a fresh account).
    version: Option<Version>,
    state: Arc<State>,
}

pub(crate) struct Store {
    dir: PathBuf,
    state_path: PathBuf,
    tmp_path: PathBuf,
    lock_path: PathBuf,
    cache: Mutex<Option<Cached>>,
    queue: Mutex<Vec<Pending>>,
    writer: tokio::sync::Mutex<()>,
    next_job: AtomicU64,
    /// State files written by this store.
    writes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Internal(format!("sim: cannot {what} {}: {e}", path.display()))
}

impl Store {
    /// A store for `dir` (`$home/sim`), creating the directory.
    pub fn open(dir: PathBuf) -> Result<Store> {
        fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, e))?;
        Ok(Store {
            state_path: dir.join("state.json"),
            tmp_path: dir.join("state.json.tmp"),
            lock_path: dir.join("state.lock"),
            dir,
            cache: Mutex::new(None),
            queue: Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(()),
            next_job: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// How many times this store wrote the state file.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// The current state, shared; parses the file only when it changed.
    pub async fn snapshot(self: &Arc<Self>) -> Result<Arc<State>> {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.load_shared())
            .await
            .map_err(|e| ProviderError::Internal(format!("sim: state reader failed: {e}")))?
    }

    /// Apply `job` to the state and save it (group-committed with any other
    /// mutations queued at the same time).
    pub async fn mutate(self: &Arc<Self>, job: Job) -> Result<Outcome> {
        let (reply, mut rx) = oneshot::channel();
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        lock(&self.queue).push(Pending { id, job, reply });
        // Cancelled before a leader took the job: take it back, so that it does
        // not run later behind the caller's back.
        let _dequeue = Dequeue {
            queue: &self.queue,
            id,
        };
        {
            let _writer = self.writer.lock().await;
            match rx.try_recv() {
                // A previous leader already ran our job.
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(lost_writer()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = std::mem::take(&mut *lock(&self.queue));
            if !batch.is_empty() {
                let store = Arc::clone(self);
                // Once spawned, the commit runs to the end even if we are
                // cancelled, and answers every job of the batch.
                tokio::task::spawn_blocking(move || store.commit(batch))
                    .await
                    .map_err(|e| {
                        ProviderError::Internal(format!("sim: state writer failed: {e}"))
                    })?;
            }
        }
        // Our job was in our batch, or in one that a leader before us was
        // cancelled while committing (its commit runs on and answers us).
        rx.await.map_err(|_| lost_writer())?
    }

    #[cfg(test)]
    pub async fn hold_writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    /// Run a batch of mutations and answer each.
    fn commit(&self, batch: Vec<Pending>) {
        let (jobs, replies): (Vec<Job>, Vec<_>) =
            batch.into_iter().map(|p| (p.job, p.reply)).unzip();
        match self.run(jobs) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Under the cross-process lock: load, apply every job in order, write once.
    /// `Err` when the state could not be read or saved (no job took effect).
    fn run(&self, jobs: Vec<Job>) -> Result<Vec<Result<Outcome>>> {
        let lock_file = self.lock_exclusive()?;
        let (version, mut state) = self.load_owned()?;
        let now = now_ms();
        let mut changed = false;
        let results: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                job(&mut state, now).map(|(outcome, c)| {
                    changed |= c;
                    outcome
                })
            })
            .collect();
        let version = if changed {
            state.generation += 1;
            match self.write(&state) {
                Ok(v) => v,
                Err(e) => {
                    *lock(&self.cache) = None;
                    return Err(e);
                }
            }
        } else {
            version
        };
        drop(lock_file);
        *lock(&self.cache) = Some(Cached {
            version,
            state: Arc::new(state),
        });
        Ok(results)
    }

    /// Take the cross-process writer lock; released when the file is dropped.
    fn lock_exclusive(&self) -> Result<File> {
        fs::create_dir_all(&self.dir).map_err(|e| io_error("create directory", &self.dir, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| io_error("open", &self.lock_path, e))?;
        loop {
            // SAFETY: flock on a file descriptor we own for the duration of the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(file);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(io_error("lock", &self.lock_path, e));
            }
        }
    }

    /// Open the state file and identify its version (`None`: no file yet).
    fn open_current(&self) -> Result<Option<(File, Version)>> {
        let file = match File::open(&self.state_path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open", &self.state_path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| io_error("stat", &self.state_path, e))?;
        let mut head = vec![0u8; HEAD_LEN];
        let mut got = 0;
        while got < HEAD_LEN {
            match file.read_at(&mut head[got..], got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read", &self.state_path, e)),
            }
        }
        head.truncate(got);
        let version = Version {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            head,
        };
        Ok(Some((file, version)))
    }

    fn parse(&self, file: Option<File>) -> Result<State> {
        let Some(mut file) = file else {
            return Ok(State::default());
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_error("read", &self.state_path, e))?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::Internal(format!(
                "sim: the state file {} is corrupt ({e}); \
                 delete it to reset the simulated account",
                self.state_path.display()
            ))
        })?;
        if state.v != FORMAT_VERSION {
            return Err(ProviderError::Internal(format!(
                "sim: the state file {} has format version {}, this motorpool reads version {}",
                self.state_path.display(),
                state.v,
                FORMAT_VERSION
            )));
        }
        Ok(state)
    }

    fn load_shared(&self) -> Result<Arc<State>> {
        let current = self.open_current()?;
        let version = current.as_ref().map(|(_, v)| v.clone());
        let hit = lock(&self.cache)
            .as_ref()
            .filter(|c| c.version == version)
            .map(|c| Arc::clone(&c.state));
        if let Some(state) = hit {
            return Ok(state);
        }
        let state = Arc::new(self.parse(current.map(|(f, _)| f))?);
        *lock(&self.cache) = Some(Cached {
            version,
            state: Arc::clone(&state),
        });
        Ok(state)
    }

    /// The current state as an owned copy to change (taken from the cache
    /// without copying when no reader holds it).
    fn load_owned(&self) -> Result<(Option<Version>, State)> {
        let current = self.open_current()?;
        let version = current.as_ref().map(|(_, v)| v.clone());
        let cached = lock(&self.cache).take();
        if let Some(cached) = cached.filter(|c| c.version == version) {
            let state = Arc::try_unwrap(cached.state).unwrap_or_else(|s| (*s).clone());
            return Ok((version, state));
        }
        let state = self.parse(current.map(|(f, _)| f))?;
        Ok((version, state))
    }

    /// Replace the state file atomically; returns the new file's version.
    fn write(&self, state: &State) -> Result<Option<Version>> {
        let bytes = serde_json::to_vec(state)
            .map_err(|e| ProviderError::Internal(format!("sim: cannot encode the state: {e}")))?;
        let mut tmp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.tmp_path)
            .map_err(|e| io_error("create", &self.tmp_path, e))?;
        tmp.write_all(&bytes)
            .and_then(|()| tmp.sync_data())
            .map_err(|e| io_error("write", &self.tmp_path, e))?;
        drop(tmp);
        self.writes.fetch_add(1, Ordering::Relaxed);
        fs::rename(&self.tmp_path, &self.state_path)
            .map_err(|e| io_error("replace", &self.state_path, e))?;
        // Make the rename itself durable; some file systems refuse to fsync a
        // directory, and the rename is already atomic for other processes.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(self.open_current()?.map(|(_, v)| v))
    }
}

fn lost_writer() -> ProviderError {
    ProviderError::Internal("sim: the state writer went away before answering".to_string())
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
