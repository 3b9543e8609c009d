//! `motorpool run` as a user runs it, on the local provider: a job on its
//! cluster (started first when it is not there), job clusters made for a run
//! and removed after it (also when the job fails or the user presses
//! Ctrl-C), `max_concurrent_runs`, `logs JOB`, and clear errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{Env, processes_mentioning, read_part_files, wait_until};

/// Word count as Python functions and a command that prints the total.
const WC_PY: &str = r#"
def words(line):
    for w in line.split():
        yield w, 1

def add(a, b):
    return a + b
"#;

/// Deterministic text; returns the exact word counts a single process finds.
fn write_corpus(dir: &Path, files: usize, lines: usize) -> BTreeMap<String, u64> {
    const VOCAB: [&str; 12] = [
        "pool",
        "cluster",
        "job",
        "driver",
        "worker",
        "shuffle",
        "map",
        "reduce",
        "spark",
        "ray",
        "dask",
        "motorpool",
    ];
    let mut counts = BTreeMap::new();
    let mut x: u64 = 42;
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    for f in 0..files {
        let mut text = String::new();
        for _ in 0..lines {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 1 + (x >> 60) as usize;
            let mut words = Vec::new();
            for k in 0..n {
                let w = VOCAB[((x >> (k * 4)) & 0xff) as usize % VOCAB.len()];
                *counts.entry(w.to_string()).or_insert(0) += 1;
                words.push(w);
            }
            text.push_str(&words.join(" "));
            text.push('\n');
        }
        std::fs::write(dir.join("data").join(format!("part{f}.txt")), text).expect("corpus");
    }
    counts
}

/// The nodes `status` lists under `cluster.*`.
fn cluster_nodes(env: &Env) -> Vec<serde_json::Value> {
    env.nodes()
        .into_iter()
        .filter(|n| {
            n["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("cluster."))
        })
        .collect()
}

/// This test's processes (under its home) whose command line holds `needle`.
fn task_processes(env: &Env, needle: &str) -> usize {
    let matching = processes_mentioning(needle);
    env.processes()
        .iter()
        .filter(|p| matching.contains(p))
        .count()
}

fn interrupt(pid: i32) {
    // SAFETY: sends a signal to a child this test started; no memory is touched.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

#[test]
fn run_starts_its_cluster_and_the_word_count_equals_a_single_process_count() {
    let env = Env::new();
    let dir = env.spec(
        r#"
project: jobs
provider: { kind: local }
clusters:
  etl: { node_type: small, workers: 2, env: { GREETING: "hello from etl" } }
jobs:
  wc:
    cluster: etl
    tasks:
      count:
        map: { input: "data/*.txt", partitions: 6, python: { file: wc.py, function: words } }
        reduce: { partitions: 3, python: { file: wc.py, function: add } }
        output: out/wc
      total:
        depends_on: [count]
        command: 'echo "$GREETING: $(cat out/wc/part-* | wc -l) distinct words"'
"#,
    );
    std::fs::write(dir.join("wc.py"), WC_PY).expect("wc.py");
    let expected = write_corpus(&dir, 3, 2000);

    // The cluster is not there yet: run starts it, then runs the job.
    let run = env.mp(&["run", "wc"]).expect_code(0);
    assert!(
        run.stderr.contains("starting cluster `etl`"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("job `wc` succeeded"), "{}", run.stdout);
    assert_eq!(read_part_files(&dir.join("out/wc")), expected);
    // The command task saw the reduce's output and the cluster's env; its output is shown.
    let line = format!("hello from etl: {} distinct words", expected.len());
    assert!(run.stdout.contains(&line), "{}", run.stdout);
    // It was also shown as the task printed it, under the task's name.
    assert!(
        run.stderr.contains(&format!("[total] {line}")),
        "{}",
        run.stderr
    );

    // Again, as JSON: the cluster is ready, so nothing starts; the summary has the run's numbers.
    let run = env
        .mp(&["run", ".", "wc", "--output", "json"])
        .expect_code(0);
    assert!(!run.stderr.contains("starting cluster"), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["cluster"], "etl");
    assert_eq!(report["job_cluster"], false);
    let summary = &report["summary"];
    assert_eq!(summary["ok"], true);
    let tasks = summary["tasks"].as_array().expect("tasks");
    let count = tasks
        .iter()
        .find(|t| t["name"] == "count")
        .expect("count task");
    assert_eq!(count["map_partitions"], 6);
    assert_eq!(count["reduce_partitions"], 3);
    assert!(count["shuffle_bytes"].as_u64().unwrap_or(0) > 0, "{count}");
    assert!(count["attempts"].as_u64().unwrap_or(0) >= 9, "{count}");
    assert_eq!(read_part_files(&dir.join("out/wc")), expected);

    // The newest run's task output, kept on this machine.
    let logs = env.mp(&["logs", "wc"]).expect_code(0);
    assert!(
        logs.stdout
            .contains(summary["run_id"].as_str().unwrap_or("?")),
        "{}",
        logs.stdout
    );
    assert!(logs.stdout.contains(&line), "{}", logs.stdout);

    // The spec's cluster stays (it is the spec's); nothing drifted.
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    env.destroy_leaving_nothing();
}

#[test]
fn a_job_cluster_is_gone_after_its_run_also_after_a_failed_one() {
    let env = Env::new();
    env.spec(
        r#"
project: jobclusters
provider: { kind: local }
pools:
  general: { node_type: small, min_idle: 2, max_capacity: 6 }
jobs:
  hello:
    new_cluster: { pool: general, workers: 1 }
    tasks:
      say: { command: "echo hello from a job cluster" }
  broken:
    new_cluster: { pool: general, workers: 1 }
    retries: 1
    tasks:
      fail: { command: "echo about to fail; echo the disk is on fire >&2; exit 3" }
"#,
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    let pool_nodes = env.nodes().len();

    let ok = env.mp(&["run", "hello"]).expect_code(0);
    assert!(
        ok.stdout.contains("on job cluster `hello-run-"),
        "{}",
        ok.stdout
    );
    assert!(
        ok.stdout.contains("hello from a job cluster"),
        "{}",
        ok.stdout
    );
    assert!(ok.stderr.contains("removing job cluster"), "{}", ok.stderr);
    assert!(cluster_nodes(&env).is_empty(), "{:?}", cluster_nodes(&env));

    let failed = env.mp(&["run", "broken"]).expect_code(1);
    assert!(
        failed.stdout.contains("job `broken` FAILED"),
        "{}",
        failed.stdout
    );
    assert!(
        failed.stdout.contains("the disk is on fire"),
        "{}",
        failed.stdout
    );
    assert!(failed.stdout.contains("2 attempts"), "{}", failed.stdout);
    assert!(cluster_nodes(&env).is_empty(), "{:?}", cluster_nodes(&env));

    // The drawn instances went back to the pool: no leaked instance or process.
    let nodes = env.nodes();
    assert!(nodes.len() <= 6, "{nodes:?}");
    assert!(
        nodes.iter().all(|n| n["resource"] == "pool.general"),
        "{nodes:?}"
    );
    assert!(nodes.len() >= pool_nodes);
    let live = env.processes().len();
    assert_eq!(live, nodes.len(), "one agent per instance, no more");
    // The failed run's logs are kept although its cluster is gone.
    let logs = env.mp(&["logs", "broken"]).expect_code(0);
    assert!(
        logs.stdout.contains("the disk is on fire"),
        "{}",
        logs.stdout
    );
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

/// `signal` to a `motorpool run` whose job cluster runs a task: the run is
/// cancelled, the cluster removed, and no process is left.
fn a_signalled_run_cancels_and_removes_its_job_cluster(signal: i32, sleep: &str) {
    let env = Env::new();
    env.spec(&format!(
        r#"
project: interrupted
provider: {{ kind: local }}
jobs:
  slow:
    new_cluster: {{ node_type: small, workers: 1 }}
    tasks:
      wait: {{ command: "{sleep}" }}
"#
    ));
    let mut run = env.spawn(&["run", "slow"]);
    assert!(
        wait_until(Duration::from_secs(90), || task_processes(&env, sleep) > 0),
        "the job never started"
    );
    // SAFETY: sends a signal to a child this test started; no memory is touched.
    unsafe {
        libc::kill(run.pid(), signal);
    }
    let done = wait_until(Duration::from_secs(60), || {
        run.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    });
    assert!(done, "motorpool run did not stop after signal {signal}");
    let out = run.wait();
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
    assert!(
        out.stderr.contains("removing job cluster"),
        "{}",
        out.stderr
    );
    assert!(env.nodes().is_empty(), "{:?}", env.nodes());
    assert!(
        wait_until(Duration::from_secs(10), || task_processes(&env, sleep) == 0),
        "the task's process outlived the run"
    );
    assert!(
        env.processes().is_empty(),
        "left running: {:?}",
        env.processes()
    );
}

#[test]
fn ctrl_c_cancels_the_run_and_removes_its_job_cluster() {
    a_signalled_run_cancels_and_removes_its_job_cluster(libc::SIGINT, "sleep 31.7");
}

/// What CI runners and `timeout` send: handled like Ctrl-C, not a kill
/// that leaves the job cluster up until it expires.
#[test]
fn sigterm_cancels_the_run_and_removes_its_job_cluster_like_ctrl_c() {
    a_signalled_run_cancels_and_removes_its_job_cluster(libc::SIGTERM, "sleep 31.9");
}

#[test]
fn max_concurrent_runs_refuses_a_second_run_while_one_goes() {
    let env = Env::new();
    env.spec(
        r#"
project: concurrent
provider: { kind: local }
clusters:
  etl: { node_type: small, workers: 1 }
jobs:
  nightly:
    cluster: etl
    max_concurrent_runs: 1
    tasks:
      wait: { command: "sleep 32.3" }
"#,
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    let mut first = env.spawn(&["run", "nightly"]);
    assert!(
        wait_until(Duration::from_secs(60), || task_processes(
            &env,
            "sleep 32.3"
        ) > 0),
        "the first run never started"
    );
    let running = task_processes(&env, "sleep 32.3");
    let second = env.mp(&["run", "nightly"]).expect_code(1);
    assert!(
        second.stderr.contains("max_concurrent_runs: 1"),
        "{}",
        second.stderr
    );
    assert_eq!(
        task_processes(&env, "sleep 32.3"),
        running,
        "the second run started anyway"
    );

    // Ctrl-C on a run on a shared cluster cancels the run and leaves the cluster.
    interrupt(first.pid());
    assert!(
        wait_until(Duration::from_secs(30), || {
            first
                .0
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        }),
        "the first run did not stop"
    );
    let out = first.wait();
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("was cancelled"), "{}", out.stderr);
    assert!(
        wait_until(Duration::from_secs(10), || task_processes(
            &env,
            "sleep 32.3"
        ) == 0),
        "the cancelled task still runs"
    );
    assert_eq!(cluster_nodes(&env).len(), 2);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn bad_run_requests_get_clear_errors_and_change_nothing() {
    let env = Env::new();
    env.spec(
        r#"
project: mistakes
provider: { kind: local }
clusters:
  etl: { node_type: small, workers: 1 }
jobs:
  real: { cluster: etl, tasks: { t: { command: "true" } } }
"#,
    );
    let run = env.mp(&["run", "imaginary"]).expect_code(1);
    assert!(
        run.stderr
            .contains("the spec has no job `imaginary`; its jobs: real"),
        "{}",
        run.stderr
    );
    let logs = env.mp(&["logs", "real"]).expect_code(1);
    assert!(logs.stderr.contains("no recorded runs"), "{}", logs.stderr);
    let bad_var = env.mp(&["run", "real", "--var", "novalue"]).expect_code(1);
    assert!(
        bad_var.stderr.contains("--var takes NAME=VALUE") && !bad_var.stderr.contains("novalue"),
        "{}",
        bad_var.stderr
    );
    let missing = env.mp(&["run", "/nonexistent/spec", "real"]).expect_code(1);
    assert!(
        missing.stderr.contains("/nonexistent/spec"),
        "{}",
        missing.stderr
    );
    // Nothing was started by any of it.
    assert!(env.nodes().is_empty(), "{:?}", env.nodes());
    assert!(env.processes().is_empty());
}

#[test]
fn a_jobs_secret_env_reaches_its_tasks_and_no_output_or_record_holds_it() {
    let env = Env::new().with_var("MOTORPOOL_TEST_REPORT_TOKEN", "tok-3f9a-never-printed");
    env.spec(
        r#"
project: jobsecrets
provider: { kind: local }
jobs:
  report:
    new_cluster: { node_type: small, workers: 1 }
    env:
      API_TOKEN: { secret: true, from_env: MOTORPOOL_TEST_REPORT_TOKEN }
      GREETING: hello
    tasks:
      check:
        command: '[ "$API_TOKEN" = "tok-3f9a-never-printed" ] && echo "$GREETING, the token arrived"'
"#,
    );
    env.mp(&["validate"]).expect_code(0);
    let run = env
        .mp(&["run", "report", "--output", "json"])
        .expect_code(0);
    assert!(run.stdout.contains("\"ok\": true"), "{}", run.stdout);
    let logs = env.mp(&["logs", "report"]).expect_code(0);
    assert!(
        logs.stdout.contains("hello, the token arrived"),
        "{}",
        logs.stdout
    );
    for text in [&run.stdout, &run.stderr, &logs.stdout] {
        assert!(!text.contains("tok-3f9a"), "{text}");
    }
    // Nothing motorpool keeps in the home (run records, journal) holds it.
    for entry in walk(env.home()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("tok-3f9a"),
            "{} holds the secret",
            entry.display()
        );
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}
