//! Cluster startup on the local provider, through the CLI: the seven steps,
//! libraries from PyPI, init scripts, credentials, warm pools, autotermination.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Env, wait_until};
use motorpool::agent::proto::{DriverStatusRequest, GetStateRequest};
use motorpool::auth::{self, Credential};

const SEVEN: [&str; 7] = [
    "request",
    "allocate",
    "runtime",
    "formation",
    "libraries",
    "security",
    "ready",
];

fn node_dir(env: &Env, id: &str) -> PathBuf {
    env.home().join("local").join("instances").join(id)
}

fn secret(env: &Env, project: &str) -> Credential {
    let text =
        std::fs::read_to_string(env.project_file(project, "secret")).expect("project secret");
    Credential::new(text.trim())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

fn cluster_nodes(env: &Env, cluster: &str) -> Vec<serde_json::Value> {
    env.nodes()
        .into_iter()
        .filter(|n| n["resource"] == format!("cluster.{cluster}"))
        .collect()
}

#[test]
fn a_cluster_starts_in_seven_ordered_steps_with_libraries_init_scripts_and_mounts() {
    let env = Env::new();
    let dir = env.spec(
        r#"
project: startup
clusters:
  etl:
    node_type: small
    workers: 3
    libraries: [ { pip: "six==1.16.0" } ]
    init_scripts: [ scripts/hello.sh ]
    env: { GREETING: "it's $(not a command)" }
    mounts: [ { source: ./data, target: /mnt/data } ]
"#,
    );
    std::fs::create_dir_all(dir.join("scripts")).expect("mkdir");
    std::fs::write(
        dir.join("scripts/hello.sh"),
        "echo \"hello from init: $GREETING\"\n",
    )
    .expect("script");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    std::fs::write(dir.join("data/words.txt"), "a b c\n").expect("data");

    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);

    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 4);
    for n in &nodes {
        let id = n["id"].as_str().expect("id");
        assert_eq!(n["step"], "ready", "{n:#}");
        // The seven steps, in order, all ok.
        let steps: Vec<&str> = n["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter(|s| s["status"] == "ok")
            .filter_map(|s| s["step"].as_str())
            .filter(|s| SEVEN.contains(s))
            .collect();
        assert_eq!(steps, SEVEN, "node {id}: {n:#}");
        // The PyPI library is importable with the node's own Python.
        let python = node_dir(&env, id).join("runtime/venv/bin/python");
        let out = std::process::Command::new(&python)
            .args(["-c", "import six; print(six.__version__)"])
            .output()
            .expect("node python");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1.16.0",
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The mount is linked into the node.
        let mounted = node_dir(&env, id).join("fs/mnt/data/words.txt");
        assert_eq!(
            std::fs::read_to_string(&mounted).expect("mounted file"),
            "a b c\n"
        );
    }

    // Every executor registered with the driver, which refuses calls without the credential.
    let driver = nodes
        .iter()
        .find(|n| n["role"] == "driver")
        .expect("driver");
    let agent_address = driver["address"].as_str().expect("address").to_string();
    let secret = secret(&env, "startup");
    runtime().block_on(async {
        let agent_credential = auth::derive(&secret, "agent/startup");
        let mut agent = motorpool::bootstrap::run::connect(&agent_address, &agent_credential)
            .await
            .expect("connect");
        let status = agent
            .driver_status(DriverStatusRequest {})
            .await
            .expect("driver status")
            .into_inner();
        assert_eq!(status.executors.len(), 3, "{status:?}");

        // No credential, or the wrong one: refused by the agent.
        for bad in [None, Some(Credential::new("wrong"))] {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{agent_address}"))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
            let result = match bad {
                None => motorpool::agent::AgentClient::new(channel)
                    .get_state(GetStateRequest {})
                    .await
                    .map(|_| ()),
                Some(c) => motorpool::agent::AgentClient::with_interceptor(
                    channel,
                    auth::AttachCredential(c),
                )
                .get_state(GetStateRequest {})
                .await
                .map(|_| ()),
            };
            assert_eq!(
                result.expect_err("refused").code(),
                tonic::Code::Unauthenticated
            );
        }
        // The driver itself refuses a call without the cluster credential.
        let state = agent
            .get_state(GetStateRequest {})
            .await
            .expect("state")
            .into_inner();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", state.driver_address))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect to driver");
        let refused = motorpool::runtime::proto::driver_client::DriverClient::new(channel)
            .cluster_status(motorpool::runtime::proto::ClusterStatusRequest {})
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    });

    // The init script's output is in the logs, with the env value intact (not run by a shell).
    let logs = env.mp(&["logs", "etl"]).expect_code(0);
    assert!(
        logs.stdout
            .contains("hello from init: it's $(not a command)"),
        "{}",
        logs.stdout
    );
    // Secrets never show: not the project secret, not any credential.
    let all_output = [
        env.mp(&["plan", "--output", "json"]).stdout,
        env.mp(&["status", "--output", "json"]).stdout,
        logs.stdout.clone(),
    ]
    .join("\n");
    let cluster_credential = auth::cluster_credential(&secret, "startup", "etl");
    for s in [
        secret.expose(),
        auth::derive(&secret, "agent/startup").expose(),
        cluster_credential.expose(),
    ] {
        assert!(
            !all_output.contains(s),
            "a secret leaked into plan/status/logs output"
        );
    }
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn a_failing_init_script_fails_startup_with_its_stderr_and_the_next_apply_converges() {
    let env = Env::new();
    let dir = env.spec(
        r#"
project: initfail
clusters:
  etl: { node_type: small, workers: 1, init_scripts: [ setup.sh ] }
"#,
    );
    std::fs::write(dir.join("setup.sh"), "echo 'disk not ready' >&2\nexit 3\n").expect("script");
    let failed = env.mp(&["apply", "--yes"]).expect_code(1);
    let text = format!("{}{}", failed.stdout, failed.stderr);
    assert!(text.contains("init:setup.sh"), "{text}");
    assert!(text.contains("disk not ready"), "{text}");
    assert!(text.contains("exit 3"), "{text}");
    // The plan knows startup did not finish.
    let plan = env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    assert!(
        plan.stdout.contains("startup incomplete"),
        "{}",
        plan.stdout
    );

    std::fs::write(dir.join("setup.sh"), "echo fixed\n").expect("script");
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        cluster_nodes(&env, "etl").len(),
        2,
        "the same cluster, not a second one"
    );
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn a_warm_pool_hands_out_set_up_nodes_and_refills_in_the_background() {
    let env = Env::new();
    env.spec(
        r#"
project: warm
pools:
  general: { node_type: small, min_idle: 3, max_capacity: 8 }
"#,
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    // The idle instances warm themselves; meanwhile plan calls them warming, not drift.
    let early = env.mp(&["plan", "--detailed-exitcode"]);
    assert!(early.code == 0, "{}", early.stdout);
    assert!(
        wait_until(Duration::from_secs(60), || {
            env.nodes()
                .iter()
                .filter(|n| n["step"] == "runtime")
                .count()
                == 3
        }),
        "pool never warmed: {:#?}",
        env.nodes()
    );

    env.spec(
        r#"
project: warm
pools:
  general: { node_type: small, min_idle: 3, max_capacity: 8 }
clusters:
  etl: { pool: general, workers: 2 }
"#,
    );
    let applied = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        applied
            .stdout
            .contains("takes 3 idle instances from pool `general`"),
        "{}",
        applied.stdout
    );
    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        // Runtime setup was done ahead of time: skipped at startup.
        let runtime_ms = n["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["step"] == "runtime"))
            .and_then(|s| s["duration_ms"].as_u64())
            .expect("runtime step");
        assert!(n["step"] == "ready", "{n:#}");
        let _ = runtime_ms;
    }
    // The pool refilled with new instances that warm up on their own.
    let idle = env
        .nodes()
        .into_iter()
        .filter(|n| n["resource"] == "pool.general")
        .count();
    assert_eq!(idle, 3);
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn an_idle_cluster_stops_itself_and_stays_stopped_until_asked() {
    let env = Env::new();
    env.spec(
        r#"
project: idle
pools:
  general: { node_type: small, min_idle: 0, max_capacity: 6, idle_timeout_minutes: 60 }
clusters:
  etl: { pool: general, workers: 2, autotermination_minutes: 1 }
"#,
    );
    // A "minute" of 400 ms for this test's agents.
    let mut apply = env.command(&["apply", "--yes"]);
    apply.env("MOTORPOOL_MINUTE_MS", "400");
    let out = apply.output().expect("apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stopped = wait_until(Duration::from_secs(30), || {
        env.nodes().iter().any(|n| {
            n["resource"] == "cluster.etl" && n["role"] == "driver" && n["state"] == "stopped"
        })
    });
    assert!(
        stopped,
        "the cluster never stopped itself: {:#?}",
        env.nodes()
    );
    let nodes = env.nodes();
    // Its workers went back to the pool, warm.
    let back: Vec<_> = nodes
        .iter()
        .filter(|n| n["resource"] == "pool.general")
        .collect();
    assert_eq!(back.len(), 2, "{nodes:#?}");

    // On purpose, not drift: neither plan nor the drift check wants to change it.
    let plan = env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert!(plan.stdout.contains("stopped itself"), "{}", plan.stdout);
    env.mp(&["plan", "--refresh-only", "--detailed-exitcode"])
        .expect_code(0);

    // Asked to, apply starts it again, drawing the workers back from the pool.
    let again = env.mp(&["apply", "--yes", "--start", "etl"]).expect_code(0);
    assert!(again.stdout.contains("starts again"), "{}", again.stdout);
    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "running" && n["step"] == "ready"),
        "{nodes:#?}"
    );
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

#[test]
fn with_tls_forced_a_cluster_starts_and_only_clients_of_the_project_ca_get_in() {
    // Forced on loopback: every agent, driver and executor serves TLS, and
    // every client (CLI, executors, agents) verifies it against the project CA.
    let env = Env::new().with_var("MOTORPOOL_TLS", "always");
    env.spec(
        r#"
project: tls
clusters:
  etl: { node_type: small, workers: 2 }
"#,
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        assert_eq!(n["step"], "ready", "{n:#}");
        // status read the steps from the agent, over TLS.
        let steps = n["steps"].as_array().map_or(0, |s| s.len());
        assert!(steps >= SEVEN.len(), "{n:#}");
        let id = n["id"].as_str().expect("id");
        let log = std::fs::read_to_string(node_dir(&env, id).join("agent.log")).expect("log");
        assert!(log.contains("(TLS)"), "{log}");
    }
    let driver = nodes
        .iter()
        .find(|n| n["role"] == "driver")
        .expect("driver");
    let address = driver["address"].as_str().expect("address").to_string();
    let secret = secret(&env, "tls");
    let ca = motorpool::tls::ProjectCa::derive(&secret).expect("project CA");
    let trusted = auth::derive(&secret, "agent/tls").with_trust(ca.trust().always(true));

    runtime().block_on(async {
        // The project's CA: in. The driver's executors registered over TLS too.
        let mut agent = motorpool::bootstrap::run::connect(&address, &trusted)
            .await
            .expect("connect over TLS");
        let status = agent
            .driver_status(DriverStatusRequest {})
            .await
            .expect("driver status")
            .into_inner();
        assert_eq!(status.executors.len(), 2, "{status:?}");
        let state = agent
            .get_state(GetStateRequest {})
            .await
            .expect("state")
            .into_inner();

        // Plaintext, even with the right credential: no answer.
        let plaintext = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            motorpool::agent::AgentClient::with_interceptor(
                channel,
                auth::AttachCredential(trusted.clone()),
            )
            .get_state(GetStateRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(plaintext.await.is_err(), "a plaintext client got in");

        // Another project's CA (another secret): the handshake fails, whatever the credential.
        let other = motorpool::tls::ProjectCa::derive(&Credential::new("another project"))
            .expect("other CA");
        let untrusting = auth::derive(&secret, "agent/tls").with_trust(other.trust().always(true));
        let refused = match motorpool::bootstrap::run::connect(&address, &untrusting).await {
            Err(e) => e.to_string(),
            Ok(mut a) => a
                .get_state(GetStateRequest {})
                .await
                .expect_err("a client of another CA got in")
                .to_string(),
        };
        assert!(
            refused.to_lowercase().contains("certificate")
                || refused.to_lowercase().contains("issuer"),
            "{refused}"
        );

        // The driver: TLS with the cluster credential gets in, plaintext does not.
        let cluster =
            auth::cluster_credential(&secret, "tls", "etl").with_trust(ca.trust().always(true));
        let mut client = motorpool::runtime::connect_driver(&state.driver_address, &cluster)
            .await
            .expect("driver over TLS");
        client
            .cluster_status(motorpool::runtime::proto::ClusterStatusRequest {})
            .await
            .expect("cluster status over TLS");
        let plain_driver = async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", state.driver_address))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
            motorpool::runtime::proto::driver_client::DriverClient::with_interceptor(
                channel,
                auth::AttachCredential(cluster.clone()),
            )
            .cluster_status(motorpool::runtime::proto::ClusterStatusRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(
            plain_driver.await.is_err(),
            "a plaintext client reached the driver"
        );

        // A job runs: tasks pushed to both executors, map output fetched
        // between them (shuffle), results back to this client, all over TLS.
        let job_dir = tempfile::tempdir().expect("job dir");
        std::fs::create_dir_all(job_dir.path().join("data")).expect("mkdir");
        std::fs::write(job_dir.path().join("data/a.txt"), "b a\nc a\n").expect("input");
        std::fs::write(job_dir.path().join("data/b.txt"), "a b\n").expect("input");
        let mut job = motorpool::spec::Job::default();
        job.tasks.insert(
            "count".into(),
            motorpool::spec::Task {
                map: Some(motorpool::spec::MapStage {
                    input: "data/*.txt".into(),
                    command: Some(r#"tr ' ' '\n' | awk 'NF { print $1 "\t1" }'"#.into()),
                    partitions: Some(2),
                    ..Default::default()
                }),
                reduce: Some(motorpool::spec::ReduceStage {
                    partitions: Some(2),
                    command: Some(
                        r#"awk -F'\t' '{ c[$1] += $2 } END { for (k in c) print k "\t" c[k] }'"#
                            .into(),
                    ),
                    ..Default::default()
                }),
                output: Some("out".into()),
                ..Default::default()
            },
        );
        let summary = motorpool::runtime::client::run_job(
            &state.driver_address,
            &cluster,
            motorpool::runtime::client::JobSubmission {
                name: "wc".into(),
                job,
                base_dir: job_dir.path().to_path_buf(),
                env: Default::default(),
                exclude: Vec::new(),
            },
            |_| {},
        )
        .await
        .expect("the job ran over TLS");
        assert!(summary.ok, "{summary:?}");
        let mut counts: Vec<String> = std::fs::read_dir(job_dir.path().join("out"))
            .expect("output")
            .flatten()
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        counts.sort();
        assert_eq!(counts, ["a\t3", "b\t2", "c\t1"]);
    });

    // The node key is in the node's private config only: never in any output.
    let node = ca.node_tls(true).expect("node tls");
    let key_body: String = node
        .key
        .expose()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let outputs = [
        env.mp(&["plan", "--output", "json"]).stdout,
        env.mp(&["status", "--output", "json"]).stdout,
        env.mp(&["logs", "etl"]).expect_code(0).stdout,
    ]
    .join("\n");
    assert!(!outputs.contains(&key_body), "the node key leaked");
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

/// The `runtime` step record in a node's `state.json`.
fn runtime_record(env: &Env, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(node_dir(env, id).join("state.json")).expect("state.json");
    let state: serde_json::Value = serde_json::from_str(&text).expect("state.json is JSON");
    state["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == "runtime"))
        .cloned()
        .unwrap_or_else(|| panic!("{id} has no runtime step: {state:#}"))
}

#[test]
fn a_stopped_warm_pool_keeps_its_set_up_and_starts_its_instances_for_a_cluster() {
    let env = Env::new();
    let pool = r#"
project: cold
pools:
  general: { node_type: small, min_idle: 2, max_capacity: 6, warm: stopped }
"#;
    env.spec(pool);
    env.mp(&["apply", "--yes"]).expect_code(0);
    // Filled, warmed up, then stopped: no agent process runs, the directories stay.
    let idle: Vec<serde_json::Value> = env
        .nodes()
        .into_iter()
        .filter(|n| n["resource"] == "pool.general")
        .collect();
    assert_eq!(idle.len(), 2, "{idle:#?}");
    let mut warmed = Vec::new();
    for n in &idle {
        let id = n["id"].as_str().expect("id").to_string();
        assert_eq!(n["state"], "stopped", "{n:#}");
        assert_eq!(n["step"], "runtime", "warm before it stopped: {n:#}");
        if let Some(pid) = n["pid"].as_i64() {
            assert!(!common::is_alive(pid as i32), "{id}'s agent still runs");
        }
        assert!(node_dir(&env, &id).join("runtime/venv/bin/python").exists());
        let record = runtime_record(&env, &id);
        assert_eq!(record["status"], "ok", "{record:#}");
        warmed.push((id, record));
    }
    assert!(
        env.processes().is_empty(),
        "agents of a stopped pool still run: {:?}",
        env.processes()
    );
    // Stopped on purpose: not drift.
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);

    // A cluster draws them: started, ready, without running the warm-up again.
    env.spec(&format!(
        "{pool}clusters:\n  etl: {{ pool: general, workers: 1 }}\n"
    ));
    let applied = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        applied
            .stdout
            .contains("takes 2 idle instances from pool `general`"),
        "{}",
        applied.stdout
    );
    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 2, "{nodes:#?}");
    for n in &nodes {
        let id = n["id"].as_str().expect("id");
        assert_eq!(n["state"], "running", "{n:#}");
        assert_eq!(n["step"], "ready", "{n:#}");
        let (_, before) = warmed
            .iter()
            .find(|(w, _)| w == id)
            .unwrap_or_else(|| panic!("{id} was not one of the warm instances"));
        assert_eq!(
            &runtime_record(&env, id),
            before,
            "{id} ran its runtime setup again"
        );
        // Started again, the agent neither repeated its warm-up nor re-tagged itself warm.
        let log = std::fs::read_to_string(node_dir(&env, id).join("agent.log")).expect("log");
        assert!(log.contains("warm-up already done"), "{log}");
    }
    // The pool refills (stopped again); afterwards nothing is left to do.
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    let refilled: Vec<serde_json::Value> = env
        .nodes()
        .into_iter()
        .filter(|n| n["resource"] == "pool.general")
        .collect();
    assert_eq!(refilled.len(), 2, "{refilled:#?}");
    assert!(
        refilled.iter().all(|n| n["state"] == "stopped"),
        "{refilled:#?}"
    );
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

/// Kills, when dropped, every process whose command line mentions the text.
struct KillMentioning(&'static str);

impl Drop for KillMentioning {
    fn drop(&mut self) {
        for pid in common::processes_mentioning(self.0) {
            // SAFETY: sends a signal to a process; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn an_init_script_past_its_startup_timeout_fails_startup_naming_the_script() {
    // A "minute" of 5 seconds for this test's step timeouts. The nodes come
    // from a warm pool (its runtime setup under the default 30 minutes), so
    // the short timeout meets only the init scripts, however busy the machine.
    let env = Env::new().with_var("MOTORPOOL_MINUTE_MS", "5000");
    // Declared after `env`, so dropped first: the script's processes go even if this test fails.
    let _sleepers = KillMentioning("sleep 97");
    let pool = r#"
project: slow
pools:
  general: { node_type: small, min_idle: 2, max_capacity: 4 }
"#;
    env.spec(pool);
    env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        wait_until(Duration::from_secs(90), || {
            env.nodes()
                .iter()
                .filter(|n| n["step"] == "runtime")
                .count()
                == 2
        }),
        "pool never warmed: {:#?}",
        env.nodes()
    );
    let dir = env.spec(&format!(
        "{pool}clusters:\n  etl:\n    pool: general\n    workers: 1\n    startup_timeout_minutes: 1\n    init_scripts: [ quick.sh, hang.sh ]\n"
    ));
    std::fs::write(dir.join("quick.sh"), "echo quick\n").expect("script");
    // `sleep 97` marks the script's own processes: they must die with the step.
    std::fs::write(
        dir.join("hang.sh"),
        "echo started\n(sleep 97; echo survived) &\nsleep 97\n",
    )
    .expect("script");
    let started = std::time::Instant::now();
    let failed = env.mp(&["apply", "--yes"]).expect_code(1);
    let text = format!("{}{}", failed.stdout, failed.stderr);
    assert!(
        text.contains("step init:hang.sh timed out on node"),
        "{text}"
    );
    assert!(text.contains("after 5s"), "{text}");
    assert!(text.contains("startup_timeout_minutes"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(80),
        "startup waited for the script instead of its timeout: {:?}",
        started.elapsed()
    );
    // Nothing the script started lives on, and its log says why it stopped.
    let leftovers = common::processes_mentioning("sleep 97");
    assert!(
        leftovers.is_empty(),
        "the step's children outlived it: {leftovers:?}"
    );
    for n in cluster_nodes(&env, "etl") {
        let id = n["id"].as_str().expect("id");
        let log = std::fs::read_to_string(node_dir(&env, id).join("steps/init_hang.sh.log"))
            .expect("step log");
        assert!(log.contains("timed out after 5s"), "{log}");
    }
    // The plan knows startup did not finish.
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

/// A secret env value reaches the nodes' init scripts (through their
/// private configs) while the plan shows `(secret)` and never the value.
#[test]
fn a_secret_env_value_reaches_the_nodes_but_no_plan_or_log() {
    let env = Env::new().with_var("MP_TEST_STARTUP_PASSWORD", "s3cr3t-for-the-node");
    let dir = env.spec(
        r#"
project: secretnode
clusters:
  etl:
    node_type: small
    workers: 1
    init_scripts: [ keep.sh ]
    env:
      DB_PASSWORD: { secret: true, from_env: MP_TEST_STARTUP_PASSWORD }
"#,
    );
    std::fs::write(
        dir.join("keep.sh"),
        "printf '%s' \"$DB_PASSWORD\" > \"$MOTORPOOL_NODE_DIR/seen\"\necho kept\n",
    )
    .expect("script");
    let plan = env.mp(&["plan", "--output", "json"]).expect_code(0).stdout;
    assert!(plan.contains("(secret)"), "{plan}");
    env.mp(&["apply", "--yes"]).expect_code(0);
    let nodes = cluster_nodes(&env, "etl");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    for node in &nodes {
        let id = node["id"].as_str().expect("id");
        let seen = std::fs::read_to_string(node_dir(&env, id).join("seen")).expect("seen");
        assert_eq!(seen, "s3cr3t-for-the-node");
    }
    let outputs = [
        plan,
        env.mp(&["plan", "--output", "json"]).stdout,
        env.mp(&["plan", "--output", "markdown"]).stdout,
        env.mp(&["logs", "etl"]).stdout,
        env.mp(&["status", "--output", "json"]).stdout,
    ];
    for output in &outputs {
        assert!(!output.contains("s3cr3t-for-the-node"), "{output}");
    }
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    env.mp(&["destroy", "--yes"]).expect_code(0);
}
