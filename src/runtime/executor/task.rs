//! Running one map or reduce task on an executor.
//!
//! Map: the partition's byte ranges stream from the driver into the mapper
//! (`sh -c COMMAND` on stdin, or a Python worker in batches of lines); its
//! output goes to the shuffle writer (with a reduce), to the driver (a
//! map-only task with `output`), to object storage (an `output` URL), or
//! nowhere. Input on object storage is read here by ranged GETs, never
//! through the driver.
//!
//! Reduce: the partition's segments of every map output are fetched (local
//! ones read in place, remote ones streamed from their executors to local
//! files), merged in key order, and fed to the reducer; its output goes to
//! the driver or to object storage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::python::{self, read_frame, write_frame};
use super::{Cancel, ExecState};
use crate::runtime::proto::{self, Codec, StageKind, TaskState};
use crate::runtime::shuffle::{self, ShuffleWriter};
use crate::runtime::{CHUNK, KillGroup, STDERR_TAIL, Tail};

/// Lines handed to a reducer per batch.
const MERGE_BATCH: usize = 256 << 10;

#[derive(Default)]
struct Outcome {
    exit_code: i32,
    stderr: String,
    partition_bytes: Vec<u64>,
    input_bytes: u64,
    output_bytes: u64,
    records_in: u64,
    records_out: u64,
    shuffle_bytes: u64,
}

enum TaskError {
    Failed {
        error: String,
        stderr: String,
        exit_code: i32,
    },
    FetchFailed {
        maps: Vec<u64>,
        error: String,
    },
    Cancelled,
}

fn failed(error: impl Into<String>) -> TaskError {
    TaskError::Failed {
        error: error.into(),
        stderr: String::new(),
        exit_code: -1,
    }
}

impl From<anyhow::Error> for TaskError {
    fn from(e: anyhow::Error) -> TaskError {
        failed(format!("{e:#}"))
    }
}

/// Runs one task attempt to its status.
pub(crate) async fn run(
    state: &Arc<ExecState>,
    spec: proto::TaskSpec,
    def: Arc<proto::StageDef>,
    cancel: Cancel,
) -> proto::TaskStatus {
    let attempt_id = spec.attempt_id;
    let result = if def.kind == StageKind::Reduce as i32 {
        run_reduce(state, &spec, &def, &cancel).await
    } else {
        run_map(state, &spec, &def, &cancel).await
    };
    match result {
        Ok(o) => proto::TaskStatus {
            attempt_id,
            state: TaskState::Succeeded as i32,
            exit_code: o.exit_code,
            stderr_tail: o.stderr,
            partition_bytes: o.partition_bytes,
            input_bytes: o.input_bytes,
            output_bytes: o.output_bytes,
            records_in: o.records_in,
            records_out: o.records_out,
            shuffle_bytes: o.shuffle_bytes,
            ..Default::default()
        },
        Err(TaskError::Failed {
            error,
            stderr,
            exit_code,
        }) => proto::TaskStatus {
            attempt_id,
            state: TaskState::Failed as i32,
            error,
            stderr_tail: stderr,
            exit_code,
            ..Default::default()
        },
        Err(TaskError::FetchFailed { maps, error }) => proto::TaskStatus {
            attempt_id,
            state: TaskState::FetchFailed as i32,
            error,
            exit_code: -1,
            fetch_failed_map_attempts: maps,
            ..Default::default()
        },
        Err(TaskError::Cancelled) => proto::TaskStatus {
            attempt_id,
            state: TaskState::Cancelled as i32,
            exit_code: -1,
            ..Default::default()
        },
    }
}

fn task_env(def: &proto::StageDef, spec: &proto::TaskSpec, stage: &str) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = def.env.clone().into_iter().collect();
    env.insert("MOTORPOOL_RUN_ID".into(), spec.run_id.clone());
    env.insert("MOTORPOOL_TASK".into(), def.task.clone());
    env.insert("MOTORPOOL_STAGE".into(), stage.into());
    env.insert("MOTORPOOL_PARTITION".into(), spec.partition.to_string());
    env.insert("MOTORPOOL_ATTEMPT".into(), spec.attempt.to_string());
    env.into_iter().collect()
}

fn count_lines(data: &[u8]) -> u64 {
    // SIMD, chosen at run time: several times a plain loop on a baseline
    // x86-64 build, which counts a byte at a time.
    bytecount::count(data, b'\n') as u64
}

// ---------------------------------------------------------------- input

/// What feeds a task: its input from the driver, or merged map output.
enum Feed {
    Driver(Box<Streaming<proto::DataChunk>>),
    Lines(mpsc::Receiver<Vec<u8>>),
    /// A small partition that came with its task.
    Inline(Option<Vec<u8>>),
    /// Input ranges read where they lie: handed whole to a command's stdin
    /// writer, or read in chunks on a blocking thread for a Python worker.
    Local {
        ranges: Option<Vec<LocalRange>>,
        rx: Option<mpsc::Receiver<std::io::Result<Vec<u8>>>>,
    },
    /// Input ranges on object storage, read here by ranged GETs (several in
    /// flight) in order.
    Objects(mpsc::Receiver<Result<Vec<u8>, String>>),
}

/// Streams the object storage ranges of a map task, in order, with a newline
/// after an object's last line when it has none (as local input gets).
fn read_objects(ranges: Vec<proto::InputRange>) -> Result<Feed, TaskError> {
    use futures_util::StreamExt;
    let mut urls = Vec::with_capacity(ranges.len());
    for r in &ranges {
        let url = motorpool_storage::DataUrl::parse(&r.path).map_err(|e| failed(e.to_string()))?;
        if r.end < r.start || r.end > r.size {
            return Err(failed(format!(
                "the driver sent a bad range {}..{} of {} ({} bytes)",
                r.start, r.end, r.path, r.size
            )));
        }
        urls.push(url);
    }
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, String>>(motorpool_storage::READ_AHEAD);
    tokio::spawn(async move {
        let stores = motorpool_storage::stores();
        for (r, url) in ranges.into_iter().zip(urls) {
            let mut stream = std::pin::pin!(stores.read_stream(url, r.start, r.end));
            let mut last = b'\n';
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot read the input: {e}"))).await;
                        return;
                    }
                };
                if let Some(&b) = chunk.last() {
                    last = b;
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the task stopped reading
                }
            }
            if r.end > r.start
                && r.end == r.size
                && last != b'\n'
                && tx.send(Ok(b"\n".to_vec())).await.is_err()
            {
                return;
            }
        }
    });
    Ok(Feed::Objects(rx))
}

/// A byte range of an input file this executor opened itself.
struct LocalRange {
    file: std::fs::File,
    /// The file as the driver saw it (path and identity).
    id: proto::LocalFile,
    start: u64,
    end: u64,
    /// The range ends its file without a newline: one follows (as ReadInput sends it).
    newline_after: bool,
}

/// The task's input ranges, opened here, when every one of them is a file
/// this executor can see as the driver does; `None` otherwise.
fn open_local(spec: &proto::TaskSpec) -> Option<Vec<LocalRange>> {
    use std::os::unix::fs::FileExt;
    if spec.inputs.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(spec.inputs.len());
    for r in &spec.inputs {
        let want = r.local.as_ref()?;
        if r.end < r.start || r.end > want.size {
            return None;
        }
        let file = crate::runtime::local::open_same(want)?;
        let mut newline_after = false;
        if r.end > r.start && r.end == want.size {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, r.end - 1).ok()?;
            newline_after = last[0] != b'\n';
        }
        out.push(LocalRange {
            file,
            id: want.clone(),
            start: r.start,
            end: r.end,
            newline_after,
        });
    }
    Some(out)
}

/// Hands `ranges` over in chunks of up to [`CHUNK`]: read into `emit`
/// (which returns false to stop early), or, given a pipe, spliced into it
/// (splice(2): the page cache's pages go in by reference, never copied
/// through this process), `emit` then carrying only what cannot be spliced.
/// Returns the bytes and lines handed over.
fn read_ranges(
    ranges: Vec<LocalRange>,
    mut splice_into: Option<&std::fs::File>,
    mut emit: impl FnMut(&[u8]) -> std::io::Result<bool>,
) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let (mut bytes, mut records) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK];
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let want = ((r.end - at) as usize).min(CHUNK);
            if let Some(pipe) = splice_into {
                match splice_chunk(&r.file, at, want, pipe) {
                    Ok(Some(0)) => return Err(shorter_than_seen()),
                    Ok(Some(n)) => {
                        records += count_lines_at(&r.file, at, n, &mut buf)?;
                        at += n as u64;
                        bytes += n as u64;
                        continue;
                    }
                    // This file system cannot splice: copy from here on.
                    Ok(None) => splice_into = None,
                    // It stopped reading; its exit code tells.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        return Ok((bytes, records));
                    }
                    Err(e) => return Err(e),
                }
            }
            let n = r.file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(shorter_than_seen());
            }
            at += n as u64;
            bytes += n as u64;
            records += count_lines(&buf[..n]);
            if !emit(&buf[..n])? {
                return Ok((bytes, records));
            }
        }
        if r.newline_after {
            bytes += 1;
            records += 1;
            if !emit(b"\n")? {
                return Ok((bytes, records));
            }
        }
    }
    Ok((bytes, records))
}

/// Splices up to `want` bytes of `file` at `at` into `pipe`: the bytes
/// moved (0 at the file's end), or `None` when this file system cannot.
#[cfg(target_os = "linux")]
fn splice_chunk(
    file: &std::fs::File,
    at: u64,
    want: usize,
    pipe: &std::fs::File,
) -> std::io::Result<Option<usize>> {
    use std::os::fd::AsRawFd;
    loop {
        let mut offset = at as libc::loff_t;
        // SAFETY: both descriptors are open and owned by `file` and `pipe`
        // for the call; `offset` is a valid loff_t the kernel updates.
        let n = unsafe {
            libc::splice(
                file.as_raw_fd(),
                &mut offset,
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINVAL | libc::ENOSYS) => return Ok(None),
            _ => return Err(e),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn splice_chunk(
    _file: &std::fs::File,
    _at: u64,
    _want: usize,
    _pipe: &std::fs::File,
) -> std::io::Result<Option<usize>> {
    Ok(None)
}

/// The lines in `n` bytes of `file` at `at` (bytes spliced past this
/// process), read back in pieces small enough to stay in cache.
fn count_lines_at(
    file: &std::fs::File,
    mut at: u64,
    n: usize,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 64 << 10;
    let len = PIECE.min(buf.len());
    let piece = &mut buf[..len];
    let end = at + n as u64;
    let mut lines = 0;
    while at < end {
        let k = ((end - at) as usize).min(piece.len());
        let got = file.read_at(&mut piece[..k], at)?;
        if got == 0 {
            return Err(shorter_than_seen());
        }
        lines += count_lines(&piece[..got]);
        at += got as u64;
    }
    Ok(lines)
}

fn shorter_than_seen() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "an input file is shorter than the driver saw it",
    )
}

/// A pipe for a child's stdin: (read end for the child, write end), with a
/// buffer of a whole chunk where the system allows it.
fn stdin_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, which we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // Fewer, larger writes and reads; a smaller pipe is only slower.
    // SAFETY: fcntl on a descriptor we own; no memory is touched.
    unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
    }
    Ok((read, write))
}

impl Feed {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, TaskError> {
        match self {
            Feed::Driver(s) => match s.message().await {
                Ok(Some(c)) => Ok(Some(c.data)),
                Ok(None) => Ok(None),
                Err(e) => Err(failed(format!(
                    "cannot read the input from the driver: {}",
                    e.message()
                ))),
            },
            Feed::Lines(rx) => Ok(rx.recv().await),
            Feed::Inline(data) => Ok(data.take()),
            Feed::Objects(rx) => match rx.recv().await {
                Some(Ok(data)) => Ok(Some(data)),
                Some(Err(e)) => Err(failed(e)),
                None => Ok(None),
            },
            Feed::Local { ranges, rx } => {
                if rx.is_none() {
                    let ranges = ranges.take().unwrap_or_default();
                    let (tx, new_rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
                    tokio::task::spawn_blocking(move || {
                        let read = read_ranges(ranges, None, |chunk| {
                            Ok(tx.blocking_send(Ok(chunk.to_vec())).is_ok())
                        });
                        if let Err(e) = read {
                            let _ = tx.blocking_send(Err(e));
                        }
                    });
                    *rx = Some(new_rx);
                }
                match rx.as_mut() {
                    Some(rx) => match rx.recv().await {
                        Some(Ok(data)) => Ok(Some(data)),
                        Some(Err(e)) => Err(failed(format!("cannot read the input: {e}"))),
                        None => Ok(None),
                    },
                    None => Ok(None),
                }
            }
        }
    }
}

async fn open_input(state: &ExecState, spec: &proto::TaskSpec) -> Result<Feed, TaskError> {
    if let Some(data) = &spec.inline_input {
        return Ok(Feed::Inline(Some(data.clone())));
    }
    if spec
        .inputs
        .iter()
        .any(|r| motorpool_storage::is_data_url(&r.path))
    {
        return read_objects(spec.inputs.clone());
    }
    if let Some(ranges) = state.read_in_place.then(|| open_local(spec)).flatten() {
        return Ok(Feed::Local {
            ranges: Some(ranges),
            rx: None,
        });
    }
    let mut client = state.driver()?;
    let stream = client
        .read_input(proto::ReadInputRequest {
            run_id: spec.run_id.clone(),
            ranges: spec.inputs.clone(),
        })
        .await
        .map_err(|e| {
            failed(format!(
                "cannot read the input from the driver: {}",
                e.message()
            ))
        })?
        .into_inner();
    Ok(Feed::Driver(Box::new(stream)))
}

// ---------------------------------------------------------------- output

/// Where a task's output goes.
enum Sink {
    Shuffle {
        writer: ShuffleWriter,
        carry: Vec<u8>,
    },
    Driver(DriverSink),
    /// `part-NNNNN` under an object storage prefix, written from here; the
    /// object appears when the attempt succeeds (an upload dropped unfinished
    /// is aborted).
    Object {
        writer: motorpool_storage::ObjectWriter,
        records: u64,
    },
    Discard {
        bytes: u64,
        records: u64,
    },
}

struct DriverSink {
    state: Arc<ExecState>,
    head: proto::OutputChunk,
    tx: Option<mpsc::Sender<proto::OutputChunk>>,
    call: Option<tokio::task::JoinHandle<Result<u64, tonic::Status>>>,
    buf: Vec<u8>,
    bytes: u64,
    records: u64,
}

impl DriverSink {
    async fn send(&mut self, data: Vec<u8>) -> Result<(), TaskError> {
        if self.tx.is_none() {
            let (tx, rx) = mpsc::channel(4);
            let mut client = self.state.driver()?;
            self.call = Some(tokio::spawn(async move {
                client
                    .put_output(ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner().bytes)
            }));
            self.tx = Some(tx);
        }
        let mut chunk = std::mem::take(&mut self.head);
        chunk.data = data;
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if !sent {
            // The call ended early: its error says why.
            return Err(self
                .end()
                .await
                .err()
                .unwrap_or_else(|| failed("the driver stopped taking the task's output")));
        }
        Ok(())
    }

    async fn end(&mut self) -> Result<u64, TaskError> {
        self.tx = None;
        match self.call.take() {
            None => Ok(0),
            Some(call) => match call.await {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(e)) => Err(failed(format!(
                    "cannot send the output to the driver: {}",
                    e.message()
                ))),
                Err(e) => Err(failed(format!("the output upload failed: {e}"))),
            },
        }
    }
}

impl Sink {
    fn new(
        state: &Arc<ExecState>,
        def: &proto::StageDef,
        spec: &proto::TaskSpec,
    ) -> Result<Sink, TaskError> {
        if def.kind == StageKind::Map as i32 && def.reduce_partitions > 0 {
            let dir = state.shuffle_dir(&spec.run_id);
            std::fs::create_dir_all(&dir)
                .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
            return Ok(Sink::Shuffle {
                writer: ShuffleWriter::new(&dir, spec.attempt_id, def.reduce_partitions as usize),
                carry: Vec::new(),
            });
        }
        if def.write_output && !def.output_url.is_empty() {
            let url = motorpool_storage::DataUrl::parse_output(&def.output_url)
                .map_err(|e| failed(e.to_string()))?
                .child(&format!("part-{:05}", spec.partition));
            let writer = motorpool_storage::stores()
                .writer(&url)
                .map_err(|e| failed(e.to_string()))?;
            return Ok(Sink::Object { writer, records: 0 });
        }
        if def.write_output {
            return Ok(Sink::Driver(DriverSink {
                state: state.clone(),
                head: proto::OutputChunk {
                    run_id: spec.run_id.clone(),
                    stage_id: spec.stage_id,
                    partition: spec.partition,
                    attempt_id: spec.attempt_id,
                    data: Vec::new(),
                },
                tx: None,
                call: None,
                buf: Vec::new(),
                bytes: 0,
                records: 0,
            }));
        }
        Ok(Sink::Discard {
            bytes: 0,
            records: 0,
        })
    }

    async fn push(&mut self, data: &[u8]) -> Result<(), TaskError> {
        match self {
            Sink::Shuffle { writer, carry } => {
                let rest = if carry.is_empty() {
                    writer.push_lines(data)?
                } else {
                    match data.iter().position(|&b| b == b'\n') {
                        None => {
                            carry.extend_from_slice(data);
                            return Ok(());
                        }
                        Some(i) => {
                            carry.extend_from_slice(&data[..=i]);
                            writer.push_line(carry)?;
                            carry.clear();
                            writer.push_lines(&data[i + 1..])?
                        }
                    }
                };
                carry.extend_from_slice(rest);
            }
            Sink::Driver(d) => {
                d.bytes += data.len() as u64;
                d.records += count_lines(data);
                d.buf.extend_from_slice(data);
                while d.buf.len() >= CHUNK {
                    let rest = d.buf.split_off(CHUNK);
                    let chunk = std::mem::replace(&mut d.buf, rest);
                    d.send(chunk).await?;
                }
            }
            Sink::Object { writer, records } => {
                *records += count_lines(data);
                writer
                    .write(data)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            }
            Sink::Discard { bytes, records } => {
                *bytes += data.len() as u64;
                *records += count_lines(data);
            }
        }
        Ok(())
    }

    /// Ends the output: (bytes per reduce partition, output bytes, output records).
    async fn finish(self) -> Result<(Vec<u64>, u64, u64), TaskError> {
        match self {
            Sink::Shuffle { mut writer, carry } => {
                if !carry.is_empty() {
                    writer.push_line(&carry)?;
                }
                let records = writer.records;
                let sizes = tokio::task::spawn_blocking(move || writer.finish())
                    .await
                    .map_err(|e| failed(format!("the shuffle writer failed: {e}")))??;
                let total = sizes.iter().sum();
                Ok((sizes, total, records))
            }
            Sink::Driver(mut d) => {
                if !d.buf.is_empty() {
                    let rest = std::mem::take(&mut d.buf);
                    d.send(rest).await?;
                }
                d.end().await?;
                Ok((Vec::new(), d.bytes, d.records))
            }
            Sink::Object { writer, records } => {
                let bytes = writer.finish().await.map_err(|e| failed(e.to_string()))?;
                Ok((Vec::new(), bytes, records))
            }
            Sink::Discard { bytes, records } => Ok((Vec::new(), bytes, records)),
        }
    }
}

// ---------------------------------------------------------------- processes

/// What a process or worker consumed and how it ended.
struct Ran {
    exit_code: i32,
    stderr: String,
    input_bytes: u64,
    records_in: u64,
}

/// Runs `sh -c cmd` with `feed` on stdin and stdout into `sink`.
async fn run_process(
    cmd: &str,
    cwd: &Path,
    env: &[(String, String)],
    feed: &mut Feed,
    sink: &mut Sink,
    cancel: &Cancel,
) -> Result<Ran, TaskError> {
    // Local input goes from the file into the child's stdin on a blocking
    // thread: no async hops, no copies through the driver.
    let local = match feed {
        Feed::Local { ranges, .. } => ranges.take(),
        _ => None,
    };
    let (stdin_cfg, mut pipe_w) = match &local {
        Some(_) => {
            let (r, w) = stdin_pipe().map_err(|e| failed(format!("cannot make a pipe: {e}")))?;
            (Stdio::from(r), Some(w))
        }
        None => (Stdio::piped(), None),
    };
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin_cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot start `sh -c {cmd}`: {e}")))?;
    let mut group = KillGroup::new(child.id());
    let mut stdin = child.stdin.take();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(failed("the task process has no pipes"));
    };
    let errs = tokio::spawn(async move {
        let mut tail = Tail::new(STDERR_TAIL);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => return tail,
                Ok(n) => tail.push(&buf[..n]),
            }
        }
    });
    let feeder = async {
        if let (Some(ranges), Some(w)) = (local, pipe_w.take()) {
            return tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                // Spliced where it can be, written (through a shared
                // reference: `&File` writes too) where it cannot.
                read_ranges(ranges, Some(&w), |chunk| match (&w).write_all(chunk) {
                    Ok(()) => Ok(true),
                    // It stopped reading; its exit code tells.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
                    Err(e) => Err(e),
                })
            })
            .await
            .map_err(|e| failed(format!("the input writer failed: {e}")))?
            .map_err(|e| failed(format!("cannot feed the task its input: {e}")));
        }
        let Some(mut stdin) = stdin.take() else {
            return Err(failed("the task process has no stdin"));
        };
        let (mut bytes, mut records) = (0u64, 0u64);
        while let Some(chunk) = feed.next().await? {
            bytes += chunk.len() as u64;
            records += count_lines(&chunk);
            if let Err(e) = stdin.write_all(&chunk).await {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    break; // it stopped reading; its exit code tells
                }
                return Err(failed(format!("cannot write to the task's stdin: {e}")));
            }
        }
        drop(stdin);
        Ok::<_, TaskError>((bytes, records))
    };
    let reader = async {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|e| failed(format!("cannot read the task's stdout: {e}")))?;
            if n == 0 {
                return Ok::<_, TaskError>(());
            }
            sink.push(&buf[..n]).await?;
        }
    };
    let io = tokio::select! {
        r = async { tokio::try_join!(feeder, reader) } => r,
        _ = cancel.cancelled() => {
            group.kill();
            return Err(TaskError::Cancelled);
        }
    };
    let (input_bytes, records_in) = match io {
        Ok(((b, r), ())) => (b, r),
        Err(e) => {
            group.kill();
            let _ = child.wait().await;
            return Err(e);
        }
    };
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| failed(format!("cannot wait for the task: {e}")))?,
        _ = cancel.cancelled() => {
            group.kill();
            return Err(TaskError::Cancelled);
        }
    };
    group.kill();
    let stderr = errs.await.map(|t| t.text()).unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(Ran {
            exit_code: 0,
            stderr,
            input_bytes,
            records_in,
        }),
        (Some(code), _) => Err(TaskError::Failed {
            error: format!("exit code {code}"),
            stderr,
            exit_code: code,
        }),
        (None, sig) => Err(TaskError::Failed {
            error: format!("killed by signal {}", sig.unwrap_or(0)),
            stderr,
            exit_code: -1,
        }),
    }
}

/// Runs one task in a Python worker of the run: `load` first, then `feed` in
/// `batch_op` frames (cut at line ends), then `end_op`; output frames into `sink`.
#[allow(clippy::too_many_arguments)]
async fn run_python(
    state: &Arc<ExecState>,
    def: &proto::StageDef,
    bundle: &Path,
    load: serde_json::Value,
    batch_op: u8,
    end_op: u8,
    feed: &mut Feed,
    sink: &mut Sink,
    cancel: &Cancel,
) -> Result<Ran, TaskError> {
    let pool = state.pool(def, bundle);
    let mut worker = pool.take()?;
    let load = serde_json::to_vec(&load).map_err(|e| failed(e.to_string()))?;
    let lost = |w: &python::Worker, what: &str| TaskError::Failed {
        error: format!("the Python worker {what}"),
        stderr: w.stderr_text(),
        exit_code: -1,
    };
    if write_frame(&mut worker.stdin, b'L', &load).await.is_err() {
        let e = lost(&worker, "did not start");
        return Err(e);
    }
    // Input on this machine: the worker reads its byte ranges itself, as
    // one Python process reads its file, instead of taking every byte
    // through this process and a pipe.
    let local = match feed {
        Feed::Local { ranges, rx: None } if batch_op == b'M' => ranges.take(),
        _ => None,
    };
    let stdin = &mut worker.stdin;
    let stdout = &mut worker.stdout;
    let feeder = async {
        let mut bytes = 0u64;
        let mut carry: Vec<u8> = Vec::new();
        let io = |e: std::io::Error| failed(format!("cannot write to the Python worker: {e}"));
        if let Some(ranges) = local {
            for r in ranges {
                bytes += r.end - r.start + u64::from(r.newline_after);
                let frame = serde_json::json!({
                    "path": r.id.path,
                    "dev": r.id.dev,
                    "ino": r.id.ino,
                    "size": r.id.size,
                    "mtime_ns": r.id.mtime_ns,
                    "start": r.start,
                    "end": r.end,
                });
                write_frame(stdin, b'P', frame.to_string().as_bytes())
                    .await
                    .map_err(io)?;
            }
            write_frame(stdin, end_op, &[]).await.map_err(io)?;
            return Ok::<_, TaskError>(bytes);
        }
        while let Some(chunk) = feed.next().await? {
            bytes += chunk.len() as u64;
            match chunk.iter().rposition(|&b| b == b'\n') {
                None => carry.extend_from_slice(&chunk),
                Some(i) if carry.is_empty() => {
                    write_frame(stdin, batch_op, &chunk[..=i])
                        .await
                        .map_err(io)?;
                    carry.extend_from_slice(&chunk[i + 1..]);
                }
                Some(i) => {
                    carry.extend_from_slice(&chunk[..=i]);
                    write_frame(stdin, batch_op, &carry).await.map_err(io)?;
                    carry.clear();
                    carry.extend_from_slice(&chunk[i + 1..]);
                }
            }
        }
        if !carry.is_empty() {
            carry.push(b'\n');
            write_frame(stdin, batch_op, &carry).await.map_err(io)?;
        }
        write_frame(stdin, end_op, &[]).await.map_err(io)?;
        Ok::<_, TaskError>(bytes)
    };
    let reader = async {
        loop {
            match read_frame(stdout).await {
                Ok(Some((b'O', payload))) => sink.push(&payload).await?,
                Ok(Some((b'D', payload))) => return Ok::<_, TaskError>(Ok(payload)),
                Ok(Some((b'X', payload))) => return Ok(Err(payload)),
                Ok(Some((op, _))) => {
                    return Err(failed(format!(
                        "the Python worker sent an unknown frame {:?}",
                        op as char
                    )));
                }
                Ok(None) => return Err(failed("")),
                Err(e) => return Err(failed(format!("cannot read from the Python worker: {e}"))),
            }
        }
    };
    let io = tokio::select! {
        r = async { tokio::try_join!(feeder, reader) } => r,
        _ = cancel.cancelled() => return Err(TaskError::Cancelled),
    };
    let (input_bytes, answer) = match io {
        Ok(x) => x,
        Err(TaskError::Failed { error, .. }) => {
            // The worker died or the protocol broke: it is not reused.
            return Err(if error.is_empty() {
                lost(&worker, "exited during the task")
            } else {
                TaskError::Failed {
                    error,
                    stderr: worker.stderr_text(),
                    exit_code: -1,
                }
            });
        }
        Err(e) => return Err(e),
    };
    // The worker answered D or X: it is in step again.
    pool.give_back(worker);
    #[derive(serde::Deserialize, Default)]
    struct Done {
        #[serde(default)]
        records_in: u64,
        #[serde(default)]
        stderr: String,
        #[serde(default)]
        error: String,
    }
    match answer {
        Ok(payload) => {
            let done: Done = serde_json::from_slice(&payload).unwrap_or_default();
            Ok(Ran {
                exit_code: 0,
                stderr: done.stderr,
                input_bytes,
                records_in: done.records_in,
            })
        }
        Err(payload) => {
            let done: Done = serde_json::from_slice(&payload).unwrap_or_default();
            let first_line = done
                .error
                .trim_end()
                .lines()
                .last()
                .unwrap_or("an exception")
                .to_string();
            Err(TaskError::Failed {
                error: format!("the Python function raised {first_line}"),
                stderr: format!("{}{}", done.stderr, done.error),
                exit_code: -1,
            })
        }
    }
}

fn python_load(mode: &str, def: &proto::StageDef, f: &proto::PythonFn) -> serde_json::Value {
    let codec = if def.codec == Codec::Json as i32 {
        "json"
    } else {
        "text"
    };
    let mut load = serde_json::json!({
        "mode": mode,
        "file": f.file,
        "codec": codec,
    });
    load[mode] = serde_json::Value::String(f.function.clone());
    if f.per == proto::PythonPer::Partition as i32 {
        load["per"] = serde_json::Value::String("partition".into());
    }
    if let Some(c) = &def.combiner {
        load["combiner"] = serde_json::Value::String(c.function.clone());
        load["combiner_file"] = serde_json::Value::String(c.file.clone());
    }
    load
}

// ---------------------------------------------------------------- map

async fn run_map(
    state: &Arc<ExecState>,
    spec: &proto::TaskSpec,
    def: &proto::StageDef,
    cancel: &Cancel,
) -> Result<Outcome, TaskError> {
    let bundle = state.bundle(&def.bundle_id).await?;
    let mut sink = Sink::new(state, def, spec)?;
    let mut feed = open_input(state, spec).await?;
    let ran = match &def.python {
        Some(f) => {
            let load = python_load("map", def, f);
            run_python(
                state, def, &bundle, load, b'M', b'E', &mut feed, &mut sink, cancel,
            )
            .await?
        }
        None => {
            let env = task_env(def, spec, "map");
            run_process(&def.command, &bundle, &env, &mut feed, &mut sink, cancel).await?
        }
    };
    let (partition_bytes, output_bytes, records_out) = sink.finish().await?;
    Ok(Outcome {
        exit_code: ran.exit_code,
        stderr: ran.stderr,
        partition_bytes,
        input_bytes: ran.input_bytes,
        output_bytes,
        records_in: ran.records_in,
        records_out,
        shuffle_bytes: 0,
    })
}

// ---------------------------------------------------------------- reduce

enum Source {
    Local(u64),
    Fetched(PathBuf),
}

async fn fetch_group(
    state: &ExecState,
    spec: &proto::TaskSpec,
    loc: &proto::ExecutorLocation,
    refs: &[&proto::MapOutputRef],
    dir: &Path,
) -> Result<(), (Vec<u64>, String)> {
    let ids: Vec<u64> = refs.iter().map(|r| r.map_attempt_id).collect();
    let fail = |e: String| {
        state.forget_peer(&loc.address);
        (
            ids.clone(),
            format!(
                "cannot fetch map output from executor {} at {}: {e}",
                loc.executor_id, loc.address
            ),
        )
    };
    let mut client = state
        .peer(&loc.address)
        .await
        .map_err(|e| fail(format!("{e:#}")))?;
    let mut stream = client
        .fetch_shuffle(proto::FetchShuffleRequest {
            run_id: spec.run_id.clone(),
            reduce_partition: spec.partition,
            map_attempt_ids: ids.clone(),
        })
        .await
        .map_err(|e| fail(e.message().to_string()))?
        .into_inner();
    let expected: HashMap<u64, u64> = refs.iter().map(|r| (r.map_attempt_id, r.bytes)).collect();
    let mut files: HashMap<u64, (tokio::fs::File, u64)> = HashMap::new();
    let mut done: HashSet<u64> = HashSet::new();
    loop {
        let chunk = match stream.message().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(fail(e.message().to_string())),
        };
        let id = chunk.map_attempt_id;
        if !expected.contains_key(&id) || done.contains(&id) {
            return Err(fail(format!("unexpected data for map output {id}")));
        }
        let (f, n) = match files.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let f = tokio::fs::File::create(dir.join(format!("{id}.seg")))
                    .await
                    .map_err(|e| fail(format!("cannot store the fetched segment: {e}")))?;
                e.insert((f, 0))
            }
        };
        f.write_all(&chunk.data)
            .await
            .map_err(|e| fail(format!("cannot store the fetched segment: {e}")))?;
        *n += chunk.data.len() as u64;
        if chunk.last {
            f.flush()
                .await
                .map_err(|e| fail(format!("cannot store the fetched segment: {e}")))?;
            done.insert(id);
        }
    }
    for (id, bytes) in &expected {
        let got = files.get(id).map_or(0, |(_, n)| *n);
        if !done.contains(id) || got != *bytes {
            return Err(fail(format!(
                "map output {id} came short ({got} of {bytes} bytes)"
            )));
        }
    }
    Ok(())
}

const MERGE_STOPPED: &str = "the reducer stopped reading";

async fn run_reduce(
    state: &Arc<ExecState>,
    spec: &proto::TaskSpec,
    def: &proto::StageDef,
    cancel: &Cancel,
) -> Result<Outcome, TaskError> {
    let shuffle_dir = state.shuffle_dir(&spec.run_id);
    let fetch_dir = shuffle_dir.join(format!("fetch-{}", spec.attempt_id));
    let result = reduce_in(state, spec, def, cancel, &shuffle_dir, &fetch_dir).await;
    if fetch_dir.exists() {
        let _ = tokio::fs::remove_dir_all(&fetch_dir).await;
    }
    result
}

async fn reduce_in(
    state: &Arc<ExecState>,
    spec: &proto::TaskSpec,
    def: &proto::StageDef,
    cancel: &Cancel,
    shuffle_dir: &Path,
    fetch_dir: &Path,
) -> Result<Outcome, TaskError> {
    let bundle = state.bundle(&def.bundle_id).await?;
    let me = state.id();
    let mut sources = Vec::with_capacity(spec.map_outputs.len());
    let mut groups: BTreeMap<u32, Vec<&proto::MapOutputRef>> = BTreeMap::new();
    let mut shuffle_bytes = 0u64;
    for r in &spec.map_outputs {
        let Some(loc) = spec.locations.get(r.location as usize) else {
            return Err(failed("a map output has no location"));
        };
        shuffle_bytes += r.bytes;
        if loc.executor_id == me {
            sources.push(Source::Local(r.map_attempt_id));
        } else {
            sources.push(Source::Fetched(
                fetch_dir.join(format!("{}.seg", r.map_attempt_id)),
            ));
            groups.entry(r.location).or_default().push(r);
        }
    }
    if !groups.is_empty() {
        tokio::fs::create_dir_all(fetch_dir)
            .await
            .map_err(|e| failed(format!("cannot create {}: {e}", fetch_dir.display())))?;
        let fetches = groups.iter().map(|(loc, refs)| {
            let loc = &spec.locations[*loc as usize];
            fetch_group(state, spec, loc, refs, fetch_dir)
        });
        let results = tokio::select! {
            r = futures_util::future::join_all(fetches) => r,
            _ = cancel.cancelled() => return Err(TaskError::Cancelled),
        };
        let mut maps = Vec::new();
        let mut errors = Vec::new();
        for r in results {
            if let Err((ids, e)) = r {
                maps.extend(ids);
                errors.push(e);
            }
        }
        if !maps.is_empty() {
            return Err(TaskError::FetchFailed {
                maps,
                error: errors.join("; "),
            });
        }
    }
    let p = spec.partition as usize;
    let mut readers: Vec<Box<dyn BufRead + Send>> = Vec::with_capacity(sources.len());
    for s in sources {
        match s {
            Source::Local(a) => match shuffle::open_segment(shuffle_dir, a, p) {
                Ok(r) => readers.push(Box::new(r)),
                Err(e) => {
                    return Err(TaskError::FetchFailed {
                        maps: vec![a],
                        error: format!("cannot read local map output {a}: {e:#}"),
                    });
                }
            },
            Source::Fetched(path) => match std::fs::File::open(&path) {
                Ok(f) => readers.push(Box::new(std::io::BufReader::with_capacity(256 << 10, f))),
                Err(e) => return Err(failed(format!("cannot read {}: {e}", path.display()))),
            },
        }
    }
    let empty = readers.is_empty();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let merge = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(MERGE_BATCH + 4096);
        let merged = shuffle::merge_sorted(readers, |line| {
            buf.extend_from_slice(line);
            if buf.len() >= MERGE_BATCH {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(MERGE_BATCH + 4096));
                tx.blocking_send(full)
                    .map_err(|_| anyhow::anyhow!(MERGE_STOPPED))?;
            }
            Ok(())
        });
        match merged {
            Err(e) if e.to_string() == MERGE_STOPPED => return Ok(()),
            other => other?,
        }
        if !buf.is_empty() {
            let _ = tx.blocking_send(buf);
        }
        Ok(())
    });
    let mut feed = Feed::Lines(rx);
    let mut sink = Sink::new(state, def, spec)?;
    let ran = match &def.python {
        Some(_) if empty => Ran {
            exit_code: 0,
            stderr: String::new(),
            input_bytes: 0,
            records_in: 0,
        },
        Some(f) => {
            let load = python_load("reduce", def, f);
            run_python(
                state, def, &bundle, load, b'R', b'F', &mut feed, &mut sink, cancel,
            )
            .await?
        }
        None => {
            let env = task_env(def, spec, "reduce");
            run_process(&def.command, &bundle, &env, &mut feed, &mut sink, cancel).await?
        }
    };
    drop(feed);
    match merge.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(failed(format!("cannot merge map output: {e:#}"))),
        Err(e) => return Err(failed(format!("the merge failed: {e}"))),
    }
    let (_, output_bytes, records_out) = sink.finish().await?;
    Ok(Outcome {
        exit_code: ran.exit_code,
        stderr: ran.stderr,
        partition_bytes: Vec::new(),
        input_bytes: ran.input_bytes,
        output_bytes,
        records_in: ran.records_in,
        records_out,
        shuffle_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::count_lines;

    #[test]
    fn lines_are_counted_at_any_length_and_density() {
        for len in [
            0usize,
            1,
            31,
            32,
            33,
            255 * 32 - 1,
            255 * 32,
            255 * 32 + 1,
            100_000,
        ] {
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    if i % 7 == 3 || i % 1000 == 0 {
                        b'\n'
                    } else {
                        b'x'
                    }
                })
                .collect();
            let want = data.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(count_lines(&data), want, "{len} bytes");
        }
        // Every byte a newline.
        assert_eq!(count_lines(&vec![b'\n'; 1 << 20]), 1 << 20);
    }
}
