//! The two seams, proven from outside `src/`: a provider and an engine
//! defined in this file plug in through the registry and work end to end.
//!
//! This test binary is its own `motorpool`: with `MOTORPOOL_SEAMS_CLI` set it
//! runs the very CLI of the library (`motorpool::cli::main`) with a registry
//! that also holds the test provider (`testcloud`, instance records in a file
//! under `$MOTORPOOL_HOME`) and the test engine (`relay`: a driver that
//! relays each task's command to every worker over TCP and gathers what
//! they print). The local provider starts its agents as this same program,
//! so nodes host the test engine too. Without the variable it runs the
//! tests (no libtest harness: `harness = false` in Cargo.toml), each
//! driving this program as a user drives `motorpool`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use motorpool::engines::{
    DriverAccess, EngineError, EnginePlugin, LogFile, RoleContext, RoleStart, RunBrief,
    RunningRole, Unsupported,
};
use motorpool::registry::Registry;
use motorpool::runtime::client::JobSubmission;
use motorpool::runtime::{Progress, RunSummary, TaskOutcome, TaskSummary};
use motorpool_provider::{
    Capabilities, ConnectEnv, Instance, InstanceState, LaunchRequest, NodeStartup, NodeType, Page,
    Provider, ProviderError, ProviderPlugin, Result as ProviderResult, Retag, SettingProblem,
    TagFilter,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use common::Env;

/// Set in the environment: this program acts as the motorpool CLI.
const AS_CLI: &str = "MOTORPOOL_SEAMS_CLI";

// ---------------------------------------------------------------------------
// The test provider: instance records in one JSON file.

#[derive(Debug, Default, Serialize, Deserialize)]
struct CloudFile {
    next_id: u64,
    instances: BTreeMap<String, Instance>,
    /// Client token -> the ids its launch made.
    tokens: BTreeMap<String, Vec<String>>,
}

struct TestCloud {
    path: PathBuf,
    page_size: usize,
    /// One change at a time in this process (apply runs changes in parallel).
    lock: Mutex<()>,
}

impl TestCloud {
    fn open(home: &std::path::Path, page_size: usize) -> TestCloud {
        TestCloud {
            path: home.join("testcloud.json"),
            page_size: page_size.max(1),
            lock: Mutex::new(()),
        }
    }

    fn with_file<T>(
        &self,
        f: impl FnOnce(&mut CloudFile) -> ProviderResult<T>,
    ) -> ProviderResult<T> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| ProviderError::Internal("the test cloud's lock is poisoned".into()))?;
        let mut file: CloudFile = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Internal(format!("the test cloud file: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CloudFile::default(),
            Err(e) => return Err(ProviderError::Internal(e.to_string())),
        };
        let out = f(&mut file)?;
        let tmp = self.path.with_extension("tmp");
        let bytes =
            serde_json::to_vec(&file).map_err(|e| ProviderError::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| ProviderError::Internal(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| ProviderError::Internal(e.to_string()))?;
        Ok(out)
    }
}

fn test_catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 2, 4.0, 0.01),
        NodeType::new("medium", 4, 8.0, 0.02),
    ]
}

#[async_trait]
impl Provider for TestCloud {
    fn kind(&self) -> &str {
        "testcloud"
    }

    fn catalog(&self) -> &[NodeType] {
        static CATALOG: std::sync::OnceLock<Vec<NodeType>> = std::sync::OnceLock::new();
        CATALOG.get_or_init(test_catalog)
    }

    fn default_image(&self) -> String {
        "testcloud-image-1".into()
    }

    async fn list_page(&self, filter: &TagFilter, token: Option<String>) -> ProviderResult<Page> {
        let start: usize = match token {
            None => 0,
            Some(t) => t
                .parse()
                .map_err(|_| ProviderError::invalid(None, format!("bad page token {t}")))?,
        };
        self.with_file(|file| {
            let matching: Vec<&Instance> = file
                .instances
                .values()
                .filter(|i| filter.iter().all(|(k, v)| i.tag(k) == Some(v.as_str())))
                .collect();
            let end = (start + self.page_size).min(matching.len());
            Ok(Page {
                instances: matching[start.min(end)..end]
                    .iter()
                    .map(|i| (*i).clone())
                    .collect(),
                next_token: (end < matching.len()).then(|| end.to_string()),
            })
        })
    }

    async fn describe(&self, ids: &[String]) -> ProviderResult<Vec<Instance>> {
        self.with_file(|file| {
            Ok(ids
                .iter()
                .filter_map(|id| file.instances.get(id).cloned())
                .collect())
        })
    }

    async fn launch(&self, request: &LaunchRequest) -> ProviderResult<Vec<Instance>> {
        self.with_file(|file| {
            if let Some(ids) = file.tokens.get(&request.client_token) {
                return Ok(ids
                    .iter()
                    .filter_map(|id| file.instances.get(id).cloned())
                    .collect());
            }
            if !test_catalog().iter().any(|t| t.name == request.node_type) {
                return Err(ProviderError::invalid(
                    Some("node_type".into()),
                    format!("no node type {}", request.node_type),
                ));
            }
            let mut made = Vec::new();
            for _ in 0..request.count {
                file.next_id += 1;
                let instance = Instance {
                    id: format!("tc-{:06}", file.next_id),
                    node_type: request.node_type.clone(),
                    image: request
                        .image
                        .clone()
                        .unwrap_or_else(|| "testcloud-image-1".into()),
                    state: InstanceState::Running,
                    tags: request.tags.clone(),
                    address: None,
                    pid: None,
                    ips: Default::default(),
                    launched_at: 0,
                };
                file.instances.insert(instance.id.clone(), instance.clone());
                made.push(instance);
            }
            if !request.client_token.is_empty() {
                file.tokens.insert(
                    request.client_token.clone(),
                    made.iter().map(|i| i.id.clone()).collect(),
                );
            }
            Ok(made)
        })
    }

    async fn terminate(&self, ids: &[String]) -> ProviderResult<()> {
        self.with_file(|file| {
            for id in ids {
                file.instances.remove(id);
            }
            Ok(())
        })
    }

    async fn stop(&self, ids: &[String]) -> ProviderResult<()> {
        self.set_state(ids, InstanceState::Stopped)
    }

    async fn start(&self, ids: &[String]) -> ProviderResult<()> {
        self.set_state(ids, InstanceState::Running)
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> ProviderResult<()> {
        self.with_file(|file| {
            if let Some(id) = ids.iter().find(|id| !file.instances.contains_key(*id)) {
                return Err(ProviderError::NotFound(id.clone()));
            }
            for id in ids {
                if let Some(i) = file.instances.get_mut(id) {
                    for k in &change.remove {
                        i.tags.remove(k);
                    }
                    i.tags.extend(change.set.clone());
                }
            }
            Ok(())
        })
    }
}

impl TestCloud {
    fn set_state(&self, ids: &[String], state: InstanceState) -> ProviderResult<()> {
        self.with_file(|file| {
            for id in ids {
                let i = file
                    .instances
                    .get_mut(id)
                    .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
                i.state = state;
            }
            Ok(())
        })
    }
}

struct TestCloudPlugin;

impl ProviderPlugin for TestCloudPlugin {
    fn kind(&self) -> &'static str {
        "testcloud"
    }

    fn description(&self) -> &'static str {
        "A cloud defined in tests/seams.rs: records in a file, nothing runs on its nodes."
    }

    fn settings_schema(&self) -> Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "page_size": { "type": "integer", "format": "uint32", "minimum": 0 }
            },
            "additionalProperties": false
        })
    }

    fn check_settings(&self, settings: &Value) -> Vec<SettingProblem> {
        match settings.get("page_size").and_then(Value::as_u64) {
            Some(0) => vec![SettingProblem::at(
                &["page_size"],
                "`page_size` must be at least 1",
            )],
            _ => Vec::new(),
        }
    }

    fn catalog(&self) -> Vec<NodeType> {
        test_catalog()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            node_startup: NodeStartup::Simulated,
            user_data_limit: None,
            stop_start: true,
        }
    }

    fn connect(&self, settings: &Value, env: &ConnectEnv) -> ProviderResult<Arc<dyn Provider>> {
        let page_size = settings
            .get("page_size")
            .and_then(Value::as_u64)
            .unwrap_or(2);
        Ok(Arc::new(TestCloud::open(&env.home, page_size as usize)))
    }

    fn connect_from_node(&self, _: &Value, _: &ConnectEnv) -> ProviderResult<Arc<dyn Provider>> {
        Err(ProviderError::invalid(None, "testcloud nodes run nothing"))
    }
}

// ---------------------------------------------------------------------------
// The test engine: a driver that relays each task's command to its workers.

/// A worker's id, what it printed, and its exit code.
type WorkerOutput = (String, String, i32);

/// One message on the relay's wire (a JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Wire {
    /// The first line of every connection.
    Hello {
        credential: String,
    },
    /// A worker joins the driver and then serves its commands.
    Join {
        worker: String,
    },
    /// The driver asks a worker to run a command.
    Command {
        command: String,
    },
    /// A worker's answer.
    Output {
        stdout: String,
        code: i32,
    },
    /// A client submits a job: tasks as (name, command).
    Submit {
        job: String,
        tasks: Vec<(String, String)>,
    },
    /// The driver's answer: per task, what every worker printed.
    Done {
        run_id: String,
        results: Vec<(String, Vec<WorkerOutput>)>,
    },
    /// A client asks for the runs.
    Runs,
    RunList {
        runs: Vec<(String, String)>,
    },
    /// A client asks for a run's logs.
    Logs {
        run_id: String,
    },
    LogList {
        files: Vec<LogFile>,
    },
}

async fn send(stream: &mut (impl AsyncWriteExt + Unpin), message: &Wire) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn receive(reader: &mut (impl AsyncBufReadExt + Unpin)) -> std::io::Result<Option<Wire>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(std::io::Error::other)
}

type WorkerLink = tokio::sync::mpsc::Sender<(String, tokio::sync::oneshot::Sender<(String, i32)>)>;

#[derive(Default)]
struct RelayState {
    workers: Vec<(String, WorkerLink)>,
    running: u32,
    runs: Vec<(String, String)>,
    logs: BTreeMap<String, Vec<LogFile>>,
}

struct RelayRole {
    address: String,
    state: Arc<tokio::sync::Mutex<RelayState>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[async_trait]
impl RunningRole for RelayRole {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn workers(&self) -> Result<Vec<String>, EngineError> {
        let state = self.state.lock().await;
        Ok(state.workers.iter().map(|(id, _)| id.clone()).collect())
    }

    async fn running_jobs(&self) -> Result<u32, EngineError> {
        Ok(self.state.lock().await.running)
    }

    async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

async fn serve_driver_connection(
    stream: TcpStream,
    credential: String,
    state: Arc<tokio::sync::Mutex<RelayState>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    match receive(&mut reader).await? {
        Some(Wire::Hello { credential: c }) if c == credential => {}
        _ => return Ok(()), // refused: no credential, no service
    }
    match receive(&mut reader).await? {
        Some(Wire::Join { worker }) => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(
                String,
                tokio::sync::oneshot::Sender<(String, i32)>,
            )>(8);
            state.lock().await.workers.push((worker, tx));
            while let Some((command, reply)) = rx.recv().await {
                send(&mut write, &Wire::Command { command }).await?;
                match receive(&mut reader).await? {
                    Some(Wire::Output { stdout, code }) => {
                        let _ = reply.send((stdout, code));
                    }
                    _ => return Ok(()),
                }
            }
        }
        Some(Wire::Submit { job, tasks }) => {
            let run_id = format!("relay-{}", fastrand::u32(..));
            let workers: Vec<(String, WorkerLink)> = {
                let mut s = state.lock().await;
                s.running += 1;
                s.runs.push((run_id.clone(), job.clone()));
                s.workers.clone()
            };
            let mut results = Vec::new();
            let mut logs = Vec::new();
            for (task, command) in tasks {
                let mut outputs = Vec::new();
                for (worker, link) in &workers {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = link.send((command.clone(), tx)).await;
                    let (stdout, code) = rx.await.unwrap_or((String::new(), -1));
                    outputs.push((worker.clone(), stdout, code));
                }
                logs.push(LogFile {
                    task: task.clone(),
                    name: "attempt-1.stdout".into(),
                    text: outputs.iter().map(|(_, o, _)| o.as_str()).collect(),
                    truncated: false,
                });
                results.push((task, outputs));
            }
            {
                let mut s = state.lock().await;
                s.running -= 1;
                s.logs.insert(run_id.clone(), logs);
            }
            send(&mut write, &Wire::Done { run_id, results }).await?;
        }
        Some(Wire::Runs) => {
            let runs = state.lock().await.runs.clone();
            send(&mut write, &Wire::RunList { runs }).await?;
        }
        Some(Wire::Logs { run_id }) => {
            let files = state
                .lock()
                .await
                .logs
                .get(&run_id)
                .cloned()
                .unwrap_or_default();
            send(&mut write, &Wire::LogList { files }).await?;
        }
        _ => {}
    }
    Ok(())
}

async fn serve_worker(
    driver_address: String,
    credential: String,
    worker: String,
) -> std::io::Result<()> {
    let stream = TcpStream::connect(&driver_address).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    send(&mut write, &Wire::Hello { credential }).await?;
    send(
        &mut write,
        &Wire::Join {
            worker: worker.clone(),
        },
    )
    .await?;
    while let Some(Wire::Command { command }) = receive(&mut reader).await? {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("RELAY_WORKER", &worker)
            .kill_on_drop(true)
            .output()
            .await?;
        send(
            &mut write,
            &Wire::Output {
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                code: out.status.code().unwrap_or(-1),
            },
        )
        .await?;
    }
    Ok(())
}

/// Connect to a relay driver as a client.
async fn relay_client(
    driver: &DriverAccess,
) -> Result<
    (
        BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    ),
    EngineError,
> {
    let stream = TcpStream::connect(&driver.address)
        .await
        .map_err(|e| EngineError::Unreachable(format!("{}: {e}", driver.address)))?;
    let (read, mut write) = stream.into_split();
    send(
        &mut write,
        &Wire::Hello {
            credential: driver.credential.expose().to_string(),
        },
    )
    .await
    .map_err(|e| EngineError::Unreachable(e.to_string()))?;
    Ok((BufReader::new(read), write))
}

struct RelayEngine;

#[async_trait]
impl EnginePlugin for RelayEngine {
    fn kind(&self) -> &'static str {
        "relay"
    }

    fn description(&self) -> &'static str {
        "A test engine: the driver relays each task's command to every worker."
    }

    fn check_task(&self, task: &motorpool::spec::Task) -> Result<(), Unsupported> {
        if task.command.is_some() {
            Ok(())
        } else {
            Err(Unsupported(
                "the relay engine runs `command` tasks only".into(),
            ))
        }
    }

    async fn start_role(
        &self,
        role: RoleStart,
        context: RoleContext,
    ) -> Result<Arc<dyn RunningRole>, EngineError> {
        let credential = context.credential.expose().to_string();
        match role {
            RoleStart::Driver => {
                let listener =
                    TcpListener::bind(context.listen)
                        .await
                        .map_err(|e| EngineError::Start {
                            role: "driver",
                            reason: e.to_string(),
                        })?;
                let address = listener
                    .local_addr()
                    .map_err(|e| EngineError::Start {
                        role: "driver",
                        reason: e.to_string(),
                    })?
                    .to_string();
                let state = Arc::new(tokio::sync::Mutex::new(RelayState::default()));
                let served = state.clone();
                let accept = tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let (credential, state) = (credential.clone(), served.clone());
                        tokio::spawn(async move {
                            let _ = serve_driver_connection(stream, credential, state).await;
                        });
                    }
                });
                Ok(Arc::new(RelayRole {
                    address,
                    state,
                    tasks: Mutex::new(vec![accept]),
                }))
            }
            RoleStart::Worker { driver_address } => {
                let worker = format!("{}-{}", context.cluster, std::process::id());
                let address = format!("worker-of-{driver_address}");
                let serve = tokio::spawn(async move {
                    if let Err(e) = serve_worker(driver_address, credential, worker).await {
                        eprintln!("relay worker: {e}");
                    }
                });
                Ok(Arc::new(RelayRole {
                    address,
                    state: Arc::default(),
                    tasks: Mutex::new(vec![serve]),
                }))
            }
        }
    }

    async fn run_job(
        &self,
        driver: &DriverAccess,
        submission: JobSubmission,
        _on_progress: &mut (dyn for<'p> FnMut(&'p Progress) + Send),
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        let tasks: Vec<(String, String)> = submission
            .job
            .tasks
            .iter()
            .filter_map(|(name, t)| t.command.clone().map(|c| (name.clone(), c)))
            .collect();
        let (mut reader, mut write) = relay_client(driver).await?;
        send(
            &mut write,
            &Wire::Submit {
                job: submission.name.clone(),
                tasks,
            },
        )
        .await
        .map_err(|e| EngineError::Unreachable(e.to_string()))?;
        let Some(Wire::Done { run_id, results }) = receive(&mut reader)
            .await
            .map_err(|e| EngineError::Unreachable(e.to_string()))?
        else {
            return Err(EngineError::Unreachable(
                "the relay driver refused the job".into(),
            ));
        };
        let tasks: Vec<TaskSummary> = results
            .iter()
            .map(|(name, outputs)| {
                let ok = outputs.iter().all(|(_, _, code)| *code == 0);
                TaskSummary {
                    name: name.clone(),
                    kind: "command".into(),
                    outcome: if ok {
                        TaskOutcome::Succeeded
                    } else {
                        TaskOutcome::Failed
                    },
                    attempts: outputs.len() as u32,
                    failed_attempts: outputs.iter().filter(|(_, _, c)| *c != 0).count() as u32,
                    rerun_attempts: 0,
                    max_attempts: 1,
                    map_partitions: 0,
                    reduce_partitions: 0,
                    duration_ms: started.elapsed().as_millis() as u64,
                    task_time_ms: 0,
                    input_bytes: 0,
                    shuffle_bytes: 0,
                    output_bytes: 0,
                    records_in: 0,
                    records_out: outputs.len() as u64,
                    exit_code: outputs
                        .iter()
                        .map(|(_, _, c)| *c)
                        .find(|c| *c != 0)
                        .or(Some(0)),
                    output: None,
                    output_files: 0,
                    stderr_tail: None,
                    error: None,
                }
            })
            .collect();
        Ok(RunSummary {
            run_id,
            job: submission.name,
            ok: tasks.iter().all(|t| t.outcome == TaskOutcome::Succeeded),
            error: None,
            started_at_unix_ms: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            tasks,
        })
    }

    async fn runs(
        &self,
        driver: &DriverAccess,
        job: Option<&str>,
    ) -> Result<Vec<RunBrief>, EngineError> {
        let (mut reader, mut write) = relay_client(driver).await?;
        send(&mut write, &Wire::Runs)
            .await
            .map_err(|e| EngineError::Unreachable(e.to_string()))?;
        let Some(Wire::RunList { runs }) = receive(&mut reader)
            .await
            .map_err(|e| EngineError::Unreachable(e.to_string()))?
        else {
            return Err(EngineError::Unreachable("no run list".into()));
        };
        Ok(runs
            .into_iter()
            .filter(|(_, j)| job.is_none_or(|want| want == j))
            .map(|(run_id, job)| RunBrief {
                run_id,
                job,
                state: "succeeded".into(),
            })
            .collect())
    }

    async fn cancel_run(&self, _: &DriverAccess, _: &str) -> Result<bool, EngineError> {
        Ok(false)
    }

    async fn logs(&self, driver: &DriverAccess, run_id: &str) -> Result<Vec<LogFile>, EngineError> {
        let (mut reader, mut write) = relay_client(driver).await?;
        send(
            &mut write,
            &Wire::Logs {
                run_id: run_id.to_string(),
            },
        )
        .await
        .map_err(|e| EngineError::Unreachable(e.to_string()))?;
        match receive(&mut reader)
            .await
            .map_err(|e| EngineError::Unreachable(e.to_string()))?
        {
            Some(Wire::LogList { files }) => Ok(files),
            _ => Err(EngineError::Unreachable("no logs".into())),
        }
    }
}

// ---------------------------------------------------------------------------
// The tests.

fn env() -> Env {
    let program = std::env::current_exe().expect("this test binary");
    Env::new().with_program(program).with_var(AS_CLI, "1")
}

fn a_provider_defined_in_a_test_file_passes_the_simulated_lifecycle() {
    let env = env();
    let home = env.home().to_path_buf();
    // Its settings are checked by its own plugin, with positions.
    env.spec("project: tc\nprovider: { kind: testcloud, page_size: 0 }\n");
    let bad = env.mp(&["validate"]).expect_code(1);
    assert!(
        bad.stderr.contains("motorpool.yaml:2:")
            && bad.stderr.contains("`page_size` must be at least 1"),
        "{}",
        bad.stderr
    );
    env.spec("project: tc\nprovider: { kind: testcloud, regoin: x }\n");
    let bad = env.mp(&["validate"]).expect_code(1);
    assert!(
        bad.stderr.contains("unknown field `regoin`"),
        "{}",
        bad.stderr
    );
    common::lifecycle::simulated_provider_lifecycle(
        &env,
        "tclife",
        "{ kind: testcloud, page_size: 3 }",
        &|id| {
            let cloud = TestCloud::open(&home, 3);
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(cloud.terminate(&[id.to_string()]))
                .expect("terminate");
        },
    );
}

fn an_engine_defined_in_a_test_file_runs_a_job_on_a_local_cluster() {
    let env = env();
    env.spec(
        "project: relayed\n\
         clusters:\n  relay: { node_type: small, workers: 2, engine: relay }\n\
         jobs:\n  hello:\n    cluster: relay\n    tasks:\n      greet: { command: 'echo hello from $RELAY_WORKER' }\n",
    );
    env.mp(&["validate"]).expect_code(0);
    let run = env.mp(&["run", "hello", "--output", "json"]).expect_code(0);
    let report = run.json();
    assert_eq!(report["summary"]["ok"], true, "{report:#}");
    let greet = &report["summary"]["tasks"][0];
    assert_eq!(greet["name"], "greet");
    assert_eq!(greet["attempts"], 2, "one per worker: {greet:#}");
    // Both workers ran it, each in its own agent process.
    let record = env.mp(&["logs", "hello"]).expect_code(0);
    let lines: Vec<&str> = record
        .stdout
        .lines()
        .filter(|l| l.starts_with("hello from relay-"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", record.stdout);
    assert_ne!(lines[0], lines[1], "two workers, two processes: {lines:?}");
    // The engine checks the tasks it is given: a map task is not its kind.
    env.spec(
        "project: relayed\n\
         clusters:\n  relay: { node_type: small, workers: 2, engine: relay }\n\
         jobs:\n  count:\n    cluster: relay\n    tasks:\n      wc: { map: { input: 'x.txt', command: cat } }\n",
    );
    let bad = env.mp(&["validate"]).expect_code(1);
    assert!(
        bad.stderr
            .contains("the relay engine runs `command` tasks only"),
        "{}",
        bad.stderr
    );
    // An unknown engine is named with the known ones.
    env.spec("project: relayed\nclusters:\n  relay: { node_type: small, engine: rellay }\n");
    let bad = env.mp(&["validate"]).expect_code(1);
    assert!(
        bad.stderr.contains("unknown engine `rellay`")
            && bad.stderr.contains("did you mean `relay`"),
        "{}",
        bad.stderr
    );
    env.spec(
        "project: relayed\n\
         clusters:\n  relay: { node_type: small, workers: 2, engine: relay }\n",
    );
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert!(
        common::wait_until(Duration::from_secs(5), || env.processes().is_empty()),
        "agents left running: {:?}",
        env.processes()
    );
}

fn main() -> ExitCode {
    let registry = Registry::builtin()
        .with_provider(Arc::new(TestCloudPlugin))
        .with_engine(Arc::new(RelayEngine));
    if registry.install().is_err() {
        eprintln!("the registry was already in use");
        return ExitCode::from(1);
    }
    if std::env::var_os(AS_CLI).is_some() {
        return motorpool::cli::main();
    }
    let tests: [(&str, fn()); 2] = [
        (
            "a_provider_defined_in_a_test_file_passes_the_simulated_lifecycle",
            a_provider_defined_in_a_test_file_passes_the_simulated_lifecycle,
        ),
        (
            "an_engine_defined_in_a_test_file_runs_a_job_on_a_local_cluster",
            an_engine_defined_in_a_test_file_runs_a_job_on_a_local_cluster,
        ),
    ];
    // `cargo test` passes its own flags (e.g. --test-threads); a bare word filters.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let started = Instant::now();
    let (mut passed, mut failed, mut filtered) = (0, 0, 0);
    println!("\nrunning {} tests", tests.len());
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            filtered += 1;
            continue;
        }
        match std::panic::catch_unwind(test) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(101)
    }
}
