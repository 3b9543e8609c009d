//! Running startup steps on a node, and remembering how they went.
//!
//! A step is a shell script the engine rendered from `templates/` (every
//! value already shell-quoted), run with `sh -eu` in the node's directory.
//! Its output streams back to the caller and is kept in
//! `steps/<step>.log`; its status and timing go to `state.json`, which
//! `GetState` reports and `motorpool status` shows. A step that already
//! succeeded with the same key is skipped, which is what makes a re-run
//! apply converge instead of repeating work.
//!
//! Steps are fenced: at most one step script runs on a node at a time. A
//! step runs to its end even when its caller goes away (a killed apply), so
//! a re-run that asks for a step while an earlier request's copy still runs
//! waits for that copy, and then skips the step if it succeeded with the
//! same key, instead of racing it with a second copy in the same directory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use motorpool_provider::private_files;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc};
use tonic::Status;

use super::proto;

/// Lines of stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

/// One step as `state.json` records it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: String,
    pub status: String,
    pub started_at_unix_ms: u64,
    pub duration_ms: u64,
    pub exit_code: i32,
    pub key: String,
}

/// `<dir>/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStateFile {
    pub steps: Vec<StepRecord>,
    #[serde(default)]
    pub runtime_role: String,
    #[serde(default)]
    pub driver_address: String,
}

impl From<&StepRecord> for proto::StepRecord {
    fn from(r: &StepRecord) -> Self {
        proto::StepRecord {
            step: r.step.clone(),
            status: r.status.clone(),
            started_at_unix_ms: r.started_at_unix_ms,
            duration_ms: r.duration_ms,
            exit_code: r.exit_code,
            key: r.key.clone(),
        }
    }
}

/// Why a step could not run at all (its script's own failure is an exit code).
#[derive(Debug, thiserror::Error)]
enum StepIoError {
    #[error("cannot {what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start sh: {0}")]
    Start(#[source] std::io::Error),
    #[error("cannot wait for the step: {0}")]
    Wait(#[source] std::io::Error),
    #[error("the step's {0} was not captured")]
    NoPipe(&'static str),
}

/// Runs steps one at a time and keeps `state.json`.
pub struct StepRunner {
    dir: PathBuf,
    state: Mutex<NodeStateFile>,
    /// Held for the whole of a step's run: the fence.
    fence: Mutex<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A file-system-safe form of a step name (`init:setup.sh` -> `init_setup.sh`).
pub fn safe_name(step: &str) -> String {
    let s: String = step
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() { "step".to_string() } else { s }
}

impl StepRunner {
    /// Load `state.json` from `dir` (a missing or unreadable one starts empty).
    pub fn new(dir: &Path) -> StepRunner {
        let state = std::fs::read(dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StepRunner {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            fence: Mutex::new(()),
        }
    }

    /// Whether `step` already succeeded with `key` (so running it again is skipped).
    pub async fn done(&self, step: &str, key: &str) -> bool {
        !key.is_empty()
            && self
                .state
                .lock()
                .await
                .steps
                .iter()
                .any(|r| r.step == step && r.key == key && r.status == "ok")
    }

    /// The step `state.json` says is running (for messages).
    async fn running_step(&self) -> String {
        self.state
            .lock()
            .await
            .steps
            .iter()
            .rev()
            .find(|r| r.status == "running")
            .map(|r| r.step.clone())
            .unwrap_or_else(|| "(starting)".to_string())
    }

    pub async fn snapshot(&self) -> NodeStateFile {
        self.state.lock().await.clone()
    }

    /// Record what runtime the node hosts.
    pub async fn set_runtime(&self, role: &str, driver_address: &str) {
        let mut state = self.state.lock().await;
        state.runtime_role = role.to_string();
        state.driver_address = driver_address.to_string();
        let _ = self.save(&state);
    }

    fn save(&self, state: &NodeStateFile) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        crate::home::write_atomic(&self.dir.join("state.json"), &bytes)
    }

    async fn record(&self, record: StepRecord) {
        let mut state = self.state.lock().await;
        state.steps.retain(|r| r.step != record.step);
        state.steps.push(record);
        if let Err(e) = self.save(&state) {
            eprintln!("motorpool agent: cannot save state.json: {e}");
        }
    }

    pub fn log_path(&self, step: &str) -> PathBuf {
        self.dir
            .join("steps")
            .join(format!("{}.log", safe_name(step)))
    }

    /// Run a step, sending its events to `events`. One step at a time per node.
    pub async fn run(
        &self,
        request: proto::RunStepRequest,
        events: mpsc::Sender<Result<proto::StepEvent, Status>>,
    ) {
        let finished = |f: proto::StepFinished| proto::StepEvent {
            event: Some(proto::step_event::Event::Finished(f)),
        };
        let _fenced = match self.fence.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                let running = self.running_step().await;
                let _ = events
                    .send(Ok(proto::StepEvent {
                        event: Some(proto::step_event::Event::Line(proto::OutputLine {
                            stderr: false,
                            text: format!(
                                "waiting for step {running}, still running on this node from an earlier request"
                            ),
                        })),
                    }))
                    .await;
                self.fence.lock().await
            }
        };
        if !request.key.is_empty() {
            let state = self.state.lock().await;
            let done = state
                .steps
                .iter()
                .any(|r| r.step == request.step && r.key == request.key && r.status == "ok");
            if done {
                let _ = events
                    .send(Ok(finished(proto::StepFinished {
                        exit_code: 0,
                        duration_ms: 0,
                        skipped: true,
                        stderr_tail: String::new(),
                        timed_out: false,
                    })))
                    .await;
                return;
            }
        }
        if request.script.is_empty() {
            let duration_ms = request.recorded_duration_ms;
            self.record(StepRecord {
                step: request.step.clone(),
                status: "ok".into(),
                started_at_unix_ms: now_ms().saturating_sub(duration_ms),
                duration_ms,
                exit_code: 0,
                key: request.key.clone(),
            })
            .await;
            let _ = events
                .send(Ok(finished(proto::StepFinished {
                    exit_code: 0,
                    duration_ms,
                    skipped: false,
                    stderr_tail: String::new(),
                    timed_out: false,
                })))
                .await;
            return;
        }
        let started_at = now_ms();
        let started = Instant::now();
        self.record(StepRecord {
            step: request.step.clone(),
            status: "running".into(),
            started_at_unix_ms: started_at,
            key: request.key.clone(),
            ..StepRecord::default()
        })
        .await;
        let (exit_code, stderr_tail, timed_out) = match self.execute(&request, &events).await {
            Ok(r) => r,
            Err(e) => (-1, e.to_string(), false),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        self.record(StepRecord {
            step: request.step.clone(),
            status: if exit_code == 0 { "ok" } else { "failed" }.into(),
            started_at_unix_ms: started_at,
            duration_ms,
            exit_code,
            key: request.key.clone(),
        })
        .await;
        let _ = events
            .send(Ok(finished(proto::StepFinished {
                exit_code,
                duration_ms,
                skipped: false,
                stderr_tail,
                timed_out,
            })))
            .await;
    }

    /// Write the step's files, run its script, stream and keep its output.
    /// Returns the exit code, the tail of stderr, and whether it timed out
    /// (then the script and everything it started are killed).
    async fn execute(
        &self,
        request: &proto::RunStepRequest,
        events: &mpsc::Sender<Result<proto::StepEvent, Status>>,
    ) -> Result<(i32, String, bool), StepIoError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StepIoError::File { what, path, source }
        };
        let step_dir = self.dir.join("steps").join(safe_name(&request.step));
        // Step files and logs hold the spec's scripts and their output: private.
        private_files::create_dir(&step_dir).map_err(io("create", &step_dir))?;
        for (name, content) in &request.files {
            let file = step_dir.join(safe_name(name));
            private_files::write(&file, content).map_err(io("write", &file))?;
        }
        let log_path = self.log_path(&request.step);
        let mut log = tokio::fs::File::from_std(
            private_files::open(
                &log_path,
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true),
            )
            .map_err(io("create", &log_path))?,
        );

        let mut child = tokio::process::Command::new("sh")
            .arg("-eu")
            .arg("-c")
            .arg(&request.script)
            .current_dir(&self.dir)
            .env("MOTORPOOL_NODE_DIR", &self.dir)
            .env("MOTORPOOL_STEP_DIR", &step_dir)
            .envs(&request.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(StepIoError::Start)?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or(StepIoError::NoPipe("stdout"))?;
        let stderr = child.stderr.take().ok_or(StepIoError::NoPipe("stderr"))?;
        let (line_tx, mut line_rx) = mpsc::channel::<(bool, String)>(256);
        let out_tx = line_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if out_tx.send((false, l)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if line_tx.send((true, l)).await.is_err() {
                    break;
                }
            }
        });
        let mut tail: VecDeque<String> = VecDeque::new();
        let pump = async {
            while let Some((is_err, text)) = line_rx.recv().await {
                let _ = log
                    .write_all(format!("{}{text}\n", if is_err { "! " } else { "" }).as_bytes())
                    .await;
                if is_err {
                    tail.push_back(text.clone());
                    if tail.len() > STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                }
                // A caller that went away does not stop the step; its log is kept.
                let _ = events
                    .send(Ok(proto::StepEvent {
                        event: Some(proto::step_event::Event::Line(proto::OutputLine {
                            stderr: is_err,
                            text,
                        })),
                    }))
                    .await;
            }
            child.wait().await
        };
        let status = if request.timeout_seconds > 0 {
            match tokio::time::timeout(
                Duration::from_secs(u64::from(request.timeout_seconds)),
                pump,
            )
            .await
            {
                Ok(s) => s,
                Err(_) => {
                    if let Some(pid) = pid {
                        kill_tree(pid);
                    }
                    let message = format!("timed out after {}s: killed", request.timeout_seconds);
                    let _ = log.write_all(format!("! {message}\n").as_bytes()).await;
                    let _ = log.flush().await;
                    return Ok((-1, message, true));
                }
            }
        } else {
            pump.await
        };
        let _ = log.flush().await;
        let status = status.map_err(StepIoError::Wait)?;
        let tail = Vec::from(tail).join("\n");
        Ok((status.code().unwrap_or(-1), tail, false))
    }
}

/// SIGKILL `root` and every process descended from it (a timed-out step's
/// shell and whatever it started), found through `/proc`.
fn kill_tree(root: u32) {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    for pid in tree {
        if let Ok(pid) = i32::try_from(pid)
            && pid > 0
        {
            // SAFETY: sends a signal to a process; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;
    use std::sync::Arc;

    async fn finish(
        mut rx: mpsc::Receiver<Result<proto::StepEvent, Status>>,
    ) -> (Vec<String>, proto::StepFinished) {
        let mut lines = Vec::new();
        while let Some(Ok(event)) = rx.recv().await {
            match event.event {
                Some(proto::step_event::Event::Line(l)) => lines.push(l.text),
                Some(proto::step_event::Event::Finished(f)) => return (lines, f),
                None => {}
            }
        }
        panic!("the step never finished; lines: {lines:?}");
    }

    /// The killed apply's copy of a step still runs when the re-run asks for
    /// it again: the second request waits, then skips, and never runs beside it.
    #[tokio::test]
    async fn a_step_asked_for_while_it_still_runs_waits_and_never_runs_twice_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runner = Arc::new(StepRunner::new(dir.path()));
        // Fails when a second copy runs while the first holds the directory.
        let script = "mkdir \"$MOTORPOOL_NODE_DIR/busy\"; sleep 0.4; \
                      echo run >> \"$MOTORPOOL_NODE_DIR/runs\"; rmdir \"$MOTORPOOL_NODE_DIR/busy\"";
        let request = proto::RunStepRequest {
            step: "runtime".into(),
            script: script.into(),
            key: "k1".into(),
            ..Default::default()
        };
        let (tx1, rx1) = mpsc::channel(64);
        let first = {
            let runner = runner.clone();
            let request = request.clone();
            tokio::spawn(async move { runner.run(request, tx1).await })
        };
        // The first caller goes away (a killed apply): its copy runs on.
        drop(rx1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (tx2, rx2) = mpsc::channel(64);
        let second = {
            let runner = runner.clone();
            tokio::spawn(async move { runner.run(request, tx2).await })
        };
        let (lines, finished) = finish(rx2).await;
        first.await.expect("first run");
        second.await.expect("second run");
        assert_eq!(finished.exit_code, 0, "{finished:?}");
        assert!(finished.skipped, "the second request skips: {finished:?}");
        assert!(
            lines.iter().any(|l| l.contains("waiting for step runtime")),
            "{lines:?}"
        );
        let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
        assert_eq!(runs.lines().count(), 1, "ran once: {runs}");
    }
}
