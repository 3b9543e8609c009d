//! `motorpool controller`, run as a user runs it: pools that refill and
//! shrink without an apply (local provider, real agents, minutes shortened
//! with `MOTORPOOL_MINUTE_MS`), one controller per project, an apply that
//! waits for the controller's pass, a killed controller that converges when
//! started again, and a pass over 10,000 sim nodes that costs one list call
//! per page.

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::controller::Controller;
use common::{Env, wait_until};

/// `GET path` from 127.0.0.1:`port`: status and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Nodes of `resource` (`pool.general`) as `status` lists them.
fn nodes_of(env: &Env, resource: &str) -> usize {
    env.nodes()
        .iter()
        .filter(|n| n["resource"] == resource)
        .count()
}

fn cluster_nodes(env: &Env) -> usize {
    env.nodes()
        .iter()
        .filter(|n| {
            n["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("cluster."))
        })
        .count()
}

#[test]
fn a_pool_drawn_by_a_job_cluster_refills_and_shrinks_back_without_an_apply() {
    // A minute of the spec lasts 1 s: the idle timeout of 3 minutes is 3 s.
    let env = Env::new().with_var("MOTORPOOL_MINUTE_MS", "1000");
    let flag = env.dir.path().join("go");
    env.spec(&format!(
        r#"
project: refill
provider: {{ kind: local }}
pools:
  general: {{ node_type: small, min_idle: 2, max_capacity: 6, idle_timeout_minutes: 3 }}
jobs:
  wait:
    new_cluster: {{ pool: general, workers: 1 }}
    tasks:
      hold: {{ command: "while [ ! -e '{}' ]; do sleep 0.1; done; echo released" }}
"#,
        flag.display()
    ));
    env.mp(&["apply", "--yes"]).expect_code(0);
    assert_eq!(nodes_of(&env, "pool.general"), 2);
    // Only warm idle instances are handed out: wait for their warm-up.
    assert!(
        wait_until(Duration::from_secs(120), || {
            let warm = env
                .nodes()
                .iter()
                .filter(|n| n["resource"] == "pool.general" && n["step"] == "runtime")
                .count();
            warm == 2
        }),
        "the pool never warmed up: {:?}",
        env.nodes()
    );

    let controller = Controller::start(&env, &["--interval", "0.3"]);
    let port = controller.metrics_port();
    // A second controller of the project does not act: it exits, naming the first.
    let second = env
        .mp(&["controller", "--once", "--listen", "off"])
        .expect_code(1);
    assert!(
        second
            .stderr
            .contains("another controller runs for project `refill`")
            && second.stderr.contains("Nothing was changed"),
        "{}",
        second.stderr
    );

    // The run's job cluster takes both idle instances; the controller refills the pool while it runs.
    let run = env.spawn(&["run", "wait"]);
    assert!(
        wait_until(Duration::from_secs(120), || cluster_nodes(&env) == 2
            && nodes_of(&env, "pool.general") == 2),
        "the pool was not refilled while the job cluster ran: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    controller.wait_for(
        "pool.general: update (idle 0 -> 2 (min_idle 2))",
        Duration::from_secs(5),
    );
    // The log names a change when the pass starts it; /metrics counts it when
    // the pass has made it (the new instances warmed up).
    let refill_counted =
        "motorpool_changes_total{project=\"refill\",action=\"update\",outcome=\"done\"}";
    let mut metrics = String::new();
    assert!(
        wait_until(Duration::from_secs(120), || {
            let (status, text) = get(port, "/metrics");
            assert_eq!(status, 200, "{text}");
            metrics = text;
            metrics.contains(refill_counted)
        }),
        "the refill was never counted: {metrics}\n{}",
        controller.log()
    );
    assert!(
        metrics.contains("motorpool_pool_in_use_instances{project=\"refill\",pool=\"general\"} 2"),
        "{metrics}"
    );

    // The run ends and gives its two instances back: four idle, trimmed to
    // min_idle once they idled three (short) minutes.
    std::fs::write(&flag, "").expect("release the job");
    let out = run.wait().expect_code(0);
    assert!(out.stdout.contains("released"), "{}", out.stdout);
    assert_eq!(cluster_nodes(&env), 0);
    assert!(
        wait_until(Duration::from_secs(60), || nodes_of(&env, "pool.general")
            == 2),
        "the pool never shrank back to min_idle: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    controller.wait_for(
        "2 instances above min_idle idle longer than 3 minutes",
        Duration::from_secs(5),
    );
    assert!(
        wait_until(Duration::from_secs(10), || get(port, "/metrics")
            .1
            .contains(
                "motorpool_pool_idle_instances{project=\"refill\",pool=\"general\"} 2"
            )),
        "{}",
        get(port, "/metrics").1
    );
    let (status, health) = get(port, "/healthz");
    assert_eq!(status, 200, "{health}");
    assert_eq!(get(port, "/nothing").0, 404);

    // Nothing for apply to do after the controller: it kept the spec's promise.
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    let (code, log) = controller.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopping: signal received"), "{log}");
    env.destroy_leaving_nothing();
}

/// A sim project with one pool: apply it with `min_idle: 1`, then ask for
/// `grown` idle instances in the spec, which the controller's pass makes
/// (API calls take 300 ms, instances a second to boot: a pass that launches
/// takes a couple of seconds).
fn slow_sim(env: &Env, project: &str, grown: u32) {
    let spec = |min: u32| {
        format!(
            "project: {project}\nprovider: {{ kind: sim, latency_ms: 300, boot_seconds: 1 }}\npools:\n  general: {{ node_type: small, min_idle: {min}, max_capacity: 40 }}\n"
        )
    };
    env.spec(&spec(1));
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.spec(&spec(grown));
}

#[test]
fn one_controller_acts_per_project_and_an_apply_waits_for_its_pass() {
    let env = Env::new();
    slow_sim(&env, "single", 12);
    let first = Controller::start(&env, &["--interval", "0.2", "--parallelism", "1"]);
    first.wait_for("a pass every", Duration::from_secs(30));

    let second = env
        .mp(&["controller", "--listen", "off", "--once"])
        .expect_code(1);
    assert!(
        second
            .stderr
            .contains("another controller runs for project `single`"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("`motorpool controller`"),
        "{}",
        second.stderr
    );

    // The first controller's pass launches 11 instances one at a time; an
    // apply meanwhile waits for it instead of failing, then has nothing to do.
    first.wait_for("pool.general: update", Duration::from_secs(30));
    let apply = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        apply.stdout.contains("waiting for the project lock")
            && apply.stdout.contains("`motorpool controller`"),
        "the apply did not wait for the controller:\n{}\n{}",
        apply.stdout,
        first.log()
    );
    assert!(apply.stdout.contains("No changes"), "{}", apply.stdout);
    assert_eq!(nodes_of(&env, "pool.general"), 12);
    first.stop();
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn a_controller_killed_mid_pass_and_started_again_converges_with_nothing_made_twice() {
    // On the local provider every instance is an agent process: a launch
    // made twice would show as an extra instance and an extra process.
    let env = Env::new();
    let spec = |min: u32| {
        format!(
            "project: killed\nprovider: {{ kind: local }}\npools:\n  general: {{ node_type: small, min_idle: {min}, max_capacity: 12 }}\n"
        )
    };
    env.spec(&spec(1));
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.spec(&spec(8));
    let journal = env.project_file("killed", "journal.jsonl");
    let mut first = Controller::start(&env, &["--interval", "0.2", "--parallelism", "1"]);
    // Killed as soon as its pass starts applying (its launch is in flight or just done).
    assert!(
        wait_until(Duration::from_secs(60), || journal.exists()),
        "the first controller never applied: {}",
        first.log()
    );
    first.kill9();

    let second = Controller::start(&env, &["--interval", "0.2"]);
    assert!(
        wait_until(Duration::from_secs(90), || nodes_of(&env, "pool.general")
            == 8),
        "did not converge: {:?}\n{}",
        env.nodes(),
        second.log()
    );
    // Converged, and stays there: no duplicate from the replayed launches,
    // one agent process per instance.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(nodes_of(&env, "pool.general"), 8, "{}", second.log());
    let agents: Vec<i32> = common::processes_mentioning(&env.home().display().to_string())
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"agent"))
        })
        .collect();
    assert_eq!(agents.len(), 8, "agent processes: {agents:?}");
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    second.stop();
    env.destroy_leaving_nothing();
}

#[test]
fn a_pass_over_ten_thousand_sim_nodes_costs_one_list_call_per_page() {
    let env = Env::new();
    let mut spec = String::from(
        "project: big\nprovider: { kind: sim, page_size: 1000 }\npools:\n  general: { node_type: small, min_idle: 1, max_capacity: 4 }\nclusters:\n",
    );
    for i in 0..1000 {
        spec.push_str(&format!("  c{i}: {{ node_type: small, workers: 9 }}\n"));
    }
    env.spec(&spec);
    env.mp(&["apply", "--yes", "--parallelism", "64"])
        .expect_code(0);
    let once = env
        .mp(&["controller", "--once", "--listen", "off"])
        .expect_code(0);
    // 10,000 cluster nodes and one idle instance: 11 pages of 1,000.
    assert!(
        once.stderr
            .contains("pass: 10001 instances in 11 pages (11 list calls, 11 provider calls in all), nothing to do"),
        "{}",
        once.stderr
    );
    env.mp(&["destroy", "--yes", "--parallelism", "64"])
        .expect_code(0);
}

/// The run records `motorpool run` kept for `job`: their run ids.
fn run_ids(env: &Env, project: &str, job: &str) -> Vec<String> {
    let dir = env.project_file(project, "runs").join(job);
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[test]
fn a_scheduled_job_runs_on_time_in_its_time_zone_and_not_twice() {
    // The next whole minute at least 8 s away, written as Asia/Kolkata's
    // wall clock (UTC+05:30, no daylight saving).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut slot = (now / 60 + 1) * 60;
    if slot - now < 8 {
        slot += 60;
    }
    let kolkata = slot + 5 * 3600 + 30 * 60;
    let (minute, hour) = ((kolkata / 60) % 60, (kolkata / 3600) % 24);

    let env = Env::new();
    env.spec(&format!(
        r#"
project: nightly
provider: {{ kind: local }}
jobs:
  report:
    new_cluster: {{ node_type: small, workers: 1 }}
    schedule: {{ cron: "{minute} {hour} * * *", timezone: Asia/Kolkata }}
    tasks:
      say: {{ command: "echo report made" }}
"#
    ));
    env.mp(&["validate"]).expect_code(0);
    let mut first = Controller::start(&env, &["--interval", "0.2"]);
    first.wait_for("a pass every", Duration::from_secs(30));
    assert!(
        run_ids(&env, "nightly", "report").is_empty(),
        "ran before its time"
    );
    assert!(
        wait_until(Duration::from_secs(150), || !run_ids(
            &env, "nightly", "report"
        )
        .is_empty()),
        "the scheduled run never happened:\n{}",
        first.log()
    );
    first.wait_for("job.report: run due at", Duration::from_secs(5));
    first.wait_for("ended: succeeded", Duration::from_secs(120));
    let ids = run_ids(&env, "nightly", "report");
    assert_eq!(ids.len(), 1, "{ids:?}\n{}", first.log());
    // run-<unix ms at submit>-<hex>: submitted within a minute of its slot.
    let submitted_ms: i64 = ids[0]
        .split('-')
        .nth(1)
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("run id {}", ids[0]));
    assert!(
        submitted_ms >= slot * 1000 && submitted_ms < (slot + 60) * 1000,
        "submitted at {submitted_ms} ms for the slot at {slot} s"
    );
    let logs = env.mp(&["logs", "report"]).expect_code(0);
    assert!(logs.stdout.contains("report made"), "{}", logs.stdout);
    assert_eq!(cluster_nodes(&env), 0, "the job cluster was not removed");

    // Killed and started again, the controller does not run the slot again.
    first.kill9();
    let second = Controller::start(&env, &["--interval", "0.2"]);
    second.wait_for("a pass every", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        run_ids(&env, "nightly", "report").len(),
        1,
        "{}",
        second.log()
    );
    assert!(!second.log().contains("started (pid"), "{}", second.log());
    second.stop();
    assert!(
        env.processes().is_empty(),
        "left running: {:?}",
        env.processes()
    );
}

/// Worker nodes of cluster `name` (its driver not counted).
fn workers_of(env: &Env, name: &str) -> usize {
    env.nodes()
        .iter()
        .filter(|n| n["resource"] == format!("cluster.{name}") && n["role"] == "worker")
        .count()
}

#[test]
fn an_autoscaled_cluster_grows_while_tasks_wait_and_shrinks_back_after_idling() {
    // A minute of the spec lasts 1 s: the cluster shrinks after 3 idle seconds.
    let env = Env::new().with_var("MOTORPOOL_MINUTE_MS", "1000");
    let dir = env.spec(
        r#"
project: scaling
provider: { kind: local }
pools:
  general: { node_type: small, min_idle: 1, max_capacity: 8, idle_timeout_minutes: 600 }
clusters:
  etl:
    pool: general
    autoscale: { min: 1, max: 3, idle_timeout_minutes: 3 }
jobs:
  slow:
    cluster: etl
    tasks:
      count:
        map: { input: "data/*.txt", partitions: 24, command: "sleep 1; awk '{ print $1 \"\t1\" }'" }
        reduce: { partitions: 2, command: "awk -F'\t' '{ n[$1] += $2 } END { for (k in n) print k \"\t\" n[k] }'" }
        output: out/counts
"#,
    );
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let mut text = String::new();
    for i in 0..480 {
        text.push_str(&format!("word{}\n", i % 12));
    }
    std::fs::write(dir.join("data/words.txt"), &text).expect("input");
    env.mp(&["apply", "--yes"]).expect_code(0);
    assert_eq!(workers_of(&env, "etl"), 1);
    let plan = env.mp(&["plan"]).expect_code(0);
    assert!(
        plan.stdout
            .contains("cluster.etl: autoscaled: 1 worker now (min 1, max 3"),
        "{}",
        plan.stdout
    );

    let controller = Controller::start(&env, &["--interval", "0.3"]);
    controller.wait_for("a pass every", Duration::from_secs(30));
    let run = env.spawn(&["run", "slow"]);
    // The controller's pass that grows the cluster holds the project lock
    // while its new workers start: an apply meanwhile waits for it (on the
    // local provider, with real agents), then finds nothing to do.
    controller.wait_for("cluster.etl: update (", Duration::from_secs(120));
    let apply = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        apply.stdout.contains("waiting for the project lock")
            && apply.stdout.contains("`motorpool controller`"),
        "the apply did not wait for the controller's pass:\n{}\n{}",
        apply.stdout,
        controller.log()
    );
    assert!(
        wait_until(Duration::from_secs(120), || workers_of(&env, "etl") == 3),
        "the cluster never grew to its max while tasks waited: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    controller.wait_for(
        "cluster.etl: autoscale 1 -> 3 workers",
        Duration::from_secs(5),
    );
    controller.wait_for("tasks waiting beyond", Duration::from_secs(5));
    let out = run.wait().expect_code(0);
    assert!(
        out.stdout.contains("job `slow` succeeded"),
        "{}",
        out.stdout
    );
    // Every word counted once: 12 words, 40 times each.
    let counts = common::read_part_files(&dir.join("out/counts"));
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert!(counts.values().all(|n| *n == 40), "{counts:?}");
    // A size the controller chose is not drift (once its pass has finished).
    assert!(
        wait_until(Duration::from_secs(30), || env
            .mp(&["plan", "--detailed-exitcode"])
            .code
            == 0),
        "{}\n{}",
        env.mp(&["plan"]).stdout,
        controller.log()
    );

    // Idle for 3 (short) minutes: back to one worker, the others back in the pool.
    let pool_before = nodes_of(&env, "pool.general");
    assert!(
        wait_until(Duration::from_secs(60), || workers_of(&env, "etl") == 1),
        "the cluster never shrank back: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    controller.wait_for(
        "cluster.etl: autoscale 3 -> 1 workers: no task ran",
        Duration::from_secs(5),
    );
    controller.wait_for(
        "returns 2 instances to pool `general`",
        Duration::from_secs(5),
    );
    assert_eq!(nodes_of(&env, "pool.general"), pool_before + 2);
    // Once the pass that shrank it has finished (the staying nodes' size
    // tag is mended after the workers are handed back), nothing is drift.
    assert!(
        wait_until(Duration::from_secs(30), || env
            .mp(&["plan", "--detailed-exitcode"])
            .code
            == 0),
        "{}\n{}",
        env.mp(&["plan"]).stdout,
        controller.log()
    );
    let plan = env.mp(&["plan"]).expect_code(0);
    assert!(
        plan.stdout
            .contains("cluster.etl: autoscaled: 1 worker now (min 1, max 3"),
        "{}",
        plan.stdout
    );
    controller.stop();
    env.destroy_leaving_nothing();
}

#[test]
fn a_cluster_whose_driver_agent_hangs_is_stopped_when_its_idle_time_is_up() {
    // A minute of the spec lasts 1 s: autotermination after 5 idle seconds.
    let env = Env::new().with_var("MOTORPOOL_MINUTE_MS", "1000");
    env.spec(
        r#"
project: hung
provider: { kind: local }
clusters:
  etl: { node_type: small, workers: 1, autotermination_minutes: 5 }
"#,
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    // The driver's agent hangs (SIGSTOP) before its own idle clock runs
    // out: its machine runs on, but nothing on it will ever stop it.
    let driver = env
        .nodes()
        .into_iter()
        .find(|n| n["role"] == "driver")
        .expect("a driver");
    let pid = driver["pid"].as_i64().expect("the driver agent's pid") as i32;
    // SAFETY: a signal to a process this test's motorpool started; no memory is touched.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let controller = Controller::start(&env, &["--interval", "0.5"]);
    controller.wait_for(
        "cluster.etl: stopping: its driver's agent has not answered",
        Duration::from_secs(60),
    );
    assert!(
        wait_until(Duration::from_secs(60), || {
            let nodes = env.nodes();
            nodes.len() == 1 && nodes[0]["state"] == "stopped"
        }),
        "the cluster was not stopped: {:?}\n{}",
        env.nodes(),
        controller.log()
    );
    // As after the driver's own autotermination: not drift, and `--start` brings it back.
    let plan = env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert!(plan.stdout.contains("stopped itself"), "{}", plan.stdout);
    controller.stop();
    env.mp(&["apply", "--yes", "--start", "etl"]).expect_code(0);
    assert_eq!(cluster_nodes(&env), 2, "{:?}", env.nodes());
    env.destroy_leaving_nothing();
}

#[test]
fn a_job_cluster_that_autoscales_grows_for_its_run_and_goes_after_it() {
    let env = Env::new().with_var("MOTORPOOL_MINUTE_MS", "1000");
    let dir = env.spec(
        r#"
project: jobscaling
provider: { kind: local }
pools:
  general: { node_type: small, min_idle: 1, max_capacity: 8, idle_timeout_minutes: 600 }
jobs:
  wide:
    new_cluster: { pool: general, autoscale: { min: 1, max: 2 } }
    tasks:
      count:
        map: { input: "data/*.txt", partitions: 16, command: "sleep 1; awk '{ print $1 \"\t1\" }'" }
        output: out/counts
"#,
    );
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let text: String = (0..160).map(|i| format!("w{}\n", i % 8)).collect();
    std::fs::write(dir.join("data/words.txt"), &text).expect("input");
    env.mp(&["apply", "--yes"]).expect_code(0);
    let controller = Controller::start(&env, &["--interval", "0.3"]);
    controller.wait_for("a pass every", Duration::from_secs(30));
    let out = env.mp(&["run", "wide"]).expect_code(0);
    assert!(
        out.stdout.contains("job `wide` succeeded"),
        "{}",
        out.stdout
    );
    controller.wait_for("-run-", Duration::from_secs(5));
    let log = controller.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cluster.wide-run-") && l.contains("autoscale 1 -> 2 workers")),
        "{log}"
    );
    // Gone with its run; its instances back in the pool, nothing left behind.
    assert_eq!(cluster_nodes(&env), 0, "{:?}", env.nodes());
    controller.stop();
    env.destroy_leaving_nothing();
}
