//! The runtime end to end: a driver, executors (in this process, or as
//! `motorpool executor` processes that a test can SIGKILL), jobs submitted
//! with `runtime::client::run_job`, outputs compared with a single-process
//! reference.
//!
//! Every process a test starts is killed when the test ends, also when it
//! fails (`ProcessGuard`); in-process drivers and executors stop when their
//! handles drop.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use motorpool::auth::Credential;
use motorpool::runtime::client::{self, JobSubmission};
use motorpool::runtime::driver::{self, DriverConfig, DriverHandle};
use motorpool::runtime::executor::{self, ExecutorConfig, ExecutorHandle};
use motorpool::runtime::{RunSummary, TaskOutcome, proto};
use motorpool::spec::{Job, MapStage, PythonFunction, ReduceStage, Task};

use common::read_part_files;

const SECRET: &str = "runtime-test-credential";

fn credential() -> Credential {
    Credential::new(SECRET)
}

/// A `motorpool executor` process, SIGKILLed on drop.
struct ProcessGuard(Option<Child>);

impl ProcessGuard {
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A driver with executors, in one temporary directory.
struct Cluster {
    dir: tempfile::TempDir,
    driver: Option<DriverHandle>,
    executors: Vec<ExecutorHandle>,
    processes: Vec<ProcessGuard>,
}

impl Cluster {
    async fn start(executors: usize, cores: usize) -> Cluster {
        Self::start_with(executors, cores, |_| {}).await
    }

    async fn start_with(
        executors: usize,
        cores: usize,
        tune: impl FnOnce(&mut DriverConfig),
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("mp-runtime-")
            .tempdir()
            .expect("temp dir");
        let mut config = DriverConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            credential(),
            dir.path().join("driver"),
        );
        config.heartbeat_interval = Duration::from_millis(200);
        config.heartbeat_timeout = Duration::from_secs(2);
        tune(&mut config);
        let driver = driver::serve(config).await.expect("driver starts");
        let mut cluster = Cluster {
            dir,
            driver: Some(driver),
            executors: Vec::new(),
            processes: Vec::new(),
        };
        for i in 0..executors {
            let mut c = ExecutorConfig::new(
                cluster.driver_address(),
                credential(),
                cluster.dir.path().join(format!("exec-{i}")),
            );
            c.cores = cores;
            cluster
                .executors
                .push(executor::serve(c).await.expect("executor starts"));
        }
        cluster.wait_for(executors).await;
        cluster
    }

    fn driver(&self) -> &DriverHandle {
        self.driver.as_ref().expect("driver")
    }

    fn driver_address(&self) -> String {
        self.driver().address().to_string()
    }

    async fn wait_for(&self, n: usize) {
        self.driver()
            .wait_for_executors(n, Duration::from_secs(10))
            .await
            .expect("executors register");
    }

    /// Starts `motorpool executor` as a separate process.
    fn spawn_executor_process(&mut self, cores: usize) {
        let i = self.processes.len();
        let child = Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args([
                "executor",
                "--driver",
                &self.driver_address(),
                "--dir",
                &self
                    .dir
                    .path()
                    .join(format!("proc-{i}"))
                    .display()
                    .to_string(),
                "--cores",
                &cores.to_string(),
            ])
            .env("MOTORPOOL_CREDENTIAL", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn motorpool executor");
        self.processes.push(ProcessGuard(Some(child)));
    }

    async fn shutdown(mut self) {
        for e in self.executors.drain(..) {
            let _ = e.shutdown().await;
        }
        for p in &mut self.processes {
            p.kill9();
        }
        if let Some(d) = self.driver.take() {
            let _ = d.shutdown().await;
        }
    }
}

/// A job directory: the wordcount scripts plus generated text in `data/`.
fn job_dir(lines: usize, files: usize, seed: u64) -> (tempfile::TempDir, BTreeMap<String, u64>) {
    let dir = tempfile::Builder::new()
        .prefix("mp-job-")
        .tempdir()
        .expect("temp dir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/jobs/wordcount");
    std::fs::copy(src.join("wc.py"), dir.path().join("wc.py")).expect("copy wc.py");
    std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    let mut reference = BTreeMap::new();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let syllables = ["ka", "lo", "mi", "zu", "re", "pan", "do", "ti", "vo", "sel"];
    for f in 0..files {
        let mut text = String::new();
        for _ in 0..lines / files {
            let words = 1 + next() % 14;
            for w in 0..words {
                // Zipf-ish: small ranks are common.
                let rank = next() % (1 + next() % 700);
                let mut word = String::new();
                let mut r = rank;
                loop {
                    word.push_str(syllables[r % syllables.len()]);
                    r /= syllables.len();
                    if r == 0 {
                        break;
                    }
                }
                if w > 0 {
                    text.push(if next() % 9 == 0 { '\t' } else { ' ' });
                }
                *reference.entry(word.clone()).or_insert(0) += 1;
                text.push_str(&word);
            }
            text.push('\n');
        }
        // One file without a final newline: its last line must still count.
        if f == files - 1 && text.ends_with('\n') {
            text.pop();
        }
        std::fs::write(dir.path().join(format!("data/part{f}.txt")), text).expect("write data");
    }
    (dir, reference)
}

fn streaming_job(map_partitions: u32, reduce_partitions: u32, mapper: &str) -> Job {
    let mut job = Job::default();
    job.tasks.insert(
        "count".into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                command: Some(mapper.into()),
                partitions: Some(map_partitions),
                ..MapStage::default()
            }),
            reduce: Some(ReduceStage {
                partitions: Some(reduce_partitions),
                command: Some("python3 wc.py reduce".into()),
                ..ReduceStage::default()
            }),
            output: Some("out/wordcount".into()),
            ..Task::default()
        },
    );
    job
}

async fn run(
    cluster: &Cluster,
    name: &str,
    job: Job,
    base: &Path,
    on_progress: impl FnMut(&motorpool::runtime::Progress),
) -> RunSummary {
    client::run_job(
        &cluster.driver_address(),
        &credential(),
        JobSubmission {
            name: name.into(),
            job,
            base_dir: base.to_path_buf(),
            env: BTreeMap::new(),
            exclude: Vec::new(),
        },
        on_progress,
    )
    .await
    .expect("the run is carried out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wordcount_streaming_equals_the_reference() {
    let cluster = Cluster::start(2, 2).await;
    // Partitions of ~150 KB: read from the driver (ReadInput), not inlined.
    let (base, reference) = job_dir(20000, 3, 1);
    // Stale output of an earlier run must not survive.
    std::fs::create_dir_all(base.path().join("out/wordcount")).expect("mkdir");
    std::fs::write(base.path().join("out/wordcount/part-00099"), "stale\t1\n").expect("write");
    let mut progress_seen = 0;
    let summary = run(
        &cluster,
        "wordcount",
        streaming_job(5, 3, "python3 wc.py map"),
        base.path(),
        |_| progress_seen += 1,
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    let t = summary.task("count").expect("task");
    assert_eq!(t.outcome, TaskOutcome::Succeeded);
    assert_eq!((t.map_partitions, t.reduce_partitions), (5, 3));
    assert_eq!(t.attempts, 8, "5 maps + 3 reduces, nothing retried");
    assert_eq!(t.output_files, 3);
    assert!(t.shuffle_bytes > 0 && t.input_bytes > 0, "{t:?}");
    assert!(progress_seen > 0);
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    // The summary serializes for `motorpool run --output json`.
    let json = serde_json::to_value(&summary).expect("json");
    assert_eq!(json["tasks"][0]["name"], "count");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wordcount_python_functions_equal_the_reference() {
    let cluster = Cluster::start(2, 2).await;
    // Small partitions: they travel inside their task messages.
    let (base, reference) = job_dir(6000, 2, 2);
    let f = |function: &str| PythonFunction {
        file: "wc.py".into(),
        function: function.into(),
    };
    let mut job = Job::default();
    job.tasks.insert(
        "count".into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                python: Some(f("tokenize")),
                partitions: Some(6),
                ..MapStage::default()
            }),
            reduce: Some(ReduceStage {
                partitions: Some(4),
                python: Some(f("add")),
                ..ReduceStage::default()
            }),
            output: Some("out/wordcount".into()),
            ..Task::default()
        },
    );
    let summary = run(&cluster, "wordcount-py", job.clone(), base.path(), |_| {}).await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    let t = summary.task("count").expect("task");
    // The combiner ran map-side: far fewer records crossed the shuffle than words.
    let words: u64 = reference.values().sum();
    assert!(t.records_out < words, "{t:?}");
    // A second run reuses the bundle and the (per-run) workers; same answer.
    let again = run(&cluster, "wordcount-py", job, base.path(), |_| {}).await;
    assert!(again.ok, "{again:#?}");
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_executor_does_not_change_the_result() {
    let mut cluster = Cluster::start(0, 1).await;
    for _ in 0..3 {
        cluster.spawn_executor_process(1);
    }
    cluster.wait_for(3).await;
    let (base, reference) = job_dir(8000, 4, 3);
    let mut killed = false;
    let mut victim = cluster.processes.remove(0);
    let summary = run(
        &cluster,
        "wordcount",
        streaming_job(9, 3, "python3 wc.py map --sleep 0.3"),
        base.path(),
        |p| {
            let map = p.stages.iter().find(|s| s.stage == "map");
            // Once map output sits on the executors, one of them dies.
            if !killed && map.is_some_and(|m| m.done >= 4) {
                victim.kill9();
                killed = true;
            }
        },
    )
    .await;
    assert!(killed, "the run ended before the executor could be killed");
    assert!(summary.ok, "{summary:#?}");
    let t = summary.task("count").expect("task");
    assert!(t.rerun_attempts > 0, "lost work ran again: {t:?}");
    assert_eq!(t.failed_attempts, 0, "a lost executor uses no retry: {t:?}");
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    let left = cluster.driver().executors().await.expect("status");
    assert_eq!(left.len(), 2, "the killed executor is gone: {left:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_executor_is_dropped_and_comes_back() {
    let mut cluster = Cluster::start(0, 1).await;
    cluster.spawn_executor_process(1);
    cluster.wait_for(1).await;
    let pid = cluster.processes[0]
        .0
        .as_ref()
        .map(|c| c.id())
        .expect("pid")
        .to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // Stopped, it sends no heartbeats: within the timeout (2 s here) it is lost.
    signal("-STOP");
    let started = Instant::now();
    loop {
        let n = cluster.driver().executors().await.expect("status").len();
        if n == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "still registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Resumed, it registers again as a new executor.
    signal("-CONT");
    cluster.wait_for(1).await;
    let now = cluster.driver().executors().await.expect("status");
    assert_ne!(now[0].executor_id, "exec-1", "{now:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_task_fails_the_job_after_retries_plus_one_attempts() {
    let cluster = Cluster::start(1, 2).await;
    let (base, _) = job_dir(100, 1, 4);
    let mut job = Job {
        retries: 2,
        ..Job::default()
    };
    job.tasks.insert(
        "flaky".into(),
        Task {
            command: Some(
                "echo \"boom on attempt $MOTORPOOL_ATTEMPT\" >&2; echo out; exit 3".into(),
            ),
            ..Task::default()
        },
    );
    job.tasks.insert(
        "after".into(),
        Task {
            command: Some("true".into()),
            depends_on: vec!["flaky".into()],
            ..Task::default()
        },
    );
    let summary = run(&cluster, "failing", job, base.path(), |_| {}).await;
    assert!(!summary.ok);
    let t = summary.task("flaky").expect("task");
    assert_eq!(t.outcome, TaskOutcome::Failed);
    assert_eq!((t.attempts, t.failed_attempts, t.max_attempts), (3, 3, 3));
    assert_eq!(t.exit_code, Some(3));
    let tail = t.stderr_tail.as_deref().unwrap_or_default();
    assert!(tail.contains("boom on attempt 3"), "{tail:?}");
    let error = summary.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("flaky") && error.contains("boom on attempt 3"),
        "{error}"
    );
    assert_eq!(
        summary.task("after").expect("after").outcome,
        TaskOutcome::Skipped
    );

    // Every attempt's stdout/stderr is kept for `motorpool logs`.
    let logs = client::fetch_logs(
        &cluster.driver_address(),
        &credential(),
        None,
        Some("failing"),
        None,
    )
    .await
    .expect("logs");
    assert_eq!(logs.run_id, summary.run_id);
    let names: Vec<&str> = logs.files.iter().map(|f| f.name.as_str()).collect();
    assert!(
        names.contains(&"attempt-3.stderr") && names.contains(&"attempt-1.stdout"),
        "{names:?}"
    );

    // A map partition that always fails: its own `retries` (1) wins over the job's.
    let mut job = Job {
        retries: 5,
        ..Job::default()
    };
    job.tasks.insert(
        "badmap".into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                command: Some("echo \"mapper broke\" >&2; exit 1".into()),
                partitions: Some(1),
                ..MapStage::default()
            }),
            retries: Some(1),
            ..Task::default()
        },
    );
    let summary = run(&cluster, "badmap", job, base.path(), |_| {}).await;
    assert!(!summary.ok);
    let t = summary.task("badmap").expect("task");
    assert_eq!((t.attempts, t.failed_attempts), (2, 2), "{t:?}");
    assert!(
        t.stderr_tail
            .as_deref()
            .unwrap_or_default()
            .contains("mapper broke")
    );

    // A Python function that raises: the traceback is the stderr.
    let mut job = Job::default();
    std::fs::write(
        base.path().join("bad.py"),
        "def f(line):\n    raise ValueError('no good: ' + line[:3])\n",
    )
    .expect("write");
    job.tasks.insert(
        "pyfail".into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                python: Some(PythonFunction {
                    file: "bad.py".into(),
                    function: "f".into(),
                }),
                partitions: Some(1),
                ..MapStage::default()
            }),
            ..Task::default()
        },
    );
    let summary = run(&cluster, "pyfail", job, base.path(), |_| {}).await;
    let t = summary.task("pyfail").expect("task");
    assert_eq!((t.attempts, t.failed_attempts), (1, 1), "{t:?}");
    let tail = t.stderr_tail.as_deref().unwrap_or_default();
    assert!(tail.contains("ValueError: no good"), "{tail}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_without_the_credential_are_refused() {
    let cluster = Cluster::start(1, 1).await;
    let exec_addr = cluster.executors[0].address().to_string();
    let channel = |addr: String| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    };
    // No credential at all.
    let mut d = proto::driver_client::DriverClient::new(channel(cluster.driver_address()).await);
    let err = d
        .cluster_status(proto::ClusterStatusRequest {})
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = d
        .register_executor(proto::RegisterExecutorRequest {
            address: "127.0.0.1:1".into(),
            cores: 1,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut e = proto::executor_client::ExecutorClient::new(channel(exec_addr.clone()).await);
    let err = e
        .fetch_shuffle(proto::FetchShuffleRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // A wrong credential.
    let wrong =
        motorpool::runtime::connect_driver(&cluster.driver_address(), &Credential::new("nope"))
            .await
            .expect("connect");
    let err = wrong
        .clone()
        .cluster_status(proto::ClusterStatusRequest {})
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let wrong_exec = motorpool::runtime::connect_executor(&exec_addr, &Credential::new("nope"))
        .await
        .expect("connect");
    let err = wrong_exec
        .clone()
        .executor_info(proto::ExecutorInfoRequest {})
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // The right one.
    let mut right = motorpool::runtime::connect_driver(&cluster.driver_address(), &credential())
        .await
        .expect("connect");
    let status = right
        .cluster_status(proto::ClusterStatusRequest {})
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(status.executors.len(), 1);
    let mut right_exec = motorpool::runtime::connect_executor(&exec_addr, &credential())
        .await
        .expect("connect");
    right_exec
        .executor_info(proto::ExecutorInfoRequest {})
        .await
        .expect("accepted");
    // An executor process without the credential cannot even start.
    let out = Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["executor", "--driver", &cluster.driver_address(), "--dir"])
        .arg(cluster.dir.path().join("nocred"))
        .env_remove("MOTORPOOL_CREDENTIAL")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MOTORPOOL_CREDENTIAL"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_run_in_depends_on_order() {
    let cluster = Cluster::start(2, 1).await;
    let (base, reference) = job_dir(2000, 1, 5);
    let mut job = Job::default();
    // `gen` makes the input the map reads (it exists only on the driver).
    job.tasks.insert(
        "gen".into(),
        Task {
            command: Some("mkdir -p generated && cp data/part0.txt generated/copy.txt".into()),
            ..Task::default()
        },
    );
    let mut count = streaming_job(3, 2, "python3 wc.py map")
        .tasks
        .remove("count")
        .expect("count");
    if let Some(m) = count.map.as_mut() {
        m.input = "generated/*.txt".into();
    }
    count.depends_on = vec!["gen".into()];
    job.tasks.insert("count".into(), count);
    // `check` runs after the map/reduce and sees its output.
    job.tasks.insert(
        "check".into(),
        Task {
            command: Some("cat out/wordcount/part-* | wc -l".into()),
            depends_on: vec!["count".into()],
            ..Task::default()
        },
    );
    let summary = run(&cluster, "dag", job, base.path(), |_| {}).await;
    assert!(summary.ok, "{summary:#?}");
    let order: Vec<&str> = summary.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(order, ["gen", "count", "check"]);
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    let logs = client::fetch_logs(
        &cluster.driver_address(),
        &credential(),
        Some(&summary.run_id),
        None,
        Some("check"),
    )
    .await
    .expect("logs");
    let stdout = logs
        .files
        .iter()
        .find(|f| f.name == "attempt-1.stdout")
        .expect("check's stdout");
    assert_eq!(stdout.text.trim(), reference.len().to_string());
    // The driver's history lists the run.
    let runs = client::list_runs(&cluster.driver_address(), &credential(), Some("dag"))
        .await
        .expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, "succeeded");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_tasks_are_batched_and_timeouts_hold() {
    let cluster = Cluster::start_with(1, 2, |c| c.minute = Duration::from_millis(300)).await;
    let base = tempfile::tempdir().expect("tmp");
    std::fs::write(base.path().join("empty.txt"), "").expect("write");
    let mut job = Job::default();
    job.tasks.insert(
        "noop".into(),
        Task {
            map: Some(MapStage {
                input: "empty.txt".into(),
                command: Some("cat".into()),
                partitions: Some(20_000),
                ..MapStage::default()
            }),
            ..Task::default()
        },
    );
    let started = Instant::now();
    let summary = run(&cluster, "noop", job, base.path(), |_| {}).await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(summary.task("noop").expect("noop").attempts, 20_000);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // A task over its timeout (1 "minute" = 300 ms here) is stopped.
    let mut job = Job::default();
    job.tasks.insert(
        "slow".into(),
        Task {
            command: Some("sleep 30".into()),
            timeout_minutes: Some(1),
            ..Task::default()
        },
    );
    let started = Instant::now();
    let summary = run(&cluster, "slow", job, base.path(), |_| {}).await;
    assert!(!summary.ok);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        summary
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out"),
        "{summary:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_jobs_get_clear_errors() {
    let cluster = Cluster::start(1, 1).await;
    let base = tempfile::tempdir().expect("tmp");
    let mut job = Job::default();
    job.tasks.insert(
        "m".into(),
        Task {
            map: Some(MapStage {
                input: "../outside/*.txt".into(),
                command: Some("cat".into()),
                ..MapStage::default()
            }),
            depends_on: vec!["ghost".into()],
            ..Task::default()
        },
    );
    let err = client::run_job(
        &cluster.driver_address(),
        &credential(),
        JobSubmission {
            name: "bad".into(),
            job,
            base_dir: base.path().to_path_buf(),
            env: BTreeMap::new(),
            exclude: Vec::new(),
        },
        |_| {},
    )
    .await
    .expect_err("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("..") && msg.contains("ghost"), "{msg}");

    // Input that matches nothing fails the task with a clear message.
    let mut job = Job::default();
    job.tasks.insert(
        "m".into(),
        Task {
            map: Some(MapStage {
                input: "nothing/*.txt".into(),
                command: Some("cat".into()),
                ..MapStage::default()
            }),
            ..Task::default()
        },
    );
    let summary = run(&cluster, "empty", job, base.path(), |_| {}).await;
    assert!(!summary.ok);
    assert!(
        summary
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("matches no file"),
        "{summary:?}"
    );
    cluster.shutdown().await;
}
