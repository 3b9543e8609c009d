//! The bundled runtime: a driver per cluster, an executor per worker node,
//! and the client that hands them a job (issue 4).
//!
//! - [`driver`] takes a job (a [`proto::JobDef`], see [`jobdef`], + a code bundle), plans it
//!   (tasks DAG -> stages -> partitions), pushes tasks in batches to executors
//!   over long-lived bidirectional streams, re-runs what a lost executor held,
//!   retries failed tasks, enforces timeouts, streams progress, and keeps every
//!   run's outputs and task logs under `<dir>/runs/<run-id>/`.
//! - [`executor`] registers, heartbeats, runs map and reduce tasks (shell
//!   commands fed on stdin, or Python functions in long-lived workers), keeps
//!   map output hash-partitioned and sorted on its disk, and serves it to
//!   reducers over streaming gRPC.
//! - [`client`] bundles the job's directory once (content-addressed),
//!   uploads it, submits the job as protobuf, uploads the map inputs the
//!   driver cannot read where they lie, follows progress, and writes the
//!   tasks' `output` directories back on the submitting machine.
//! - Map input is read where it lies by whoever sees the very file (same
//!   device, inode, size, mtime: [`local`]): the driver reads the
//!   submitter's files in place, executors read their ranges from the
//!   driver's files; otherwise bytes move over gRPC (UploadInput, ReadInput).
//!
//! Driver and executors speak only through `proto/runtime.proto`; every
//! call carries the cluster credential ([`crate::auth`]).
//!
//! Semantics worth knowing (Hadoop Streaming's, mostly):
//! - a map partition is a byte range of the input on line boundaries; a map
//!   task over an empty partition runs nothing and outputs nothing (as
//!   Hadoop makes no split for empty input), so tiny tasks cost no process;
//! - map output lines are `key<TAB>value` (no TAB: the whole line is the
//!   key), hash-partitioned by key (FNV-1a) and sorted by key bytes; a
//!   reducer reads its partition's lines merged in key order;
//! - a Python map function takes one line (without its newline) and returns
//!   an iterable of `(key, value)`; with `per: partition` it takes an
//!   iterator over the partition's lines once and returns an iterable of
//!   `(key, value)` or a mapping; a Python reduce function folds two values
//!   and also runs map-side as a combiner. Keys and values must be JSON
//!   values; output lines print strings as they are and others as JSON;
//! - a task's `retries` (or the job's) bound the attempts of each of its
//!   partitions (and of a command task) to retries+1; attempts lost with an
//!   executor or to unreadable map output do not count;
//! - `timeout_minutes` of a task bounds its whole run (all partitions and
//!   attempts), the job's the whole run.

pub mod bundle;
pub mod client;
pub mod driver;
pub mod executor;
pub mod jobdef;
mod local;
pub mod plan;
mod shuffle;
mod summary;

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};

use crate::auth::{AttachCredential, Credential};

pub use summary::{Progress, RunSummary, StageProgress, TaskOutcome, TaskSummary};

/// The generated protobuf messages and tonic services of `motorpool.runtime.v1`.
pub use crate::proto::runtime as proto;

/// The most payload any one message carries; data moves in streams of these.
pub const CHUNK: usize = 1 << 20;

/// The decoding limit on every runtime channel (task batches with many map
/// output references can pass tonic's 4 MiB default).
pub const MAX_MESSAGE: usize = 64 << 20;

/// HTTP/2 flow-control windows: large, so one stream moves data at memory speed.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// HTTP/2 frames of up to 1 MiB: a data chunk crosses in one frame, not 64.
const FRAME_SIZE: u32 = 1 << 20;

/// How long connecting to a driver or an executor may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The version every runtime process reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A driver client that carries the credential on every call.
pub type DriverClient =
    proto::driver_client::DriverClient<InterceptedService<Channel, AttachCredential>>;

/// An executor client that carries the credential on every call.
pub type ExecutorClient =
    proto::executor_client::ExecutorClient<InterceptedService<Channel, AttachCredential>>;

/// An endpoint for `address` with the runtime's transport settings: TLS
/// (verified against the credential's project CA) where [`crate::tls::required`].
fn endpoint(address: &str, credential: &Credential) -> anyhow::Result<Endpoint> {
    Ok(crate::tls::endpoint(address, credential.trust())
        .with_context(|| format!("cannot connect to {address}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// Connects to the driver at `address` (`127.0.0.1:PORT`).
pub async fn connect_driver(
    address: &str,
    credential: &Credential,
) -> anyhow::Result<DriverClient> {
    let channel = endpoint(address, credential)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the driver at {address}"))?;
    Ok(driver_client(channel, credential))
}

fn driver_client(channel: Channel, credential: &Credential) -> DriverClient {
    proto::driver_client::DriverClient::with_interceptor(
        channel,
        AttachCredential(credential.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE)
}

/// Connects to the executor at `address` (`127.0.0.1:PORT`).
pub async fn connect_executor(
    address: &str,
    credential: &Credential,
) -> anyhow::Result<ExecutorClient> {
    let channel = endpoint(address, credential)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the executor at {address}"))?;
    Ok(proto::executor_client::ExecutorClient::with_interceptor(
        channel,
        AttachCredential(credential.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE))
}

/// A server builder with the runtime's transport settings, serving TLS on
/// `listen` where [`crate::tls::required`] (refusing plaintext beyond loopback).
fn server_builder(
    listen: SocketAddr,
    tls: Option<&crate::tls::ServerTls>,
    who: &str,
) -> anyhow::Result<Server> {
    let builder = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    match crate::tls::server_config(listen, tls)
        .with_context(|| format!("the {who} cannot serve"))?
    {
        Some(config) => Ok(builder
            .tls_config(config)
            .with_context(|| format!("the {who}'s TLS settings are not valid"))?),
        None => Ok(builder),
    }
}

/// A fresh id: `<prefix>-<unix ms in base 36>-<random>`, sortable by time.
fn new_id(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{prefix}-{ms:013}-{:06x}", fastrand::u32(..0x100_0000))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads up to `n` bytes (fewer only at the end of `r`) into a fresh buffer.
pub(crate) fn read_chunk(r: &mut impl std::io::Read, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A relative path that stays inside the directory it is joined to:
/// no root, no `..`, not empty. Returns it normalized (no `.` parts).
pub fn safe_relative(path: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => bail!("path `{path}` must not contain `..`"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("path `{path}` must be relative to the job directory")
            }
        }
    }
    if out.as_os_str().is_empty() {
        bail!("path `{path}` names no file");
    }
    Ok(out)
}

/// An id that is safe as one path component (run and bundle ids).
fn safe_id(id: &str) -> Result<&str, tonic::Status> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(tonic::Status::invalid_argument(format!(
            "not a valid id: {:?}",
            id.chars().take(130).collect::<String>()
        )));
    }
    Ok(id)
}

/// The last `cap` bytes written to it (a process's stderr, say).
#[derive(Debug, Default, Clone)]
pub(crate) struct Tail {
    buf: std::collections::VecDeque<u8>,
    cap: usize,
    dropped: bool,
}

/// How much of a task's stderr travels with its status.
pub(crate) const STDERR_TAIL: usize = 64 << 10;

impl Tail {
    pub(crate) fn new(cap: usize) -> Tail {
        Tail {
            buf: std::collections::VecDeque::new(),
            cap,
            dropped: false,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let bytes = if bytes.len() > self.cap {
            self.dropped = true;
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        self.buf.extend(bytes);
        if self.buf.len() > self.cap {
            self.dropped = true;
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
        }
    }

    pub(crate) fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        let s = String::from_utf8_lossy(&v).into_owned();
        if self.dropped { format!("...{s}") } else { s }
    }
}

/// Kills a child's whole process group when dropped (the child was spawned
/// with `process_group(0)`, so `sh -c` and everything it started go together).
pub(crate) struct KillGroup(Option<i32>);

impl KillGroup {
    pub(crate) fn new(pid: Option<u32>) -> KillGroup {
        KillGroup(pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0))
    }

    pub(crate) fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: sends a signal to a process group we created; no memory is touched.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max_chars`-ish characters of `text`, cut at a line start when possible.
pub(crate) fn tail_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    match cut.find('\n') {
        Some(i) if i + 1 < cut.len() => format!("...\n{}", &cut[i + 1..]),
        _ => format!("...{cut}"),
    }
}

/// The environment variable the `motorpool driver` and `motorpool executor`
/// processes read the cluster credential from.
pub const CREDENTIAL_ENV: &str = "MOTORPOOL_CREDENTIAL";

/// The file `motorpool driver` writes in its directory once it listens.
pub const DRIVER_FILE: &str = "driver.json";

/// The content of `<dir>/driver.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriverFile {
    /// `127.0.0.1:PORT`.
    pub address: String,
    pub pid: u32,
}

fn credential_from_env() -> anyhow::Result<Credential> {
    match std::env::var(CREDENTIAL_ENV) {
        Ok(c) if !c.is_empty() => Ok(Credential::new(c)),
        _ => bail!("set {CREDENTIAL_ENV} to the cluster credential"),
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `motorpool driver`: a driver until SIGTERM/SIGINT, its address in `<dir>/driver.json`.
pub async fn run_driver_process(listen: SocketAddr, dir: PathBuf) -> anyhow::Result<()> {
    let credential = credential_from_env()?;
    let stop = stop_signal()?;
    let handle = driver::serve(driver::DriverConfig::new(listen, credential, &dir)).await?;
    let file = DriverFile {
        address: handle.address().to_string(),
        pid: std::process::id(),
    };
    let path = dir.join(DRIVER_FILE);
    let tmp = dir.join(format!(".{DRIVER_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "motorpool driver (pid {}) listening on {}",
        file.pid, file.address
    );
    stop.await;
    eprintln!("motorpool driver: stopping");
    let _ = std::fs::remove_file(&path);
    handle.shutdown().await
}

/// `motorpool executor`: an executor of the driver at `driver` until SIGTERM/SIGINT.
pub async fn run_executor_process(
    driver_address: String,
    dir: PathBuf,
    cores: Option<usize>,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let credential = credential_from_env()?;
    let stop = stop_signal()?;
    let mut config = executor::ExecutorConfig::new(driver_address, credential, dir);
    config.listen = listen;
    if let Some(c) = cores {
        config.cores = c;
    }
    let handle = executor::serve(config).await?;
    eprintln!(
        "motorpool executor (pid {}) serving shuffle data on {}",
        std::process::id(),
        handle.address()
    );
    stop.await;
    eprintln!("motorpool executor: stopping");
    handle.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(
            safe_relative("a/./b.txt").expect("ok"),
            PathBuf::from("a/b.txt")
        );
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative(".").is_err());
    }

    #[test]
    fn tails_keep_the_end() {
        let mut t = Tail::new(4);
        t.push(b"abcdef");
        t.push(b"gh");
        assert_eq!(t.text(), "...efgh");
        assert_eq!(tail_text("one\ntwo\nthree", 8), "...\nthree");
    }
}
