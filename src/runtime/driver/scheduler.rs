//! The scheduler: one task owning every run and executor, driven by events.
//!
//! A run's tasks start when all they depend on succeeded. A command task
//! runs on the driver; a map task's input is split into partitions, each a
//! unit of work ("part") pushed to an executor; a reduce stage starts when
//! every map part has output. Parts go out in batches: each executor holds
//! at most `cores x depth` parts, where depth grows as a stage's parts prove
//! short (about [`TARGET_QUEUE_US`] of work queued per core), so tiny tasks
//! stream through at memory speed while long ones spread evenly.
//!
//! Failures: a part that fails gets `retries` more attempts; then its task
//! fails and the run with it. A lost executor's parts, and map output it held
//! that a reduce still needs, run again elsewhere without using a retry.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::Shared;
use super::command::{self, CommandResult, CommandRun, Program};
use super::store;
use crate::runtime::plan::{self, Func, JobPlan, TaskKind};
use crate::runtime::proto::{self, InputRange, StageKind, TaskState};
use crate::runtime::{RunSummary, TaskOutcome, TaskSummary, tail_text};

/// How often the scheduler checks heartbeats, deadlines and progress.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Progress goes to watchers at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Work queued per executor core, once a stage's task length is known.
const TARGET_QUEUE_US: f64 = 20_000.0;
/// The most parts queued per core.
const MAX_DEPTH: u32 = 512;
/// Reruns of one part (lost executors, unreadable map output) before its task fails.
const MAX_RERUNS: u32 = 10;
/// The most tasks in one message to an executor.
const MAX_TASKS_PER_MESSAGE: usize = 2048;
/// Map partitions up to this size travel inside their task message.
const INLINE_INPUT: u64 = 64 << 10;
/// How much of a failing attempt's stderr goes into the summary.
const SUMMARY_STDERR: usize = 4096;
/// Finished runs kept in memory for late watchers.
const FINISHED_KEPT: usize = 64;

pub(crate) type ExecTx = mpsc::UnboundedSender<Result<proto::DriverMessage, Status>>;
pub(crate) type WatchTx = mpsc::UnboundedSender<Result<proto::JobEvent, Status>>;

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub minute: Duration,
}

/// A submitted run whose inputs are all on the driver.
#[derive(Debug)]
pub(crate) struct NewRun {
    pub run_id: String,
    pub name: String,
    pub bundle_id: String,
    pub plan: JobPlan,
    pub timeout_minutes: Option<u32>,
    pub env: BTreeMap<String, String>,
    pub default_partition_mb: u32,
    pub work: PathBuf,
    pub run_dir: PathBuf,
    /// Uploaded input files (relative to `work`), removed when the run ends.
    pub uploaded: Vec<PathBuf>,
    /// Declared inputs read where they lie (relative path -> the file).
    pub in_place: BTreeMap<PathBuf, proto::LocalFile>,
    pub submitted: Instant,
    pub submitted_unix_ms: u64,
}

pub(crate) enum Event {
    Register {
        req: proto::RegisterExecutorRequest,
        reply: oneshot::Sender<proto::RegisterExecutorResponse>,
    },
    Connected {
        executor_id: String,
        tx: ExecTx,
        reply: oneshot::Sender<Result<Arc<str>, String>>,
    },
    FromExecutor {
        executor_id: Arc<str>,
        msg: proto::ExecutorMessage,
    },
    Disconnected {
        executor_id: Arc<str>,
        reason: String,
    },
    Start(Box<NewRun>),
    CommandDone {
        run_id: Arc<str>,
        task: usize,
        attempt: u32,
        result: CommandResult,
    },
    Watch {
        run_id: String,
        tx: WatchTx,
        reply: oneshot::Sender<bool>,
    },
    Cancel {
        run_id: String,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<proto::ClusterStatusResponse>,
    },
    /// A map task's object storage work before its parts can run is done:
    /// its input listed and split, its output prefix cleared.
    ObjectsReady {
        run_id: Arc<str>,
        task: usize,
        result: Result<Option<ObjectInput>, String>,
    },
    Tick,
    Shutdown,
}

/// A map task's input on object storage, listed and split into partitions.
#[derive(Debug)]
pub(crate) struct ObjectInput {
    inputs: Vec<Vec<InputRange>>,
}

struct ExecRt {
    address: String,
    cores: u32,
    pid: u32,
    tx: Option<ExecTx>,
    last_seen: Instant,
    running: HashSet<u64>,
    known_stages: HashSet<(Arc<str>, u32)>,
}

struct AttemptRef {
    run: Arc<str>,
    task: u32,
    stage: u8,
    part: u32,
    attempt: u32,
    exec: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TState {
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    Pending,
    Running(u64),
    Done,
}

struct PartRt {
    state: PState,
    failures: u32,
    reruns: u32,
    started: u32,
    /// Map with reduce: where its output lives.
    out_exec: Option<Arc<str>>,
    out_attempt: u64,
    /// Map with reduce: bytes per reduce partition.
    bytes: Vec<u64>,
}

impl PartRt {
    fn new() -> PartRt {
        PartRt {
            state: PState::Pending,
            failures: 0,
            reruns: 0,
            started: 0,
            out_exec: None,
            out_attempt: 0,
            bytes: Vec::new(),
        }
    }
}

struct StageRt {
    def: proto::StageDef,
    parts: Vec<PartRt>,
    /// Map: each part's byte ranges.
    inputs: Vec<Vec<InputRange>>,
    pending: VecDeque<u32>,
    done: u32,
    running: u32,
    avg_us: f64,
    samples: u32,
    /// Where committed `part-NNNNN` files go (absolute).
    output_dir: Option<PathBuf>,
    /// Its attempts write `part-NNNNN` objects to object storage themselves
    /// (an object appears only when its attempt succeeds).
    writes_objects: bool,
}

impl StageRt {
    fn name(&self) -> &'static str {
        if self.def.kind == StageKind::Reduce as i32 {
            "reduce"
        } else {
            "map"
        }
    }

    fn complete(&self) -> bool {
        self.done as usize == self.parts.len()
    }

    /// How many parts of this stage an executor core may hold.
    fn depth(&self) -> u32 {
        if self.samples == 0 {
            1
        } else {
            ((TARGET_QUEUE_US / self.avg_us.max(1.0)) as u32).clamp(1, MAX_DEPTH)
        }
    }
}

struct CmdRt {
    attempt: u32,
    failures: u32,
    kill: Option<oneshot::Sender<()>>,
    /// How much of this attempt's stdout watchers have been sent.
    streamed: u64,
}

/// The most stdout one task streams to watchers per tick.
const STREAM_CHUNK: usize = 64 << 10;

struct TaskRt {
    state: TState,
    started: Option<Instant>,
    ended: Option<Instant>,
    deadline: Option<Instant>,
    attempts: u32,
    failed_attempts: u32,
    rerun_attempts: u32,
    task_time_us: u64,
    input_bytes: u64,
    shuffle_bytes: u64,
    output_bytes: u64,
    records_in: u64,
    records_out: u64,
    output_files: u32,
    exit_code: Option<i32>,
    stderr_tail: Option<String>,
    error: Option<String>,
    command: Option<CmdRt>,
    /// Map, then reduce.
    stages: Vec<StageRt>,
}

impl TaskRt {
    fn new() -> TaskRt {
        TaskRt {
            state: TState::Waiting,
            started: None,
            ended: None,
            deadline: None,
            attempts: 0,
            failed_attempts: 0,
            rerun_attempts: 0,
            task_time_us: 0,
            input_bytes: 0,
            shuffle_bytes: 0,
            output_bytes: 0,
            records_in: 0,
            records_out: 0,
            output_files: 0,
            exit_code: None,
            stderr_tail: None,
            error: None,
            command: None,
            stages: Vec::new(),
        }
    }
}

struct RunRt {
    id: Arc<str>,
    name: String,
    bundle_id: String,
    work: PathBuf,
    run_dir: PathBuf,
    env: BTreeMap<String, String>,
    default_partition_mb: u32,
    uploaded: Vec<PathBuf>,
    in_place: BTreeMap<PathBuf, proto::LocalFile>,
    plan: JobPlan,
    tasks: Vec<TaskRt>,
    started: Instant,
    started_unix_ms: u64,
    deadline: Option<Instant>,
    timeout_minutes: Option<u32>,
    watchers: Vec<WatchTx>,
    dirty: bool,
    last_progress: Instant,
    error: Option<String>,
    next_stage: u32,
    ended: bool,
    /// Input files kept open for inlining small partitions.
    open_inputs: HashMap<String, std::fs::File>,
}

impl RunRt {
    /// Where the input file `rel` is read: the work directory's file (an
    /// upload, or written by an earlier task), else the submitter's file
    /// where it lies.
    fn input_path(&self, rel: &Path) -> PathBuf {
        let path = self.work.join(rel);
        match self.in_place.get(rel) {
            Some(local) if !path.exists() => PathBuf::from(&local.path),
            _ => path,
        }
    }

    /// The input files `pattern` matches (relative, sorted, with sizes):
    /// those in the work directory and those read in place.
    fn resolve_input(&self, pattern: &str) -> anyhow::Result<Vec<(PathBuf, u64)>> {
        let mut files = plan::resolve_input(&self.work, pattern)?;
        if !self.in_place.is_empty() {
            let glob = glob::Pattern::new(pattern.trim_start_matches("./"))?;
            let opts = glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                require_literal_leading_dot: true,
            };
            for (rel, local) in &self.in_place {
                if glob.matches_path_with(rel, opts) && !self.work.join(rel).exists() {
                    files.push((rel.clone(), local.size));
                }
            }
            files.sort();
            files.dedup();
        }
        Ok(files)
    }

    /// The bytes of small byte ranges, with a newline after a file's last line
    /// when it has none (as ReadInput sends them).
    fn read_inline(&mut self, ranges: &[InputRange]) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::new();
        for r in ranges {
            if r.end <= r.start {
                continue;
            }
            if !self.open_inputs.contains_key(&r.path) {
                let rel = crate::runtime::safe_relative(&r.path).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                })?;
                let f = std::fs::File::open(self.input_path(&rel))?;
                self.open_inputs.insert(r.path.clone(), f);
            }
            let Some(f) = self.open_inputs.get(&r.path) else {
                continue;
            };
            let at = out.len();
            out.resize(at + (r.end - r.start) as usize, 0);
            f.read_exact_at(&mut out[at..], r.start)?;
            if out.last() != Some(&b'\n') {
                out.push(b'\n');
            }
        }
        Ok(out)
    }
}

struct Scheduler {
    settings: Settings,
    shared: Arc<Shared>,
    executors: BTreeMap<Arc<str>, ExecRt>,
    next_executor: u64,
    runs: HashMap<Arc<str>, RunRt>,
    run_order: Vec<Arc<str>>,
    attempts: HashMap<u64, AttemptRef>,
    next_attempt: u64,
    outbox: HashMap<Arc<str>, proto::DriverMessage>,
    finished: VecDeque<(Arc<str>, proto::JobFinished)>,
}

/// Runs the scheduler until `Shutdown` or until every sender is gone.
pub(crate) async fn run(
    settings: Settings,
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let mut s = Scheduler {
        settings,
        shared,
        executors: BTreeMap::new(),
        next_executor: 1,
        runs: HashMap::new(),
        run_order: Vec::new(),
        attempts: HashMap::new(),
        next_attempt: 1,
        outbox: HashMap::new(),
        finished: VecDeque::new(),
    };
    while let Some(ev) = events.recv().await {
        let mut stop = s.handle(ev);
        // Take whatever else is waiting before scheduling: one batch of work per round.
        for _ in 0..256 {
            match events.try_recv() {
                Ok(ev) => stop |= s.handle(ev),
                Err(_) => break,
            }
        }
        if stop {
            s.shutdown();
            s.flush();
            return;
        }
        s.schedule();
        s.flush();
    }
    s.shutdown();
}

fn job_event(event: proto::job_event::Event) -> Result<proto::JobEvent, Status> {
    Ok(proto::JobEvent { event: Some(event) })
}

impl Scheduler {
    /// Handles one event; true on shutdown.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Register { req, reply } => {
                let id: Arc<str> = format!("exec-{}", self.next_executor).into();
                self.next_executor += 1;
                self.executors.insert(
                    id.clone(),
                    ExecRt {
                        address: req.address,
                        cores: req.cores.max(1),
                        pid: req.pid,
                        tx: None,
                        last_seen: Instant::now(),
                        running: HashSet::new(),
                        known_stages: HashSet::new(),
                    },
                );
                let _ = reply.send(proto::RegisterExecutorResponse {
                    executor_id: id.to_string(),
                    heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u32,
                });
            }
            Event::Connected {
                executor_id,
                tx,
                reply,
            } => {
                let key = self
                    .executors
                    .get_key_value(executor_id.as_str())
                    .map(|(k, _)| k.clone());
                let answer = match key.and_then(|k| self.executors.get_mut(&k).map(|e| (k, e))) {
                    None => Err(format!("unknown executor `{executor_id}`: register first")),
                    Some((_, e)) if e.tx.is_some() => Err(format!(
                        "executor `{executor_id}` already has a task stream"
                    )),
                    Some((id, e)) => {
                        e.tx = Some(tx);
                        e.last_seen = Instant::now();
                        Ok(id)
                    }
                };
                let _ = reply.send(answer);
            }
            Event::FromExecutor { executor_id, msg } => {
                let Some(e) = self.executors.get_mut(&executor_id) else {
                    return false;
                };
                e.last_seen = Instant::now();
                if let Some(proto::executor_message::Msg::Statuses(batch)) = msg.msg {
                    for st in batch.statuses {
                        self.on_status(&executor_id, st);
                    }
                }
            }
            Event::Disconnected {
                executor_id,
                reason,
            } => self.executor_lost(&executor_id, &reason),
            Event::Start(new) => self.start_run(*new),
            Event::CommandDone {
                run_id,
                task,
                attempt,
                result,
            } => self.with_run(&run_id, |s, run| {
                s.on_command_done(run, task, attempt, result)
            }),
            Event::ObjectsReady {
                run_id,
                task,
                result,
            } => self.with_run(&run_id, |s, run| s.on_objects_ready(run, task, result)),
            Event::Watch { run_id, tx, reply } => {
                if let Some(run) = self.runs.get_mut(run_id.as_str()) {
                    let p = progress(run);
                    let _ = tx.send(job_event(proto::job_event::Event::Progress(p)));
                    run.watchers.push(tx);
                    let _ = reply.send(true);
                } else if let Some((_, fin)) = self.finished.iter().find(|(id, _)| **id == *run_id)
                {
                    let _ = tx.send(job_event(proto::job_event::Event::Finished(fin.clone())));
                    let _ = reply.send(true);
                } else {
                    let _ = reply.send(false);
                }
            }
            Event::Cancel { run_id, reply } => {
                let found = self.runs.contains_key(run_id.as_str());
                if found {
                    self.with_run(&run_id, |s, run| {
                        s.fail_run(run, "the run was cancelled".to_string())
                    });
                }
                let _ = reply.send(found);
            }
            Event::Status { reply } => {
                let now = Instant::now();
                let executors = self
                    .executors
                    .iter()
                    .filter(|(_, e)| e.tx.is_some())
                    .map(|(id, e)| proto::ExecutorStatus {
                        executor_id: id.to_string(),
                        address: e.address.clone(),
                        cores: e.cores,
                        pid: e.pid,
                        running_tasks: e.running.len() as u32,
                        last_seen_ms_ago: now.duration_since(e.last_seen).as_millis() as u64,
                    })
                    .collect();
                let active_runs = self
                    .run_order
                    .iter()
                    .filter_map(|id| self.runs.get(id))
                    .map(|r| proto::RunInfo {
                        run_id: r.id.to_string(),
                        name: r.name.clone(),
                        state: "running".to_string(),
                        started_at_unix_ms: r.started_unix_ms,
                        duration_ms: r.started.elapsed().as_millis() as u64,
                        error: String::new(),
                    })
                    .collect();
                let queued_tasks = self.queued_parts();
                let _ = reply.send(proto::ClusterStatusResponse {
                    executors,
                    active_runs,
                    queued_tasks,
                    version: crate::runtime::VERSION.to_string(),
                    engine: Default::default(),
                });
            }
            Event::Tick => self.tick(),
            Event::Shutdown => return true,
        }
        false
    }

    /// Takes a run out of the map for `f`, and puts it back unless it ended.
    fn with_run(&mut self, run_id: &str, f: impl FnOnce(&mut Scheduler, &mut RunRt)) {
        let Some((id, mut run)) = self.runs.remove_entry(run_id) else {
            return;
        };
        f(self, &mut run);
        if !run.ended {
            self.runs.insert(id, run);
        }
    }

    fn send(&mut self, exec: &Arc<str>) -> &mut proto::DriverMessage {
        self.outbox.entry(exec.clone()).or_default()
    }

    fn flush(&mut self) {
        for (id, mut msg) in self.outbox.drain() {
            let Some(tx) = self.executors.get(&id).and_then(|e| e.tx.as_ref()) else {
                continue;
            };
            // Big batches go as several messages.
            while msg.tasks.len() > MAX_TASKS_PER_MESSAGE {
                let rest = msg.tasks.split_off(MAX_TASKS_PER_MESSAGE);
                let head = proto::DriverMessage {
                    stages: std::mem::take(&mut msg.stages),
                    tasks: std::mem::replace(&mut msg.tasks, rest),
                    cancel: Vec::new(),
                    finished_runs: Vec::new(),
                };
                let _ = tx.send(Ok(head));
            }
            let _ = tx.send(Ok(msg));
        }
    }

    // ------------------------------------------------------------ runs

    fn start_run(&mut self, new: NewRun) {
        let id: Arc<str> = new.run_id.as_str().into();
        let deadline = new
            .timeout_minutes
            .map(|m| new.submitted + self.settings.minute * m);
        let tasks = new.plan.tasks.iter().map(|_| TaskRt::new()).collect();
        let mut run = RunRt {
            id: id.clone(),
            name: new.name,
            bundle_id: new.bundle_id,
            work: new.work,
            run_dir: new.run_dir,
            env: new.env,
            default_partition_mb: new.default_partition_mb,
            uploaded: new.uploaded,
            in_place: new.in_place,
            plan: new.plan,
            tasks,
            started: new.submitted,
            started_unix_ms: new.submitted_unix_ms,
            deadline,
            timeout_minutes: new.timeout_minutes,
            watchers: Vec::new(),
            dirty: true,
            last_progress: Instant::now(),
            error: None,
            next_stage: 0,
            ended: false,
            open_inputs: HashMap::new(),
        };
        self.run_order.push(id.clone());
        self.advance(&mut run);
        if !run.ended {
            self.runs.insert(id, run);
        }
    }

    /// Starts every waiting task whose dependencies succeeded; ends the run when all did.
    fn advance(&mut self, run: &mut RunRt) {
        loop {
            if run.ended {
                return;
            }
            let ready: Vec<usize> = (0..run.tasks.len())
                .filter(|&i| {
                    run.tasks[i].state == TState::Waiting
                        && run.plan.tasks[i]
                            .deps
                            .iter()
                            .all(|&d| run.tasks[d].state == TState::Succeeded)
                })
                .collect();
            if ready.is_empty() {
                break;
            }
            for i in ready {
                if run.ended {
                    return;
                }
                self.start_task(run, i);
            }
        }
        if run.tasks.iter().all(|t| t.state == TState::Succeeded) {
            self.finish_run(run);
        }
    }

    fn task_event(run: &mut RunRt, task: usize, state: &str, message: String) {
        let ev = proto::TaskEvent {
            task: run.plan.tasks[task].name.clone(),
            state: state.to_string(),
            message,
        };
        run.watchers.retain(|w| {
            w.send(job_event(proto::job_event::Event::Task(ev.clone())))
                .is_ok()
        });
        run.dirty = true;
    }

    fn start_task(&mut self, run: &mut RunRt, ti: usize) {
        let now = Instant::now();
        let planned = run.plan.tasks[ti].clone();
        {
            let t = &mut run.tasks[ti];
            t.state = TState::Running;
            t.started = Some(now);
            t.deadline = planned
                .timeout_minutes
                .map(|m| now + self.settings.minute * m);
        }
        Self::task_event(run, ti, "started", String::new());
        match &planned.kind {
            TaskKind::Command(_) | TaskKind::Spark(_) => {
                run.tasks[ti].command = Some(CmdRt {
                    attempt: 0,
                    failures: 0,
                    kill: None,
                    streamed: 0,
                });
                self.spawn_command(run, ti);
            }
            TaskKind::Map { map, reduce } => {
                let input_url = motorpool_storage::is_data_url(&map.input);
                if input_url || planned.output_url.is_some() {
                    // Listing, splitting and clearing on object storage take
                    // network round trips: done off the scheduler, which
                    // plans the task when they are (Event::ObjectsReady).
                    self.prepare_objects(run, ti, map, input_url);
                    return;
                }
                self.map_task_planned(run, ti, map, reduce.as_ref(), None);
            }
        }
    }

    /// Plans a map task's stages (with its object storage input when it has
    /// one) and lets its parts go.
    fn map_task_planned(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        map: &plan::MapPlan,
        reduce: Option<&plan::ReducePlan>,
        objects: Option<ObjectInput>,
    ) {
        if let Err(e) = self.plan_map_task(run, ti, map, reduce, objects) {
            self.task_failed(run, ti, format!("{e:#}"), None);
            return;
        }
        // A map over nothing with no reduce is done at once.
        let t = &run.tasks[ti];
        if t.stages.iter().all(|s| s.complete()) {
            self.task_succeeded(run, ti);
        }
    }

    /// Lists and splits a map task's object storage input and clears its
    /// output prefix of an earlier run's `part-*` objects, on a task of its
    /// own; the answer comes back as [`Event::ObjectsReady`].
    fn prepare_objects(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        map: &plan::MapPlan,
        input_url: bool,
    ) {
        let cores = self.cores();
        let events = self.shared.events.clone();
        let run_id = run.id.clone();
        let output_url = run.plan.tasks[ti].output_url.clone();
        let default_partition_mb = run.default_partition_mb;
        let map = map.clone();
        tokio::spawn(async move {
            let stores = motorpool_storage::stores();
            let result = async {
                if let Some(out) = &output_url {
                    let out = motorpool_storage::DataUrl::parse_output(out)?;
                    stores.delete_parts(&out).await?;
                }
                if !input_url {
                    return Ok(None);
                }
                let url = motorpool_storage::DataUrl::parse(&map.input)?;
                let objects = stores.list(&url).await?;
                if objects.is_empty() {
                    anyhow::bail!("the input `{}` matches no object", map.input);
                }
                if let Some(out) = &output_url
                    && let Some(o) = objects
                        .iter()
                        .find(|o| o.url.starts_with(out.trim_end_matches('/')))
                {
                    anyhow::bail!(
                        "the input `{}` includes {}, under the task's own `output` {out}",
                        map.input,
                        o.url
                    );
                }
                let total: u64 = objects.iter().map(|o| o.size).sum();
                let m = plan::partition_count(
                    total,
                    map.partitions,
                    map.partition_mb,
                    default_partition_mb,
                    cores,
                );
                let inputs = plan::split_objects(stores, &objects, m).await?;
                Ok(Some(ObjectInput { inputs }))
            }
            .await
            .map_err(|e: anyhow::Error| format!("{e:#}"));
            let _ = events.send(Event::ObjectsReady {
                run_id,
                task: ti,
                result,
            });
        });
        run.dirty = true;
    }

    fn on_objects_ready(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        result: Result<Option<ObjectInput>, String>,
    ) {
        if run.tasks[ti].state != TState::Running || !run.tasks[ti].stages.is_empty() {
            return; // cancelled, timed out or failed meanwhile
        }
        let planned = run.plan.tasks[ti].clone();
        let TaskKind::Map { map, reduce } = &planned.kind else {
            return;
        };
        match result {
            Ok(objects) => self.map_task_planned(run, ti, map, reduce.as_ref(), objects),
            Err(e) => self.task_failed(run, ti, e, None),
        }
    }

    /// The cores of the connected executors (at least 1).
    fn cores(&self) -> usize {
        self.executors
            .values()
            .filter(|e| e.tx.is_some())
            .map(|e| e.cores as usize)
            .sum::<usize>()
            .max(1)
    }

    fn plan_map_task(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        map: &plan::MapPlan,
        reduce: Option<&plan::ReducePlan>,
        objects: Option<ObjectInput>,
    ) -> anyhow::Result<()> {
        let cores = self.cores();
        let (m, inputs) = match objects {
            Some(o) => (o.inputs.len() as u32, o.inputs),
            None => self.split_files(run, ti, map, cores)?,
        };
        self.plan_map_stages(run, ti, map, reduce, cores, m, inputs)
    }

    /// Resolves and splits a map task's input in the job directory.
    fn split_files(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        map: &plan::MapPlan,
        cores: usize,
    ) -> anyhow::Result<(u32, Vec<Vec<InputRange>>)> {
        // Earlier tasks may have rewritten input files: read them afresh.
        run.open_inputs.clear();
        let files = run.resolve_input(&map.input)?;
        if files.is_empty() {
            anyhow::bail!("the input `{}` matches no file", map.input);
        }
        if let Some(o) = &run.plan.tasks[ti].output
            && let Some((f, _)) = files.iter().find(|(f, _)| f.starts_with(o))
        {
            anyhow::bail!(
                "the input `{}` includes {}, inside the task's own `output` {}",
                map.input,
                f.display(),
                o.display()
            );
        }
        let total: u64 = files.iter().map(|(_, s)| s).sum();
        let m = plan::partition_count(
            total,
            map.partitions,
            map.partition_mb,
            run.default_partition_mb,
            cores,
        );
        let mut inputs = plan::split_input_with(&files, m, |rel| run.input_path(rel))?;
        // Executors on this machine read their ranges where they lie.
        let mut ids: HashMap<String, Option<proto::LocalFile>> = HashMap::new();
        for range in inputs.iter_mut().flatten() {
            let id = ids.entry(range.path.clone()).or_insert_with(|| {
                let rel = Path::new(&range.path);
                match run.in_place.get(rel) {
                    Some(local) if !run.work.join(rel).exists() => Some(local.clone()),
                    _ => std::path::absolute(run.work.join(rel))
                        .ok()
                        .and_then(|p| crate::runtime::local::identify(&p).ok()),
                }
            });
            range.local = id.clone();
        }
        Ok((m, inputs))
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_map_stages(
        &mut self,
        run: &mut RunRt,
        ti: usize,
        map: &plan::MapPlan,
        reduce: Option<&plan::ReducePlan>,
        cores: usize,
        m: u32,
        inputs: Vec<Vec<InputRange>>,
    ) -> anyhow::Result<()> {
        let r = reduce.map(|rp| {
            rp.partitions
                .unwrap_or_else(|| (m as usize).min(cores).max(1) as u32)
        });
        let planned = &run.plan.tasks[ti];
        let output_dir = match &planned.output {
            Some(o) => {
                let dir = run.work.join(o);
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| {
                        anyhow::anyhow!("cannot clear the output {}: {e}", dir.display())
                    })?;
                }
                std::fs::create_dir_all(&dir).map_err(|e| {
                    anyhow::anyhow!("cannot create the output {}: {e}", dir.display())
                })?;
                Some(dir)
            }
            None => None,
        };
        let codec = match (&map.func, reduce.map(|r| &r.func)) {
            (Func::Python(_), Some(Func::Python(_))) => proto::Codec::Json,
            _ => proto::Codec::Text,
        };
        let stage_def = |id: u32, kind: StageKind, func: &Func| {
            let (command, python) = match func {
                Func::Command(c) => (c.clone(), None),
                Func::Python(p) => (
                    String::new(),
                    Some(proto::PythonFn {
                        file: p.file.clone(),
                        function: p.function.clone(),
                        per: if func.is_per_partition() {
                            proto::PythonPer::Partition as i32
                        } else {
                            proto::PythonPer::Record as i32
                        },
                    }),
                ),
            };
            proto::StageDef {
                run_id: run.id.to_string(),
                stage_id: id,
                bundle_id: run.bundle_id.clone(),
                task: planned.name.clone(),
                kind: kind as i32,
                command,
                python,
                combiner: None,
                reduce_partitions: 0,
                codec: codec as i32,
                env: run.env.clone().into_iter().collect(),
                write_output: false,
                output_url: String::new(),
            }
        };
        let output_url = planned.output_url.clone().unwrap_or_default();
        let map_id = run.next_stage;
        let mut map_def = stage_def(map_id, StageKind::Map, &map.func);
        map_def.reduce_partitions = r.unwrap_or(0);
        map_def.write_output = reduce.is_none() && (output_dir.is_some() || !output_url.is_empty());
        if reduce.is_none() {
            map_def.output_url = output_url.clone();
        }
        if let (Func::Python(_), Some(Func::Python(p))) = (&map.func, reduce.map(|r| &r.func)) {
            map_def.combiner = Some(proto::PythonFn {
                file: p.file.clone(),
                function: p.function.clone(),
                per: proto::PythonPer::Record as i32,
            });
        }
        let input_bytes: u64 = inputs.iter().flatten().map(|r| r.end - r.start).sum();
        let mut stages = vec![StageRt {
            def: map_def,
            parts: (0..m).map(|_| PartRt::new()).collect(),
            inputs,
            pending: (0..m).collect(),
            done: 0,
            running: 0,
            avg_us: 0.0,
            samples: 0,
            output_dir: if reduce.is_none() {
                output_dir.clone()
            } else {
                None
            },
            writes_objects: reduce.is_none() && !output_url.is_empty(),
        }];
        if let (Some(rp), Some(r)) = (reduce, r) {
            let mut def = stage_def(map_id + 1, StageKind::Reduce, &rp.func);
            def.write_output = output_dir.is_some() || !output_url.is_empty();
            def.output_url = output_url.clone();
            stages.push(StageRt {
                def,
                parts: (0..r).map(|_| PartRt::new()).collect(),
                inputs: Vec::new(),
                pending: (0..r).collect(),
                done: 0,
                running: 0,
                avg_us: 0.0,
                samples: 0,
                output_dir: output_dir.clone(),
                writes_objects: !output_url.is_empty(),
            });
        }
        run.next_stage += stages.len() as u32;
        // Where PutOutput writes for this task.
        if let Some(dir) = &output_dir {
            let out_stage = stages.last().map(|s| s.def.stage_id).unwrap_or(map_id);
            if let Some(files) = self.shared.lock_runs().get_mut(&*run.id) {
                files.outputs.insert(out_stage, dir.clone());
            }
        }
        let t = &mut run.tasks[ti];
        t.input_bytes = input_bytes;
        t.stages = stages;
        run.dirty = true;
        Ok(())
    }

    /// What a command-like task runs on this node: its shell command, or
    /// the command line the engine beside this runtime makes of it.
    fn command_line(&self, kind: &TaskKind) -> Result<(Program, BTreeMap<String, String>), String> {
        match kind {
            TaskKind::Command(cmd) => Ok((Program::Shell(cmd.clone()), BTreeMap::new())),
            TaskKind::Spark(spark) => {
                let Some(engine) = &self.shared.engine else {
                    return Err(
                        "this cluster runs no Spark: a `spark:` task needs a cluster \
                                with `engine: spark`"
                            .to_string(),
                    );
                };
                let launch = engine.spark_submit(spark)?;
                Ok((Program::Argv(launch.argv), launch.env))
            }
            TaskKind::Map { .. } => Err("a map task is not a command".to_string()),
        }
    }

    fn spawn_command(&mut self, run: &mut RunRt, ti: usize) {
        let (program, engine_env) = match self.command_line(&run.plan.tasks[ti].kind) {
            Ok(line) => line,
            Err(e) => {
                let name = run.plan.tasks[ti].name.clone();
                self.task_failed(run, ti, format!("task `{name}`: {e}"), None);
                return;
            }
        };
        let Some(c) = run.tasks[ti].command.as_mut() else {
            return;
        };
        c.attempt += 1;
        c.streamed = 0;
        let attempt = c.attempt;
        let (kill_tx, kill_rx) = oneshot::channel();
        c.kill = Some(kill_tx);
        run.tasks[ti].attempts += 1;
        let name = run.plan.tasks[ti].name.clone();
        let mut env = run.env.clone();
        env.insert("MOTORPOOL_RUN_ID".into(), run.id.to_string());
        env.insert("MOTORPOOL_TASK".into(), name.clone());
        env.insert("MOTORPOOL_ATTEMPT".into(), attempt.to_string());
        env.extend(engine_env);
        let spec = CommandRun {
            program,
            cwd: run.work.clone(),
            env,
            log_dir: store::task_log_dir(&run.run_dir, &name),
            attempt,
        };
        let events = self.shared.events.clone();
        let run_id = run.id.clone();
        tokio::spawn(async move {
            let result = command::run(spec, kill_rx).await;
            let _ = events.send(Event::CommandDone {
                run_id,
                task: ti,
                attempt,
                result,
            });
        });
        run.dirty = true;
    }

    fn on_command_done(&mut self, run: &mut RunRt, ti: usize, attempt: u32, result: CommandResult) {
        let max = run.plan.tasks[ti].max_attempts;
        let t = &mut run.tasks[ti];
        let Some(c) = t.command.as_mut() else { return };
        if t.state != TState::Running || c.attempt != attempt {
            return;
        }
        // What the attempt printed last reaches watchers before its end.
        stream_task_output(run, ti);
        let t = &mut run.tasks[ti];
        let Some(c) = t.command.as_mut() else { return };
        c.kill = None;
        t.task_time_us += result.duration.as_micros() as u64;
        t.exit_code = result.exit_code;
        if result.ok() {
            self.task_succeeded(run, ti);
            return;
        }
        c.failures += 1;
        t.failed_attempts += 1;
        let failures = c.failures;
        let why = match (&result.error, result.exit_code) {
            (Some(e), _) => e.clone(),
            (None, Some(code)) => format!("exit code {code}"),
            (None, None) => "no exit code".to_string(),
        };
        if failures >= max {
            let msg = format!(
                "task `{}` failed after {failures} attempt{} ({why})",
                run.plan.tasks[ti].name,
                if failures == 1 { "" } else { "s" }
            );
            self.task_failed(run, ti, msg, Some(result.stderr_tail));
        } else {
            Self::task_event(
                run,
                ti,
                "retrying",
                format!("attempt {attempt} failed ({why}); {} left", max - failures),
            );
            self.spawn_command(run, ti);
        }
    }

    fn task_succeeded(&mut self, run: &mut RunRt, ti: usize) {
        let t = &mut run.tasks[ti];
        t.state = TState::Succeeded;
        t.ended = Some(Instant::now());
        Self::task_event(run, ti, "succeeded", String::new());
        self.advance(run);
    }

    fn task_failed(&mut self, run: &mut RunRt, ti: usize, msg: String, stderr: Option<String>) {
        let t = &mut run.tasks[ti];
        t.state = TState::Failed;
        t.ended = Some(Instant::now());
        t.error = Some(msg.clone());
        t.stderr_tail = stderr.filter(|s| !s.trim().is_empty());
        self.cancel_task_work(run, ti);
        Self::task_event(run, ti, "failed", msg.clone());
        let full = match &run.tasks[ti].stderr_tail {
            Some(tail) => format!("{msg}; stderr:\n{}", tail_text(tail, SUMMARY_STDERR)),
            None => msg,
        };
        self.fail_run(run, full);
    }

    /// Kills a task's command and its running parts.
    fn cancel_task_work(&mut self, run: &mut RunRt, ti: usize) {
        let t = &mut run.tasks[ti];
        if let Some(c) = t.command.as_mut()
            && let Some(kill) = c.kill.take()
        {
            let _ = kill.send(());
        }
        let mut cancels = Vec::new();
        for stage in &mut t.stages {
            for part in &mut stage.parts {
                if let PState::Running(aid) = part.state {
                    part.state = PState::Pending;
                    cancels.push(aid);
                }
            }
            stage.running = 0;
        }
        for aid in cancels {
            self.cancel_attempt(aid);
        }
    }

    fn cancel_attempt(&mut self, aid: u64) {
        if let Some(a) = self.attempts.remove(&aid) {
            if let Some(e) = self.executors.get_mut(&a.exec) {
                e.running.remove(&aid);
            }
            self.send(&a.exec).cancel.push(aid);
        }
    }

    fn fail_run(&mut self, run: &mut RunRt, msg: String) {
        if run.ended {
            return;
        }
        if run.error.is_none() {
            run.error = Some(msg);
        }
        for ti in 0..run.tasks.len() {
            match run.tasks[ti].state {
                TState::Running => {
                    self.cancel_task_work(run, ti);
                    let t = &mut run.tasks[ti];
                    t.state = TState::Cancelled;
                    t.ended = Some(Instant::now());
                    t.error = Some("cancelled: the run failed".to_string());
                }
                TState::Waiting => run.tasks[ti].state = TState::Skipped,
                _ => {}
            }
        }
        self.finish_run(run);
    }

    fn finish_run(&mut self, run: &mut RunRt) {
        if run.ended {
            return;
        }
        run.ended = true;
        let summary = summary(run);
        let summary_json = serde_json::to_string(&summary).unwrap_or_default();
        if let Err(e) = store::write_json(&run.run_dir.join("summary.json"), &summary) {
            eprintln!("motorpool driver: {e:#}");
        }
        let fin = proto::JobFinished {
            ok: summary.ok,
            error: summary.error.clone().unwrap_or_default(),
            summary_json,
        };
        let p = progress(run);
        for w in run.watchers.drain(..) {
            let _ = w.send(job_event(proto::job_event::Event::Progress(p.clone())));
            let _ = w.send(job_event(proto::job_event::Event::Finished(fin.clone())));
        }
        self.finished.push_back((run.id.clone(), fin));
        while self.finished.len() > FINISHED_KEPT {
            self.finished.pop_front();
        }
        self.run_order.retain(|id| *id != run.id);
        let ids: Vec<Arc<str>> = self.executors.keys().cloned().collect();
        for id in ids {
            self.send(&id).finished_runs.push(run.id.to_string());
        }
        for e in self.executors.values_mut() {
            e.known_stages.retain(|(r, _)| *r != run.id);
        }
        self.shared.lock_runs().remove(&*run.id);
        // Uploaded inputs are a copy of the submitter's data: not kept. Nor
        // are outputs of attempts that never committed.
        let work = run.work.clone();
        let uploaded = std::mem::take(&mut run.uploaded);
        let out_dirs: Vec<PathBuf> = run
            .tasks
            .iter()
            .flat_map(|t| t.stages.iter().filter_map(|s| s.output_dir.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            for f in uploaded {
                let _ = std::fs::remove_file(work.join(f));
            }
            for d in out_dirs {
                if let Ok(rd) = std::fs::read_dir(&d) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().ends_with(".tmp") {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
        });
    }

    // ------------------------------------------------------------ statuses

    fn on_status(&mut self, exec: &Arc<str>, st: proto::TaskStatus) {
        let Some(a) = self.attempts.remove(&st.attempt_id) else {
            return; // cancelled or from an earlier life: ignore
        };
        if let Some(e) = self.executors.get_mut(exec) {
            e.running.remove(&st.attempt_id);
        }
        let run_id = a.run.clone();
        self.with_run(&run_id, |s, run| s.on_part_status(run, a, st));
    }

    fn on_part_status(&mut self, run: &mut RunRt, a: AttemptRef, st: proto::TaskStatus) {
        let ti = a.task as usize;
        let (si, pi) = (a.stage as usize, a.part as usize);
        let t = &mut run.tasks[ti];
        if t.state != TState::Running {
            return;
        }
        let Some(stage) = t.stages.get_mut(si) else {
            return;
        };
        let Some(part) = stage.parts.get_mut(pi) else {
            return;
        };
        if part.state != PState::Running(st.attempt_id) {
            return;
        }
        stage.running = stage.running.saturating_sub(1);
        t.task_time_us += st.duration_us;
        run.dirty = true;
        let stage_name = stage.name();
        if !st.stderr_tail.is_empty() {
            let dir = store::task_log_dir(&run.run_dir, &run.plan.tasks[ti].name);
            let file = dir.join(format!("{stage_name}-{pi:05}.attempt-{}.stderr", a.attempt));
            let _ = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&file, st.stderr_tail.as_bytes()));
        }
        let state = TaskState::try_from(st.state).unwrap_or(TaskState::Unspecified);
        match state {
            TaskState::Succeeded => self.part_succeeded(run, &a, st),
            TaskState::FetchFailed => {
                let t = &mut run.tasks[ti];
                t.rerun_attempts += 1;
                let part = &mut t.stages[si].parts[pi];
                part.reruns += 1;
                part.state = PState::Pending;
                let reruns = part.reruns;
                t.stages[si].pending.push_back(a.part);
                for map_attempt in &st.fetch_failed_map_attempts {
                    let lost = t.stages[0]
                        .parts
                        .iter()
                        .position(|p| p.state == PState::Done && p.out_attempt == *map_attempt);
                    if let Some(mi) = lost {
                        lose_map_output(&mut t.stages[0], mi);
                    }
                }
                if reruns > MAX_RERUNS {
                    let msg = format!(
                        "task `{}`: reduce partition {pi} could not read map output {reruns} times: {}",
                        run.plan.tasks[ti].name, st.error
                    );
                    self.task_failed(run, ti, msg, None);
                }
            }
            TaskState::Failed | TaskState::Cancelled | TaskState::Unspecified => {
                let max = run.plan.tasks[ti].max_attempts;
                let t = &mut run.tasks[ti];
                let part = &mut t.stages[si].parts[pi];
                part.state = PState::Pending;
                if state == TaskState::Cancelled {
                    // The executor gave it up (it is stopping): run it elsewhere.
                    part.reruns += 1;
                    t.rerun_attempts += 1;
                    t.stages[si].pending.push_front(a.part);
                    return;
                }
                part.failures += 1;
                t.failed_attempts += 1;
                let failures = part.failures;
                let why = if !st.error.is_empty() {
                    st.error.clone()
                } else if st.exit_code >= 0 {
                    format!("exit code {}", st.exit_code)
                } else {
                    "failed".to_string()
                };
                let name = &run.plan.tasks[ti].name;
                if failures >= max {
                    let msg = format!(
                        "task `{name}` failed: {stage_name} partition {pi} failed {failures} time{} ({why})",
                        if failures == 1 { "" } else { "s" }
                    );
                    let tail = if st.stderr_tail.is_empty() {
                        None
                    } else {
                        Some(st.stderr_tail)
                    };
                    self.task_failed(run, ti, msg, tail);
                } else {
                    t.stages[si].pending.push_back(a.part);
                    let msg = format!(
                        "{stage_name} partition {pi} attempt {} failed ({why}); {} left",
                        a.attempt,
                        max - failures
                    );
                    Self::task_event(run, ti, "retrying", msg);
                }
            }
        }
    }

    fn part_succeeded(&mut self, run: &mut RunRt, a: &AttemptRef, st: proto::TaskStatus) {
        let ti = a.task as usize;
        let (si, pi) = (a.stage as usize, a.part as usize);
        let t = &mut run.tasks[ti];
        let stage = &mut t.stages[si];
        let reduce_n = stage.def.reduce_partitions as usize;
        if stage.def.kind == StageKind::Map as i32 && reduce_n > 0 {
            if st.partition_bytes.len() != reduce_n {
                // A confused executor: treat as lost output, run again.
                let part = &mut stage.parts[pi];
                part.state = PState::Pending;
                part.reruns += 1;
                stage.pending.push_back(a.part);
                return;
            }
            let part = &mut stage.parts[pi];
            part.bytes = st.partition_bytes;
            part.out_exec = Some(a.exec.clone());
            part.out_attempt = st.attempt_id;
        }
        if let Some(dir) = stage.output_dir.clone() {
            let final_path = dir.join(format!("part-{pi:05}"));
            let tmp = dir.join(format!(".part-{pi:05}.{}.tmp", st.attempt_id));
            let committed = if tmp.exists() {
                std::fs::rename(&tmp, &final_path)
            } else {
                std::fs::write(&final_path, b"")
            };
            if let Err(e) = committed {
                let msg = format!(
                    "task `{}`: cannot commit {}: {e}",
                    run.plan.tasks[ti].name,
                    final_path.display()
                );
                self.task_failed(run, ti, msg, None);
                return;
            }
            t.output_files += 1;
            t.output_bytes += st.output_bytes;
        } else if stage.writes_objects {
            t.output_files += 1;
            t.output_bytes += st.output_bytes;
        }
        let stage = &mut t.stages[si];
        stage.parts[pi].state = PState::Done;
        stage.done += 1;
        let us = st.duration_us as f64;
        stage.avg_us = if stage.samples == 0 {
            us
        } else {
            0.8 * stage.avg_us + 0.2 * us
        };
        stage.samples += 1;
        t.records_in += st.records_in;
        t.records_out += if si + 1 == t.stages.len() {
            st.records_out
        } else {
            0
        };
        t.shuffle_bytes += st.shuffle_bytes;
        if t.stages.iter().all(|s| s.complete()) {
            self.task_succeeded(run, ti);
        }
    }

    // ------------------------------------------------------------ executors

    fn executor_lost(&mut self, id: &Arc<str>, reason: &str) {
        let Some(exec) = self.executors.remove(id) else {
            return;
        };
        self.outbox.remove(id);
        if exec.tx.is_some() {
            eprintln!(
                "motorpool driver: executor {id} ({}) lost: {reason}",
                exec.address
            );
        }
        // Its parts run again elsewhere.
        for aid in exec.running {
            let Some(a) = self.attempts.remove(&aid) else {
                continue;
            };
            let run_id = a.run.clone();
            self.with_run(&run_id, |s, run| {
                let ti = a.task as usize;
                let t = &mut run.tasks[ti];
                let Some(stage) = t.stages.get_mut(a.stage as usize) else {
                    return;
                };
                let Some(part) = stage.parts.get_mut(a.part as usize) else {
                    return;
                };
                if part.state != PState::Running(aid) {
                    return;
                }
                part.state = PState::Pending;
                part.reruns += 1;
                let reruns = part.reruns;
                stage.running = stage.running.saturating_sub(1);
                stage.pending.push_front(a.part);
                t.rerun_attempts += 1;
                run.dirty = true;
                if reruns > MAX_RERUNS {
                    let msg = format!(
                        "task `{}`: a partition was lost with its executor {reruns} times",
                        run.plan.tasks[ti].name
                    );
                    s.task_failed(run, ti, msg, None);
                }
            });
        }
        // Map output it held that a reduce still needs runs again; reducers
        // that may be reading it start over.
        let run_ids: Vec<Arc<str>> = self.run_order.clone();
        for run_id in run_ids {
            self.with_run(&run_id, |s, run| {
                for ti in 0..run.tasks.len() {
                    let t = &mut run.tasks[ti];
                    if t.state != TState::Running || t.stages.len() < 2 || t.stages[1].complete() {
                        continue;
                    }
                    let lost: Vec<usize> = t.stages[0]
                        .parts
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.state == PState::Done && p.out_exec.as_ref() == Some(id))
                        .map(|(i, _)| i)
                        .collect();
                    if lost.is_empty() {
                        continue;
                    }
                    for mi in lost {
                        lose_map_output(&mut t.stages[0], mi);
                    }
                    let mut cancels = Vec::new();
                    let reduce = &mut t.stages[1];
                    for (ri, part) in reduce.parts.iter_mut().enumerate() {
                        if let PState::Running(aid) = part.state {
                            part.state = PState::Pending;
                            reduce.pending.push_front(ri as u32);
                            cancels.push(aid);
                        }
                    }
                    reduce.running = 0;
                    t.rerun_attempts += cancels.len() as u32;
                    run.dirty = true;
                    for aid in cancels {
                        s.cancel_attempt(aid);
                    }
                }
            });
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let timeout = self.settings.heartbeat_timeout;
        let silent: Vec<Arc<str>> = self
            .executors
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            let secs = timeout.as_secs_f64();
            self.executor_lost(&id, &format!("no heartbeat for {secs:.1} s"));
        }
        let run_ids: Vec<Arc<str>> = self.run_order.clone();
        for run_id in run_ids {
            self.with_run(&run_id, |s, run| {
                if run.deadline.is_some_and(|d| now >= d) {
                    let m = run.timeout_minutes.unwrap_or(0);
                    s.fail_run(
                        run,
                        format!("the job timed out after {m} minute{}", plural(m)),
                    );
                    return;
                }
                for ti in 0..run.tasks.len() {
                    let t = &run.tasks[ti];
                    if t.state == TState::Running && t.deadline.is_some_and(|d| now >= d) {
                        let m = run.plan.tasks[ti].timeout_minutes.unwrap_or(0);
                        let msg = format!(
                            "task `{}` timed out after {m} minute{}",
                            run.plan.tasks[ti].name,
                            plural(m)
                        );
                        s.task_failed(run, ti, msg, None);
                        return;
                    }
                }
                if !run.watchers.is_empty() {
                    stream_output(run);
                }
                if run.dirty && now.duration_since(run.last_progress) >= PROGRESS_EVERY {
                    run.dirty = false;
                    run.last_progress = now;
                    let p = progress(run);
                    run.watchers.retain(|w| {
                        w.send(job_event(proto::job_event::Event::Progress(p.clone())))
                            .is_ok()
                    });
                }
            });
        }
    }

    // ------------------------------------------------------------ dispatch

    /// Parts ready to dispatch that no executor took (after a dispatch, all
    /// are full): the stages `schedule` would hand out from.
    fn queued_parts(&self) -> u32 {
        let mut queued = 0usize;
        for run in self.run_order.iter().filter_map(|id| self.runs.get(id)) {
            for t in run.tasks.iter().filter(|t| t.state == TState::Running) {
                for (si, stage) in t.stages.iter().enumerate() {
                    if si == 1 && !t.stages[0].complete() {
                        break;
                    }
                    queued += stage.pending.len();
                }
            }
        }
        queued as u32
    }

    fn schedule(&mut self) {
        if !self.executors.values().any(|e| e.tx.is_some()) {
            return;
        }
        let run_ids: Vec<Arc<str>> = self.run_order.clone();
        for run_id in run_ids {
            self.with_run(&run_id, |s, run| {
                for ti in 0..run.tasks.len() {
                    if run.tasks[ti].state != TState::Running {
                        continue;
                    }
                    for si in 0..run.tasks[ti].stages.len() {
                        if si == 1 && !run.tasks[ti].stages[0].complete() {
                            break;
                        }
                        if !s.dispatch_stage(run, ti, si) {
                            return; // every executor is full
                        }
                    }
                }
            });
        }
    }

    /// Hands out the stage's pending parts; false when every executor is full.
    fn dispatch_stage(&mut self, run: &mut RunRt, ti: usize, si: usize) -> bool {
        loop {
            let t = &mut run.tasks[ti];
            let stage = &mut t.stages[si];
            let Some(&pi) = stage.pending.front() else {
                return true;
            };
            let depth = stage.depth();
            let best = self
                .executors
                .iter()
                .filter(|(_, e)| e.tx.is_some())
                .map(|(id, e)| {
                    let cap = (e.cores * depth) as i64;
                    (cap - e.running.len() as i64, id)
                })
                .filter(|(free, _)| *free > 0)
                .max_by_key(|(free, _)| *free)
                .map(|(_, id)| id.clone());
            let Some(exec_id) = best else {
                return false;
            };
            stage.pending.pop_front();
            let part = &mut stage.parts[pi as usize];
            if part.state != PState::Pending {
                continue;
            }
            let aid = self.next_attempt;
            self.next_attempt += 1;
            part.state = PState::Running(aid);
            part.started += 1;
            let attempt = part.started;
            stage.running += 1;
            t.attempts += 1;
            run.dirty = true;
            let mut spec = proto::TaskSpec {
                attempt_id: aid,
                run_id: run.id.to_string(),
                stage_id: stage.def.stage_id,
                partition: pi,
                attempt,
                inputs: Vec::new(),
                map_outputs: Vec::new(),
                locations: Vec::new(),
                inline_input: None,
            };
            if si == 0 {
                spec.inputs = stage.inputs[pi as usize].clone();
            } else {
                let mut index: HashMap<&Arc<str>, u32> = HashMap::new();
                for mp in &t.stages[0].parts {
                    let bytes = mp.bytes.get(pi as usize).copied().unwrap_or(0);
                    let Some(loc) = &mp.out_exec else { continue };
                    if bytes == 0 {
                        continue;
                    }
                    let next = index.len() as u32;
                    let li = *index.entry(loc).or_insert_with(|| {
                        spec.locations.push(proto::ExecutorLocation {
                            executor_id: loc.to_string(),
                            address: self
                                .executors
                                .get(loc)
                                .map(|e| e.address.clone())
                                .unwrap_or_default(),
                        });
                        next
                    });
                    spec.map_outputs.push(proto::MapOutputRef {
                        map_attempt_id: mp.out_attempt,
                        location: li,
                        bytes,
                    });
                }
            }
            let size: u64 = spec
                .inputs
                .iter()
                .map(|r| r.end.saturating_sub(r.start))
                .sum();
            // Object storage input is read by the executors, never through here.
            let on_storage = spec.inputs.iter().any(|r| r.size > 0);
            if si == 0 && size > 0 && size <= INLINE_INPUT && !on_storage {
                // Read failures leave the ranges for the executor to read (and report).
                if let Ok(data) = run.read_inline(&spec.inputs) {
                    spec.inline_input = Some(data);
                    spec.inputs.clear();
                }
            }
            let t = &run.tasks[ti];
            let stage = &t.stages[si];
            let key = (run.id.clone(), stage.def.stage_id);
            let Some(exec) = self.executors.get_mut(&exec_id) else {
                return false;
            };
            exec.running.insert(aid);
            let needs_def = exec.known_stages.insert(key);
            let def = needs_def.then(|| stage.def.clone());
            let msg = self.outbox.entry(exec_id.clone()).or_default();
            if let Some(def) = def {
                msg.stages.push(def);
            }
            msg.tasks.push(spec);
            self.attempts.insert(
                aid,
                AttemptRef {
                    run: run.id.clone(),
                    task: ti as u32,
                    stage: si as u8,
                    part: pi,
                    attempt,
                    exec: exec_id,
                },
            );
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<Arc<str>> = self.run_order.clone();
        for id in ids {
            self.with_run(&id, |s, run| {
                s.fail_run(run, "the driver stopped".to_string())
            });
        }
        // Dropping the senders ends every task stream.
        self.flush();
        self.executors.clear();
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn lose_map_output(map: &mut StageRt, mi: usize) {
    let p = &mut map.parts[mi];
    if p.state != PState::Done {
        return;
    }
    p.state = PState::Pending;
    p.out_exec = None;
    p.bytes.clear();
    p.reruns += 1;
    map.done = map.done.saturating_sub(1);
    map.pending.push_back(mi as u32);
}

/// Sends watchers what each running command-like task printed on stdout
/// since the last tick.
fn stream_output(run: &mut RunRt) {
    for ti in 0..run.tasks.len() {
        let running = run.tasks[ti].state == TState::Running
            && run.tasks[ti]
                .command
                .as_ref()
                .is_some_and(|c| c.kill.is_some());
        if running {
            stream_task_output(run, ti);
        }
    }
}

/// Sends watchers what task `ti`'s current attempt printed on stdout since
/// the last time (read from the attempt's log file).
fn stream_task_output(run: &mut RunRt, ti: usize) {
    use std::io::{Read as _, Seek as _};
    if run.watchers.is_empty() {
        return;
    }
    let name = run.plan.tasks[ti].name.clone();
    let Some(c) = run.tasks[ti].command.as_mut() else {
        return;
    };
    let path =
        store::task_log_dir(&run.run_dir, &name).join(format!("attempt-{}.stdout", c.attempt));
    let Ok(mut file) = std::fs::File::open(&path) else {
        return;
    };
    loop {
        if file.seek(std::io::SeekFrom::Start(c.streamed)).is_err() {
            return;
        }
        let mut chunk = Vec::new();
        if file
            .by_ref()
            .take(STREAM_CHUNK as u64)
            .read_to_end(&mut chunk)
            .is_err()
            || chunk.is_empty()
        {
            return;
        }
        c.streamed += chunk.len() as u64;
        let ev = proto::TaskOutput {
            task: name.clone(),
            stdout: chunk,
        };
        run.watchers.retain(|w| {
            w.send(job_event(proto::job_event::Event::Output(ev.clone())))
                .is_ok()
        });
    }
}

fn progress(run: &RunRt) -> proto::Progress {
    let mut stages = Vec::new();
    for (ti, t) in run.tasks.iter().enumerate() {
        let name = &run.plan.tasks[ti].name;
        match &run.plan.tasks[ti].kind {
            TaskKind::Command(_) | TaskKind::Spark(_) => stages.push(proto::StageProgress {
                task: name.clone(),
                stage: run.plan.tasks[ti].kind_name().into(),
                total: 1,
                done: u64::from(t.state == TState::Succeeded),
                running: u64::from(
                    t.state == TState::Running
                        && t.command.as_ref().is_some_and(|c| c.kill.is_some()),
                ),
                failed_attempts: u64::from(t.failed_attempts),
            }),
            TaskKind::Map { reduce, .. } => {
                let names: &[&str] = if reduce.is_some() {
                    &["map", "reduce"]
                } else {
                    &["map"]
                };
                for (si, sname) in names.iter().enumerate() {
                    let (total, done, running, failed) = match t.stages.get(si) {
                        Some(s) => (
                            s.parts.len() as u64,
                            u64::from(s.done),
                            u64::from(s.running),
                            s.parts.iter().map(|p| u64::from(p.failures)).sum(),
                        ),
                        None => (0, 0, 0, 0),
                    };
                    stages.push(proto::StageProgress {
                        task: name.clone(),
                        stage: (*sname).into(),
                        total,
                        done,
                        running,
                        failed_attempts: failed,
                    });
                }
            }
        }
    }
    proto::Progress {
        run_id: run.id.to_string(),
        elapsed_ms: run.started.elapsed().as_millis() as u64,
        stages,
    }
}

fn summary(run: &RunRt) -> RunSummary {
    let now = Instant::now();
    let tasks = run
        .tasks
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            let planned = &run.plan.tasks[ti];
            let outcome = match t.state {
                TState::Succeeded => TaskOutcome::Succeeded,
                TState::Failed => TaskOutcome::Failed,
                TState::Skipped | TState::Waiting => TaskOutcome::Skipped,
                TState::Cancelled | TState::Running => TaskOutcome::Cancelled,
            };
            let duration = match (t.started, t.ended) {
                (Some(s), Some(e)) => e.duration_since(s),
                (Some(s), None) => now.duration_since(s),
                _ => Duration::ZERO,
            };
            TaskSummary {
                name: planned.name.clone(),
                kind: planned.kind_name().to_string(),
                outcome,
                attempts: t.attempts,
                failed_attempts: t.failed_attempts,
                rerun_attempts: t.rerun_attempts,
                max_attempts: planned.max_attempts,
                map_partitions: t.stages.first().map_or(0, |s| s.parts.len() as u32),
                reduce_partitions: t.stages.get(1).map_or(0, |s| s.parts.len() as u32),
                duration_ms: duration.as_millis() as u64,
                task_time_ms: t.task_time_us / 1000,
                input_bytes: t.input_bytes,
                shuffle_bytes: t.shuffle_bytes,
                output_bytes: t.output_bytes,
                records_in: t.records_in,
                records_out: t.records_out,
                exit_code: t.exit_code,
                output: planned.output_name(),
                output_files: t.output_files,
                stderr_tail: t.stderr_tail.as_ref().map(|s| tail_text(s, SUMMARY_STDERR)),
                error: t.error.clone(),
            }
        })
        .collect();
    RunSummary {
        run_id: run.id.to_string(),
        job: run.name.clone(),
        ok: run.error.is_none(),
        error: run.error.clone(),
        started_at_unix_ms: run.started_unix_ms,
        duration_ms: run.started.elapsed().as_millis() as u64,
        tasks,
    }
}
