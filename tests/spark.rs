//! Apache Spark as a cluster's engine, for real, on the local provider: the
//! runtime step installs the pinned pyspark (once per machine, into
//! `MOTORPOOL_CACHE_DIR`, kept in the cargo target directory like moto's
//! virtualenv) and the machine's Java 17; formation starts a real Spark
//! master and workers; `motorpool run` hands PySpark scripts to
//! `spark-submit`. Answers are checked against plain Python computing the
//! same thing. Under `motorpool controller`, a cluster with `autoscale`
//! grows while an application's tasks wait and shrinks back after.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::controller::Controller;
use common::{Env, processes_mentioning, wait_until};

/// The machine-wide cache the nodes install pyspark into: made once in the
/// target directory, reused by every run of the tests.
fn cache_dir() -> PathBuf {
    let target = Path::new(common::binary())
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in target/<profile>/");
    target.join("engine-cache")
}

fn spark_env() -> Env {
    let env = Env::new().with_var("MOTORPOOL_CACHE_DIR", &cache_dir().display().to_string());
    // Spark's own temporary files stay in the test's home.
    let tmp = env.home().join("tmp");
    std::fs::create_dir_all(&tmp).expect("tmp");
    env.with_var("TMPDIR", &tmp.display().to_string())
}

/// Deterministic events (user, day, amount) and users (user, country).
fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let mut x: u64 = 7;
    let mut events = String::from("user,day,amount\n");
    for _ in 0..3000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let user = (x >> 33) % 40;
        let day = 1 + (x >> 20) % 7;
        let amount = (x >> 40) % 1000;
        events.push_str(&format!("u{user},2026-11-0{day},{amount}\n"));
    }
    std::fs::write(dir.join("data/events.csv"), events).expect("events");
    let countries = ["de", "fr", "jp", "br", "us"];
    let mut users = String::from("user,country\n");
    // Users 0..35 have a country; 35..40 have none (the join drops them).
    for u in 0..35 {
        users.push_str(&format!("u{u},{}\n", countries[u % countries.len()]));
    }
    std::fs::write(dir.join("data/users.csv"), users).expect("users");
}

/// The PySpark job: a join, a groupBy, a window function and SQL.
const AGGREGATE_PY: &str = r#"
import json, sys
from pyspark.sql import SparkSession, Window, functions as F
from lib import label

spark = SparkSession.builder.appName("aggregate").getOrCreate()
events = spark.read.csv(sys.argv[1], header=True, inferSchema=True)
users = spark.read.csv(sys.argv[2], header=True, inferSchema=True)
joined = events.join(users, "user")
totals = joined.groupBy("country").agg(F.sum("amount").alias("total"), F.count("*").alias("n"))
w = Window.partitionBy("country").orderBy(F.desc("amount"), F.asc("user"), F.asc("day"))
top = joined.withColumn("rank", F.row_number().over(w)).filter("rank = 1")
events.createOrReplaceTempView("events")
per_day = spark.sql("SELECT day, SUM(amount) AS total FROM events GROUP BY day ORDER BY day")
result = {
    "totals": {label(r["country"]): [int(r["total"]), int(r["n"])] for r in totals.collect()},
    "top": {label(r["country"]): [r["user"], int(r["amount"])] for r in top.collect()},
    "per_day": {str(r["day"]): int(r["total"]) for r in per_day.collect()},
    "partitions": spark.conf.get("spark.sql.shuffle.partitions"),
}
print("RESULT " + json.dumps(result, sort_keys=True))
spark.stop()
"#;

const LIB_PY: &str = "def label(country):\n    return 'country:' + country\n";

/// The same answer in plain Python, from the same files.
const REFERENCE_PY: &str = r#"
import csv, json, sys
from collections import defaultdict
def label(country):
    return 'country:' + country
users = {r["user"]: r["country"] for r in csv.DictReader(open(sys.argv[2]))}
totals, best, per_day = defaultdict(lambda: [0, 0]), {}, defaultdict(int)
for r in csv.DictReader(open(sys.argv[1])):
    amount = int(r["amount"])
    per_day[r["day"]] += amount
    c = users.get(r["user"])
    if c is None:
        continue
    totals[label(c)][0] += amount
    totals[label(c)][1] += 1
    key = (-amount, r["user"], r["day"])
    if label(c) not in best or key < best[label(c)][0]:
        best[label(c)] = (key, [r["user"], amount])
result = {
    "totals": dict(totals),
    "top": {c: v for c, (_, v) in best.items()},
    "per_day": dict(per_day),
    "partitions": sys.argv[3],
}
print("RESULT " + json.dumps(result, sort_keys=True))
"#;

const FAILING_PY: &str = r#"
from pyspark.sql import SparkSession
spark = SparkSession.builder.appName("failing").getOrCreate()
def check(x):
    if x == 3:
        raise ValueError("bad row 3")
    return x
print(spark.sparkContext.parallelize(range(6), 2).map(check).collect())
"#;

/// A job slow enough to lose a worker in the middle: 12 partitions of a
/// second each, summed.
const SLOW_PY: &str = r#"
import time
from pyspark.sql import SparkSession
spark = SparkSession.builder.appName("slow").getOrCreate()
def slow(x):
    time.sleep(1.5)
    return x * x
total = spark.sparkContext.parallelize(range(24), 12).map(slow).sum()
print("SUM", total)
spark.stop()
"#;

fn result_line(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{text}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

fn reference(dir: &Path, partitions: &str) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(REFERENCE_PY)
        .args(["data/events.csv", "data/users.csv", partitions])
        .current_dir(dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    result_line(&String::from_utf8_lossy(&out.stdout))
}

/// This test's Spark JVMs (masters, workers, executors, submits).
fn jvms(env: &Env) -> Vec<i32> {
    let ours: BTreeSet<i32> = env.processes().into_iter().collect();
    processes_mentioning("org.apache.spark")
        .into_iter()
        .filter(|p| ours.contains(p))
        .collect()
}

/// Every Spark JVM of this test is gone (within 20 s: daemons get a grace period).
fn assert_no_jvm_left(env: &Env) {
    assert!(
        wait_until(Duration::from_secs(20), || jvms(env).is_empty()),
        "JVMs left: {:?}",
        jvms(env)
    );
}

fn jvms_of(env: &Env, class: &str) -> Vec<i32> {
    let theirs: BTreeSet<i32> = processes_mentioning(class).into_iter().collect();
    jvms(env)
        .into_iter()
        .filter(|p| theirs.contains(p))
        .collect()
}

/// The local addresses `pid` listens on (from /proc/net/tcp and tcp6).
fn listening(pid: i32) -> Vec<String> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.display().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                found.push(cols[1].to_string());
            }
        }
    }
    found
}

/// Whether a /proc/net address (hex ip:port) is a loopback address.
fn is_loopback_hex(address: &str) -> bool {
    let ip = address.split(':').next().unwrap_or_default();
    match ip.len() {
        // 127.x.x.x, little-endian: the last byte is 7F.
        8 => ip.ends_with("7F"),
        // ::1, or ::ffff:127.x.x.x
        32 => {
            ip == "00000000000000000000000001000000"
                || (ip.starts_with("0000000000000000FFFF0000") && ip.ends_with("7F"))
        }
        _ => false,
    }
}

fn write_job_files(dir: &Path) {
    std::fs::create_dir_all(dir.join("jobs")).expect("jobs dir");
    std::fs::write(dir.join("jobs/aggregate.py"), AGGREGATE_PY).expect("aggregate.py");
    std::fs::write(dir.join("jobs/lib.py"), LIB_PY).expect("lib.py");
    std::fs::write(dir.join("jobs/failing.py"), FAILING_PY).expect("failing.py");
    std::fs::write(dir.join("jobs/slow.py"), SLOW_PY).expect("slow.py");
    write_data(dir);
}

const CLUSTER_SPEC: &str = r#"
project: sparky
provider: { kind: local }
clusters:
  analytics:
    node_type: small
    workers: 2
    engine: { kind: spark, version: "4.0.1" }
    spark_conf: { spark.sql.shuffle.partitions: "8" }
jobs:
  daily:
    cluster: analytics
    tasks:
      aggregate:
        spark:
          script: jobs/aggregate.py
          args: [data/events.csv, data/users.csv]
          py_files: [jobs/lib.py]
          conf: { spark.sql.shuffle.partitions: "6" }
      after:
        depends_on: [aggregate]
        command: echo the aggregate ran
  broken:
    cluster: analytics
    tasks:
      fail: { spark: { script: jobs/failing.py } }
  slow:
    cluster: analytics
    tasks:
      sum: { spark: { script: jobs/slow.py } }
"#;

#[test]
fn a_spark_cluster_runs_pyspark_on_loopback_and_its_master_heals() {
    let env = spark_env();
    let dir = env.spec(CLUSTER_SPEC);
    write_job_files(&dir);
    env.mp(&["validate"]).expect_code(0);

    // Apply: the runtime step installs pyspark (once per machine), formation
    // starts a master and two workers, ready when both are ALIVE.
    let apply = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        apply.stdout.contains("cluster.analytics"),
        "{}",
        apply.stdout
    );
    assert_eq!(jvms_of(&env, "deploy.master.Master").len(), 1);
    assert_eq!(jvms_of(&env, "deploy.worker.Worker").len(), 2);
    // Nothing of Spark listens beyond loopback.
    for pid in jvms(&env) {
        for address in listening(pid) {
            assert!(is_loopback_hex(&address), "JVM {pid} listens on {address}");
        }
    }
    let status = env.mp(&["status"]).expect_code(0);
    assert!(status.stdout.contains("spark"), "{}", status.stdout);
    assert!(
        status.stdout.contains("spark://127.0.0.1:"),
        "{}",
        status.stdout
    );

    // The job: DataFrames, a join, a window, SQL; the task's conf over the cluster's.
    let run = env.mp(&["run", "daily"]).expect_code(0);
    assert!(
        run.stdout.contains("job `daily` succeeded"),
        "{}",
        run.stdout
    );
    assert_eq!(result_line(&run.stdout), reference(&dir, "6"));
    assert!(run.stdout.contains("the aggregate ran"), "{}", run.stdout);
    // The driver program's output came live too, under its task's name.
    assert!(run.stderr.contains("[aggregate] RESULT "), "{}", run.stderr);
    let logs = env.mp(&["logs", "daily"]).expect_code(0);
    assert!(logs.stdout.contains("RESULT "), "{}", logs.stdout);

    // An exception in the script fails the run, with the Python traceback.
    let failed = env.mp(&["run", "broken"]).expect_code(1);
    let text = format!("{}{}", failed.stdout, failed.stderr);
    assert!(text.contains("Traceback"), "{text}");
    assert!(text.contains("ValueError: bad row 3"), "{text}");

    // A dead master is drift on its node; apply forms the cluster again.
    let masters = jvms_of(&env, "deploy.master.Master");
    // SAFETY: signals a JVM this test started.
    unsafe {
        libc::kill(masters[0], libc::SIGKILL);
    }
    let drifted = wait_until(Duration::from_secs(30), || {
        env.mp(&["plan", "--detailed-exitcode"]).code == 2
    });
    let plan = env.mp(&["plan"]);
    assert!(drifted, "{}{}", plan.stdout, plan.stderr);
    assert!(
        plan.stdout.contains("failed at formation"),
        "{}",
        plan.stdout
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(jvms_of(&env, "deploy.master.Master").len(), 1);
    assert_eq!(jvms_of(&env, "deploy.worker.Worker").len(), 2);
    let again = env.mp(&["run", "daily"]).expect_code(0);
    assert_eq!(result_line(&again.stdout), reference(&dir, "6"));

    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert_no_jvm_left(&env);
}

#[test]
fn a_worker_killed_mid_job_still_lets_the_job_finish() {
    let env = spark_env();
    let dir = env.spec(CLUSTER_SPEC);
    write_job_files(&dir);
    env.mp(&["apply", "--yes"]).expect_code(0);
    let run = env.spawn(&["run", "slow"]);
    // Once executors run tasks, kill one worker and its executor (its group).
    let executors = wait_until(Duration::from_secs(120), || {
        jvms_of(&env, "CoarseGrainedExecutorBackend").len() == 2
    });
    assert!(executors, "no executors came up");
    std::thread::sleep(Duration::from_secs(3));
    let worker = jvms_of(&env, "deploy.worker.Worker")[0];
    // SAFETY: signals the process group of a worker this test started.
    unsafe {
        libc::kill(-worker, libc::SIGKILL);
    }
    let run = run.wait().expect_code(0);
    let expected: u64 = (0..24u64).map(|x| x * x).sum();
    assert!(
        run.stdout.contains(&format!("SUM {expected}")),
        "{}",
        run.stdout
    );

    // SIGTERM to `motorpool run` cancels the application: its driver
    // program and executors go, and the run is recorded as cancelled.
    env.mp(&["apply", "--yes"]).expect_code(0);
    let run = env.spawn(&["run", "slow"]);
    let started = wait_until(Duration::from_secs(120), || {
        !jvms_of(&env, "CoarseGrainedExecutorBackend").is_empty()
    });
    assert!(started, "no executors came up");
    // SAFETY: signals the motorpool this test started.
    unsafe {
        libc::kill(run.pid(), libc::SIGTERM);
    }
    let cancelled = run.wait();
    assert_ne!(
        cancelled.code, 0,
        "{}{}",
        cancelled.stdout, cancelled.stderr
    );
    let gone = wait_until(Duration::from_secs(30), || {
        jvms_of(&env, "SparkSubmit").is_empty()
            && jvms_of(&env, "CoarseGrainedExecutorBackend").is_empty()
    });
    assert!(gone, "the application kept running: {:?}", jvms(&env));
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert_no_jvm_left(&env);
}

#[test]
fn a_spark_job_cluster_from_a_preloaded_pool_is_gone_after_its_run() {
    let env = spark_env();
    let dir = env.spec(
        r#"
project: sparkjob
provider: { kind: local }
pools:
  lot:
    node_type: small
    min_idle: 2
    max_capacity: 4
    preload: { engine: { kind: spark, version: "4.0.1" } }
jobs:
  once:
    new_cluster:
      pool: lot
      workers: 1
      engine: { kind: spark, version: "4.0.1" }
    tasks:
      aggregate:
        spark: { script: jobs/aggregate.py, args: [data/events.csv, data/users.csv], py_files: [jobs/lib.py] }
"#,
    );
    write_job_files(&dir);
    // The pool's idle instances install Java and pyspark ahead of time.
    env.mp(&["apply", "--yes"]).expect_code(0);
    let warm = wait_until(Duration::from_secs(300), || {
        let nodes = env.nodes();
        nodes.len() == 2 && nodes.iter().all(|n| n["step"] == "runtime")
    });
    assert!(warm, "{:?}", env.nodes());

    let run = env.mp(&["run", "once"]).expect_code(0);
    assert!(
        run.stderr.contains("removing job cluster"),
        "{}",
        run.stderr
    );
    // Spark's default shuffle partitions: the cluster sets none.
    assert_eq!(result_line(&run.stdout), reference(&dir, "200"));
    // The drawn instances went back to the pool, their daemons stopped.
    let nodes = env.nodes();
    assert!(
        nodes.iter().all(|n| n["resource"] == "pool.lot"),
        "{nodes:?}"
    );
    assert_no_jvm_left(&env);
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// A job wide enough to wait for cores: 48 partitions of a second each.
const WIDE_PY: &str = r#"
import time
from pyspark.sql import SparkSession
spark = SparkSession.builder.appName("wide").getOrCreate()
def slow(x):
    time.sleep(1)
    return x
total = spark.sparkContext.parallelize(range(48), 48).map(slow).sum()
print("SUM", total)
spark.stop()
"#;

#[test]
fn an_autoscaled_spark_cluster_grows_while_its_stages_wait_and_shrinks_back_after() {
    // A minute of the spec lasts 1 s: the cluster shrinks after 3 idle seconds.
    let env = spark_env().with_var("MOTORPOOL_MINUTE_MS", "1000");
    let dir = env.spec(
        r#"
project: sparkscale
provider: { kind: local }
clusters:
  analytics:
    node_type: small
    autoscale: { min: 1, max: 2, idle_timeout_minutes: 3 }
    engine: { kind: spark, version: "4.0.1" }
jobs:
  wide:
    cluster: analytics
    tasks:
      sum: { spark: { script: jobs/wide.py } }
"#,
    );
    std::fs::create_dir_all(dir.join("jobs")).expect("jobs dir");
    std::fs::write(dir.join("jobs/wide.py"), WIDE_PY).expect("wide.py");
    env.mp(&["apply", "--yes"]).expect_code(0);
    assert_eq!(jvms_of(&env, "deploy.worker.Worker").len(), 1);

    let controller = Controller::start(&env, &["--interval", "0.5"]);
    controller.wait_for("a pass every", Duration::from_secs(30));
    let run = env.spawn(&["run", "wide"]);
    // One worker of one core, 48 tasks waiting in the application's stage:
    // the controller reads them from the application's UI and adds a worker,
    // whose executor then takes tasks of the same application.
    controller.wait_for(
        "cluster.analytics: autoscale 1 -> 2 workers",
        Duration::from_secs(120),
    );
    controller.wait_for("tasks waiting beyond", Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(120), || {
            jvms_of(&env, "CoarseGrainedExecutorBackend").len() == 2
        }),
        "the new worker never ran an executor of the application: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    let out = run.wait().expect_code(0);
    let expected: u64 = (0..48u64).sum();
    assert!(
        out.stdout.contains(&format!("SUM {expected}")),
        "{}",
        out.stdout
    );

    // Idle for 3 (short) minutes: back to one worker, with no drift.
    controller.wait_for(
        "cluster.analytics: autoscale 2 -> 1 workers: no task ran",
        Duration::from_secs(120),
    );
    assert!(
        wait_until(Duration::from_secs(60), || {
            jvms_of(&env, "deploy.worker.Worker").len() == 1
                && env.mp(&["plan", "--detailed-exitcode"]).code == 0
        }),
        "{:?}\n{}\n{}",
        env.nodes(),
        env.mp(&["plan"]).stdout,
        controller.log()
    );
    controller.stop();
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert_no_jvm_left(&env);
}

#[test]
fn validate_points_at_what_spark_cannot_run() {
    let env = Env::new();
    let dir = env.spec(
        r#"
project: sparkcheck
provider: { kind: local }
pools:
  lot:
    node_type: small
    max_capacity: 4
    preload: { engine: { kind: spark, version: "latest" } }
clusters:
  plain:
    node_type: small
    spark_conf: { spark.sql.shuffle.partitions: "8" }
  sparky:
    node_type: small
    engine: { kind: spark, version: "4.0" }
    spark_conf: { spark.master: "local[2]", shuffle: "8" }
jobs:
  wrong-engine:
    cluster: plain
    tasks:
      agg: { spark: { script: jobs/agg.py } }
  wrong-task:
    cluster: sparky
    tasks:
      count: { map: { input: data.txt, command: wc -l } }
      missing: { spark: { script: jobs/nope.py, py_files: [../outside.py] } }
  typed:
    cluster: sparky
    tasks:
      agg: { spark: { script: jobs/agg.py, conf: { spark.executor.cores: 2 } } }
"#,
    );
    std::fs::create_dir_all(dir.join("jobs")).expect("jobs");
    std::fs::write(dir.join("jobs/agg.py"), "print(1)\n").expect("agg.py");
    let run = env.mp(&["validate"]).expect_code(1);
    let text = run.stderr;
    for needle in [
        "engine version `latest` in the preload of pool `lot`",
        "`spark_conf` in cluster `plain`: the cluster runs `motorpool`, not Spark",
        "engine version `4.0` in cluster `sparky`",
        "`spark.master` is set by motorpool",
        "`shuffle` is not a Spark property",
        "a `spark:` task needs a cluster with `engine:",
        "map/reduce tasks run on the motorpool engine",
        "`jobs/nope.py` is not a file",
        "../outside.py",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
    // A conf value that is not a string, with its position.
    assert!(
        text.lines().any(|l| l.starts_with("motorpool.yaml:30:")
            && l.contains("expected a string, found an integer (2)")
            && l.contains("spark.executor.cores")),
        "{text}"
    );
}
