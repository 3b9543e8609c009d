//! Long-lived Python workers: one interpreter per busy core per run, never
//! one per task. The executor speaks to a worker over its stdin/stdout in
//! frames: op (1 byte), payload length (u32, little endian), payload.
//!
//! To the worker: `L` load (JSON: mode, file, functions, codec), then `M`
//! batches of input lines and `E` (map), or `R` batches of key-sorted lines
//! and `F` (reduce). From the worker: `O` output lines, then `D` done (JSON:
//! records, the task's captured print output) or `X` failed (JSON: the
//! traceback). After `D` or `X` the worker takes the next task.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::runtime::{KillGroup, STDERR_TAIL, Tail};

/// The worker program, written into the executor's directory at start.
pub(crate) const WORKER_PY: &str = include_str!("worker.py");

/// The Python interpreter: `$MOTORPOOL_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("MOTORPOOL_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// The idle workers of one run.
pub(crate) struct Pool {
    script: PathBuf,
    bundle: PathBuf,
    env: Vec<(String, String)>,
    idle: Mutex<Vec<Worker>>,
}

pub(crate) struct Worker {
    _child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Tail>>,
    _group: KillGroup,
}

impl Worker {
    /// The end of what the interpreter itself wrote to stderr (a crash, say).
    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.lock().map(|t| t.text()).unwrap_or_default()
    }
}

impl Pool {
    pub(crate) fn new(script: PathBuf, bundle: PathBuf, env: Vec<(String, String)>) -> Pool {
        Pool {
            script,
            bundle,
            env,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle worker, or a new one.
    pub(crate) fn take(&self) -> anyhow::Result<Worker> {
        if let Some(w) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(w);
        }
        let python = python();
        let mut child = tokio::process::Command::new(&python)
            .arg("-B")
            .arg(&self.script)
            .current_dir(&self.bundle)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the Python worker (`{python}`)"))?;
        let group = KillGroup::new(child.id());
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            anyhow::bail!("the Python worker has no pipes");
        };
        let tail = Arc::new(Mutex::new(Tail::new(STDERR_TAIL)));
        let sink = tail.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if let Ok(mut t) = sink.lock() {
                            t.push(&buf[..n]);
                        }
                    }
                }
            }
        });
        Ok(Worker {
            _child: child,
            stdin,
            stdout: BufReader::with_capacity(1 << 20, stdout),
            stderr: tail,
            _group: group,
        })
    }

    /// Returns a worker that finished its task cleanly.
    pub(crate) fn give_back(&self, w: Worker) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(w);
        }
    }
}

pub(crate) async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    op: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a frame over 4 GiB"))?;
    let mut head = [0u8; 5];
    head[0] = op;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// The next frame; `None` when the worker closed its end.
pub(crate) async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[1..]);
    let len = u32::from_le_bytes(len) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}
