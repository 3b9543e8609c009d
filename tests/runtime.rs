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
        Self::start_full(executors, cores, tune, true).await
    }

    /// Executors that read map input from the driver (ReadInput), as on
    /// machines that do not share the driver's disk.
    async fn start_remote(executors: usize, cores: usize) -> Cluster {
        Self::start_full(executors, cores, |_| {}, false).await
    }

    async fn start_full(
        executors: usize,
        cores: usize,
        tune: impl FnOnce(&mut DriverConfig),
        read_in_place: bool,
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
            c.read_in_place = read_in_place;
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
    let cluster = Cluster::start_remote(2, 2).await;
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

/// A job of one task `name`: a per-record Python map and a Python reduce,
/// both from `file`, over `data/*.txt` in `partitions` (map, reduce).
fn python_job(
    name: &str,
    (file, map, reduce): (&str, &str, &str),
    (map_partitions, reduce_partitions): (u32, u32),
    output: &str,
) -> Job {
    let f = |function: &str| PythonFunction {
        file: file.into(),
        function: function.into(),
        per: None,
    };
    let mut job = Job::default();
    job.tasks.insert(
        name.into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                python: Some(f(map)),
                partitions: Some(map_partitions),
                ..MapStage::default()
            }),
            reduce: Some(ReduceStage {
                partitions: Some(reduce_partitions),
                python: Some(f(reduce)),
                ..ReduceStage::default()
            }),
            output: Some(output.into()),
            ..Task::default()
        },
    );
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wordcount_python_functions_equal_the_reference() {
    let cluster = Cluster::start(2, 2).await;
    // Small partitions: they travel inside their task messages.
    let (base, reference) = job_dir(6000, 2, 2);
    let job = python_job(
        "count",
        ("wc.py", "tokenize", "add"),
        (6, 4),
        "out/wordcount",
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

/// A Python map and reduce whose keys and values are of every JSON kind,
/// with the characters JSON escapes; and one process running the same
/// functions, printing lines as the reduce output does.
const KINDS_PY: &str = r#"
import json
import sys


def pairs(line):
    for word in line.split():
        yield word, 1
        yield ("len", len(word)), 0.5
        yield 'q"' + word[:2], -1
        yield "b\\" + word[:1], [word[:1]]
        yield "\u00e9\t" + word[:1], {"n": 1}
        yield len(word), "x\ty"


def merge(a, b):
    if isinstance(a, dict):
        return {"n": a["n"] + b["n"]}
    if isinstance(a, list):
        return sorted(set(a + b))
    if isinstance(a, str):
        return max(a, b)
    return a + b


if __name__ == "__main__":
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    acc = {}
    for path in sys.argv[1:]:
        with open(path) as f:
            for line in f.read().splitlines():
                for k, v in pairs(line):
                    k = list(k) if isinstance(k, tuple) else k
                    key = dumps(k)
                    acc[key] = (k, merge(acc[key][1], v)) if key in acc else (k, v)
    for k, v in acc.values():
        plain_key = isinstance(k, str) and not any(c in k for c in "\t\n\r")
        plain_value = type(v) is int or (isinstance(v, str) and not any(c in v for c in "\n\r"))
        print((k if plain_key else dumps(k)) + "\t" + (str(v) if plain_value else dumps(v)))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_keys_and_values_of_every_json_kind_cross_the_shuffle_intact() {
    let cluster = Cluster::start(2, 2).await;
    let (base, _) = job_dir(3000, 2, 5);
    std::fs::write(base.path().join("kinds.py"), KINDS_PY).expect("write kinds.py");
    let job = python_job("kinds", ("kinds.py", "pairs", "merge"), (4, 3), "out/kinds");
    let summary = run(&cluster, "kinds", job, base.path(), |_| {}).await;
    assert!(summary.ok, "{summary:#?}");
    let mut got: Vec<String> = (0..3)
        .flat_map(|i| {
            let part = base.path().join(format!("out/kinds/part-{i:05}"));
            std::fs::read_to_string(&part)
                .unwrap_or_else(|e| panic!("{}: {e}", part.display()))
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    got.sort();
    let one_process = Command::new("python3")
        .arg("kinds.py")
        .args(["data/part0.txt", "data/part1.txt"])
        .current_dir(base.path())
        .output()
        .expect("python3 runs");
    assert!(one_process.status.success(), "{one_process:?}");
    let mut want: Vec<String> = String::from_utf8_lossy(&one_process.stdout)
        .lines()
        .map(String::from)
        .collect();
    want.sort();
    // Every kind made it: a tuple key as a JSON list, an escaped key, a float sum.
    for needle in [
        r#"["len",4]"#,
        "q\"ka\t-",
        "b\\k\t[\"k\"]",
        r#""\u00e9\tk""#,
        "4\tx\ty",
    ] {
        assert!(
            want.iter().any(|l| l.starts_with(needle)),
            "{needle} not in {want:?}"
        );
    }
    assert_eq!(got, want);
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
                    per: None,
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

/// Partition functions for the tests: a `Counter` over the whole partition
/// (a mapping), a generator of pairs, one that reads a single record, and
/// one that raises half way.
const PARTITION_PY: &str = r#"
from collections import Counter


def count(lines):
    counts = Counter()
    for line in lines:
        counts.update(line.split())
    return counts


def pairs(lines):
    for line in lines:
        for word in line.split():
            yield word, 1


def first_only(lines):
    for line in lines:
        return {"first": 1}
    return {}


def boom(lines):
    for i, line in enumerate(lines):
        if i == 10:
            raise ValueError("no more lines for me")
    return {}
"#;

fn partition_job(function: &str, reduce: bool, output: &str) -> Job {
    let mut job = Job::default();
    job.tasks.insert(
        "count".into(),
        Task {
            map: Some(MapStage {
                input: "data/*.txt".into(),
                python: Some(PythonFunction {
                    file: "part.py".into(),
                    function: function.into(),
                    per: Some(motorpool::spec::PythonPer::Partition),
                }),
                partitions: Some(4),
                ..MapStage::default()
            }),
            reduce: reduce.then(|| ReduceStage {
                partitions: Some(3),
                python: Some(PythonFunction {
                    file: "wc.py".into(),
                    function: "add".into(),
                    per: None,
                }),
                ..ReduceStage::default()
            }),
            output: Some(output.into()),
            retries: Some(0),
            ..Task::default()
        },
    );
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_functions_count_what_one_process_counts() {
    let cluster = Cluster::start(2, 2).await;
    // Partitions of ~150 KB: read by the executors where they lie.
    let (base, reference) = job_dir(20000, 3, 11);
    std::fs::write(base.path().join("part.py"), PARTITION_PY).expect("write part.py");
    let lines: u64 = (0..3)
        .map(|f| {
            let text = std::fs::read_to_string(base.path().join(format!("data/part{f}.txt")))
                .expect("read");
            text.lines().count() as u64
        })
        .sum();

    // A mapping per partition (Counter), reduced by `add`.
    let summary = run(
        &cluster,
        "wc-part",
        partition_job("count", true, "out/count"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(read_part_files(&base.path().join("out/count")), reference);
    let t = summary.task("count").expect("task");
    assert_eq!((t.map_partitions, t.reduce_partitions), (4, 3));
    // Every line went in once (records of the maps + records of the reduces).
    assert!(t.records_in > lines, "{t:?}");
    // One record per distinct word and map partition at most crossed the shuffle.
    assert!(t.records_out <= reference.len() as u64 * 4, "{t:?}");

    // (key, value) pairs from a generator: combined map-side with `add`.
    let summary = run(
        &cluster,
        "wc-pairs",
        partition_job("pairs", true, "out/pairs"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(read_part_files(&base.path().join("out/pairs")), reference);

    // Map-only: each partition's mapping is its part file; together they
    // count every word once.
    let summary = run(
        &cluster,
        "wc-maponly",
        partition_job("count", false, "out/maponly"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    let mut summed: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..4 {
        let text = std::fs::read_to_string(base.path().join(format!("out/maponly/part-{i:05}")))
            .expect("part file");
        for line in text.lines() {
            let (w, c) = line.split_once('\t').expect("key<TAB>value");
            *summed.entry(w.to_string()).or_default() += c.parse::<u64>().expect("count");
        }
    }
    assert_eq!(summed, reference);

    // A function that stops reading early leaves its worker in step.
    let summary = run(
        &cluster,
        "wc-first",
        partition_job("first_only", true, "out/first"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(
        read_part_files(&base.path().join("out/first")),
        BTreeMap::from([("first".to_string(), 4)])
    );

    // An exception fails the task with its message and traceback.
    let summary = run(
        &cluster,
        "wc-boom",
        partition_job("boom", true, "out/boom"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(!summary.ok);
    let t = summary.task("count").expect("task");
    let said = format!("{:?} {:?}", summary.error, t);
    assert!(said.contains("no more lines for me"), "{said}");

    // ... and the workers still count right afterwards.
    let summary = run(
        &cluster,
        "wc-part",
        partition_job("count", true, "out/count"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(read_part_files(&base.path().join("out/count")), reference);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_functions_are_checked() {
    // In a spec: file:line:col, like every other spec problem.
    let load = |a_per: &str| {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = format!(
            "\
project: p
jobs:
  words:
    new_cluster: {{ node_type: small }}
    tasks:
      a: {{ map: {{ input: x.txt, python: {{ file: p.py, function: f, per: {a_per} }} }} }}
      b: {{ map: {{ input: x.txt, python: {{ file: p.py, function: f, per: partition }} }}, reduce: {{ python: {{ file: p.py, function: g, per: partition }} }} }}
"
        );
        std::fs::write(dir.path().join("motorpool.yaml"), spec).expect("write spec");
        match motorpool::spec::load(dir.path(), &motorpool::spec::LoadOptions::default()) {
            Ok(_) => panic!("a spec with `per: {a_per}` loaded"),
            Err(diagnostics) => diagnostics.to_string(),
        }
    };
    let err = load("chunk");
    assert!(
        err.contains(
            "motorpool.yaml:6:73: error: unknown value `chunk` for `map.python.per` in task `a` \
             of job `words`, expected one of: record, partition"
        ),
        "{err}"
    );
    let err = load("partition");
    assert!(
        err.contains(
            "motorpool.yaml:7:133: error: `per` in the python of the reduce of task `b` of job \
             `words`: a reduce function folds two values"
        ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A job that skipped the spec check is refused by the runtime too.
    let cluster = Cluster::start(1, 1).await;
    let (base, _) = job_dir(100, 1, 3);
    let mut job = partition_job("count", true, "out/x");
    if let Some(r) = job
        .tasks
        .get_mut("count")
        .and_then(|t| t.reduce.as_mut())
        .and_then(|r| r.python.as_mut())
    {
        r.per = Some(motorpool::spec::PythonPer::Partition);
    }
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
    assert!(msg.contains("`python.per` of the reduce"), "{msg}");
    cluster.shutdown().await;
}

/// A newer submitter's messages: today's fields plus ones this driver has
/// never heard of (field numbers 90+), at every level of the job.
mod future {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubmitJobRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "3")]
        pub bundle_id: String,
        #[prost(message, repeated, tag = "5")]
        pub inputs: Vec<InputFile>,
        #[prost(message, optional, tag = "7")]
        pub job: Option<JobDef>,
        #[prost(string, tag = "90")]
        pub priority_class: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InputFile {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(uint64, tag = "2")]
        pub size: u64,
        #[prost(string, tag = "91")]
        pub checksum: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JobDef {
        #[prost(message, repeated, tag = "4")]
        pub tasks: Vec<TaskDef>,
        #[prost(string, repeated, tag = "5")]
        pub requires: Vec<String>,
        #[prost(uint32, tag = "92")]
        pub max_parallel_tasks: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskDef {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "6")]
        pub map: Option<MapDef>,
        #[prost(message, optional, tag = "7")]
        pub reduce: Option<ReduceDef>,
        #[prost(string, optional, tag = "8")]
        pub output: Option<String>,
        #[prost(string, tag = "93")]
        pub description: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MapDef {
        #[prost(string, tag = "1")]
        pub input: String,
        #[prost(string, optional, tag = "2")]
        pub command: Option<String>,
        #[prost(uint32, optional, tag = "4")]
        pub partitions: Option<u32>,
        #[prost(bool, tag = "94")]
        pub speculative: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReduceDef {
        #[prost(uint32, optional, tag = "1")]
        pub partitions: Option<u32>,
        #[prost(string, optional, tag = "2")]
        pub command: Option<String>,
    }
}

/// Calls SubmitJob with a message of the submitter's choosing (the
/// driver's own decoder reads it, as it would from a newer motorpool).
async fn submit_raw(
    cluster: &Cluster,
    request: future::SubmitJobRequest,
) -> Result<proto::SubmitJobResponse, tonic::Status> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.driver_address()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut req = tonic::Request::new(request);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {SECRET}").parse().expect("header"),
    );
    let codec =
        tonic_prost::ProstCodec::<future::SubmitJobRequest, proto::SubmitJobResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/motorpool.runtime.v1.Driver/SubmitJob",
    );
    grpc.unary(req, path, codec).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_travel_as_protobuf_and_newer_fields_do_not_break_the_driver() {
    let cluster = Cluster::start(2, 1).await;
    let (base, reference) = job_dir(3000, 2, 21);
    let bundle = motorpool::runtime::bundle::build(
        base.path(),
        &motorpool::runtime::bundle::Exclude {
            files: Default::default(),
            dirs: vec!["data".into()],
            patterns: Vec::new(),
        },
    )
    .expect("bundle");
    let mut driver = motorpool::runtime::connect_driver(&cluster.driver_address(), &credential())
        .await
        .expect("connect");
    let mut first = proto::BundleChunk {
        bundle_id: bundle.id.clone(),
        total_size: bundle.bytes.len() as u64,
        data: bundle.bytes.clone(),
    };
    if first.data.len() > motorpool::runtime::CHUNK {
        first.data.truncate(0);
    }
    assert!(!first.data.is_empty(), "a small bundle for this test");
    driver
        .put_bundle(tokio_stream::iter(vec![first]))
        .await
        .expect("bundle uploaded");

    let inputs: Vec<future::InputFile> = (0..2)
        .map(|f| {
            let path = format!("data/part{f}.txt");
            let size = std::fs::metadata(base.path().join(&path))
                .expect("stat")
                .len();
            future::InputFile {
                path,
                size,
                checksum: "sha256:from-the-future".into(),
            }
        })
        .collect();
    let job = |requires: Vec<String>| future::JobDef {
        tasks: vec![future::TaskDef {
            name: "count".into(),
            map: Some(future::MapDef {
                input: "data/*.txt".into(),
                command: Some("python3 wc.py map".into()),
                partitions: Some(3),
                speculative: true,
            }),
            reduce: Some(future::ReduceDef {
                partitions: Some(2),
                command: Some("python3 wc.py reduce".into()),
            }),
            output: Some("out/wc".into()),
            description: "counts words, and says so".into(),
        }],
        requires,
        max_parallel_tasks: 7,
    };

    // A field that changes what the job means is named in `requires`: a
    // driver that does not know it refuses, rather than run something else.
    let refused = submit_raw(
        &cluster,
        future::SubmitJobRequest {
            name: "future".into(),
            bundle_id: bundle.id.clone(),
            inputs: inputs.clone(),
            job: Some(job(vec![
                "python-per-partition".into(),
                "time-travel".into(),
            ])),
            priority_class: "gold".into(),
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("`time-travel`")
            && !refused.message().contains("python-per-partition")
            && refused.message().contains("newer runtime"),
        "{}",
        refused.message()
    );

    // Fields the driver does not know, at every level, are ignored: it runs.
    let run_id = submit_raw(
        &cluster,
        future::SubmitJobRequest {
            name: "future".into(),
            bundle_id: bundle.id.clone(),
            inputs: inputs.clone(),
            job: Some(job(Vec::new())),
            priority_class: "gold".into(),
        },
    )
    .await
    .expect("a newer job is accepted")
    .run_id;
    // No `local` identity was sent: the driver waits for the upload.
    let mut chunks = Vec::new();
    for f in &inputs {
        chunks.push(proto::InputChunk {
            run_id: run_id.clone(),
            path: f.path.clone(),
            offset: 0,
            data: std::fs::read(base.path().join(&f.path)).expect("read"),
        });
    }
    driver
        .upload_input(tokio_stream::iter(chunks))
        .await
        .expect("inputs uploaded");
    let mut events = driver
        .watch_job(proto::WatchJobRequest {
            run_id: run_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let finished = loop {
        match events.message().await.expect("events") {
            Some(proto::JobEvent {
                event: Some(proto::job_event::Event::Finished(f)),
            }) => break f,
            Some(_) => continue,
            None => panic!("the run ended without a finish"),
        }
    };
    assert!(finished.ok, "{finished:?}");
    let mut out = driver
        .fetch_output(proto::FetchOutputRequest {
            run_id,
            task: "count".into(),
        })
        .await
        .expect("fetch")
        .into_inner();
    let mut counts = BTreeMap::new();
    let mut text = String::new();
    while let Some(chunk) = out.message().await.expect("chunk") {
        text.push_str(std::str::from_utf8(&chunk.data).expect("utf-8"));
    }
    for line in text.lines() {
        let (w, c) = line.split_once('\t').expect("key<TAB>value");
        counts.insert(w.to_string(), c.parse::<u64>().expect("count"));
    }
    assert_eq!(counts, reference);

    // A submitter from before protobuf jobs (JSON of the spec's job) still runs.
    let old = driver
        .submit_job(proto::SubmitJobRequest {
            name: "old".into(),
            job_json: r#"{"tasks": {"hello": {"command": "echo hello"}}}"#.into(),
            bundle_id: bundle.id.clone(),
            ..Default::default()
        })
        .await
        .expect("an old submitter's job is accepted")
        .into_inner();
    let mut events = driver
        .watch_job(proto::WatchJobRequest { run_id: old.run_id })
        .await
        .expect("watch")
        .into_inner();
    let finished = loop {
        match events.message().await.expect("events") {
            Some(proto::JobEvent {
                event: Some(proto::job_event::Event::Finished(f)),
            }) => break f,
            Some(_) => continue,
            None => panic!("the run ended without a finish"),
        }
    };
    assert!(finished.ok, "{finished:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inputs_on_this_machine_are_read_where_they_lie() {
    let cluster = Cluster::start(2, 1).await;
    let (base, reference) = job_dir(20000, 3, 31);
    let summary = run(
        &cluster,
        "in-place",
        streaming_job(4, 2, "python3 wc.py map"),
        base.path(),
        |_| {},
    )
    .await;
    assert!(summary.ok, "{summary:#?}");
    assert_eq!(
        read_part_files(&base.path().join("out/wordcount")),
        reference
    );
    // Nothing was copied into the driver's run directories: the input is
    // the submitter's own file.
    let mut copied = Vec::new();
    let runs = cluster.dir.path().join("driver/runs");
    for run in std::fs::read_dir(&runs).expect("runs").flatten() {
        let data = run.path().join("work/data");
        if data.exists() {
            copied.push(data);
        }
    }
    assert!(copied.is_empty(), "inputs were copied: {copied:?}");

    // Python workers read their ranges themselves on this machine, and
    // count what workers fed through the driver (ReadInput) count.
    std::fs::write(base.path().join("part.py"), PARTITION_PY).expect("write part.py");
    let remote = Cluster::start_remote(2, 1).await;
    let mut records = Vec::new();
    for (cluster, out) in [(&cluster, "out/here"), (&remote, "out/there")] {
        let summary = run(
            cluster,
            "python-in-place",
            partition_job("count", true, out),
            base.path(),
            |_| {},
        )
        .await;
        assert!(summary.ok, "{summary:#?}");
        assert_eq!(read_part_files(&base.path().join(out)), reference, "{out}");
        let t = summary.task("count").expect("task");
        records.push((t.records_in, t.input_bytes));
    }
    assert_eq!(records[0], records[1], "in place vs through the driver");
    remote.shutdown().await;
    cluster.shutdown().await;
}
