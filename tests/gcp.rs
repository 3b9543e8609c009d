//! The GCP provider through the CLI, as a user runs it, against the fake
//! Compute API on 127.0.0.1 (`providers/gcp/tests/support/fake_gce.py`):
//! plan -> apply -> plan -> drift -> heal -> destroy with real agents playing
//! the nodes from their startup scripts, pool instances relabelled into a
//! cluster and back, an apply killed half way, an apply through 429s, 503s
//! and lost answers, quota and capacity errors, and the runtime apply puts
//! in a `runtime_bucket` on a Cloud Storage emulator (`support/gcs.rs`).
//!
//! Each test starts its own fake (killed on drop, also on failure). Every
//! motorpool run gets an explicit loopback `endpoint_url` in the spec and no
//! Google credentials (`GOOGLE_APPLICATION_CREDENTIALS` removed,
//! `CLOUDSDK_CONFIG` pointing at an empty directory), so requests go
//! anonymous and nothing can reach Google or a metadata server.

mod common;
#[path = "../providers/gcp/tests/support/mod.rs"]
mod gce;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::machines::{FakeNodes, Machine, Machines};
use common::{Env, Run, wait_until};
use gce::gcs::{GcsEmulator, TestKey};
use gce::{FakeGce, FakeInstance, PROJECT};
use motorpool_provider::{Provider, tags};
use sha2::Digest as _;

/// Where the test specs say nodes download the runtime from: never fetched
/// (the fake runs no startup script; the machine player starts the agent itself).
const RUNTIME_URL: &str = "https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux";
const RUNTIME_SHA256: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// No Google credentials reach a test's processes.
fn without_google_credentials(cmd: &mut Command) {
    cmd.env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST")
        .env("CLOUDSDK_CONFIG", "/nonexistent/motorpool-test-gcloud");
}

fn mp(env: &Env, args: &[&str]) -> Run {
    env.mp_with(args, without_google_credentials)
}

/// A spec for motorpool project `project` on the fake; `extra` (starting
/// with `, `) adds provider settings.
fn spec(project: &str, fake: &FakeGce, extra: &str, body: &str) -> String {
    format!(
        "project: {project}\nprovider: {{ kind: gcp, project: {PROJECT}, \
         zones: [us-central1-a, us-central1-b], endpoint_url: \"{}\", \
         runtime_url: \"{RUNTIME_URL}\", runtime_sha256: {RUNTIME_SHA256}{extra} }}\n{body}",
        fake.url()
    )
}

fn with_label<'a>(list: &'a [FakeInstance], key: &str, value: &str) -> Vec<&'a FakeInstance> {
    list.iter()
        .filter(|i| i.label(key) == Some(value))
        .collect()
}

/// The exact tags motorpool keeps for an instance (labels, with the
/// metadata-held exact values over them), read with the provider.
fn tags_of(fake: &FakeGce, id: &str) -> BTreeMap<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let provider = fake.provider(|_| {});
    rt.block_on(provider.describe(&[id.to_string()]))
        .expect("describe")
        .pop()
        .map(|i| i.tags)
        .unwrap_or_default()
}

/// Real agents on the project's running instances, from the startup
/// scripts the fake holds (instance id `ZONE/NAME`, as the script would
/// learn from the metadata server).
fn machines(fake: &FakeGce, project: &str) -> Machines {
    let (port, project) = (fake.port, project.to_string());
    Machines::start(
        move || {
            FakeGce::attach(port)
                .project_instances(PROJECT, &project)
                .into_iter()
                .map(|i| Machine {
                    id: i.id(),
                    running: i.status == "RUNNING",
                    user_data: i.metadata.get(motorpool_gcp::STARTUP_SCRIPT_ITEM).cloned(),
                })
                .collect()
        },
        without_google_credentials,
    )
}

/// The project's nodes reporting warm and ready without running anything.
fn fake_nodes(fake: &FakeGce, project: &str) -> FakeNodes {
    let port = fake.port;
    FakeNodes::start(move || FakeGce::attach(port).provider(|_| {}), project)
}

fn boot_items(fake: &FakeGce) -> Vec<String> {
    let (_, body) = fake
        .http("GET", &format!("/compute/v1/projects/{PROJECT}"), &[], "")
        .expect("read the project");
    let project: serde_json::Value = serde_json::from_str(&body).expect("a project");
    project["commonInstanceMetadata"]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["key"].as_str())
        .filter(|k| k.starts_with(motorpool_gcp::BOOT_ITEM_PREFIX))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_gcp_cluster_comes_up_drifts_heals_and_goes_away() {
    let fake = FakeGce::start();
    let machines = machines(&fake, "gcplife");
    let env = Env::new();
    env.spec(&spec(
        "gcplife",
        &fake,
        ", page_size: 2, ready_timeout_minutes: 4",
        "pools:\n  general: { node_type: e2-small, min_idle: 1, max_capacity: 6 }\n\
         clusters:\n  etl: { pool: general, workers: 3, tags: { team: data } }\n",
    ));

    let plan = mp(&env, &["plan", "--detailed-exitcode"]).expect_code(2);
    // 5 e2-small at $0.016751/hour (us-central1 on-demand).
    assert!(
        plan.stdout.contains("Cost after apply: $0.08/hour"),
        "plan shows the hourly cost: {}",
        plan.stdout
    );
    let applied = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(
        applied.stdout.contains("Apply complete: 2 created"),
        "{}",
        applied.stdout
    );
    assert_eq!(
        boot_items(&fake).len(),
        1,
        "the cluster's startup is kept for drawn nodes"
    );
    // A plan observes with one paginated list: pages, not instances.
    let lists = fake.count("GET aggregated/instances");
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        fake.count("GET aggregated/instances") - lists,
        3,
        "5 instances at 2 a page: {}",
        fake.requests()
    );

    let live = fake.project_instances(PROJECT, "gcplife");
    assert_eq!(live.len(), 5, "1 idle + 1 driver + 3 workers: {live:#?}");
    assert!(live.iter().all(|i| i.status == "RUNNING"), "{live:#?}");
    assert_eq!(with_label(&live, "motorpool-role", "driver").len(), 1);
    assert_eq!(with_label(&live, "motorpool-role", "worker").len(), 3);
    assert_eq!(with_label(&live, "motorpool-role", "idle").len(), 1);
    assert!(
        live.iter()
            .all(|i| i.label("team") == Some("data") || i.label("motorpool-role") == Some("idle"))
    );
    // Each cluster node reported every startup step itself, in order, through its labels.
    for node in with_label(&live, "motorpool-kind", "cluster") {
        assert_eq!(node.label("motorpool-step"), Some("ready"), "{node:?}");
        assert_eq!(
            machines.steps_reported(&node.id()),
            ["runtime", "formation", "libraries", "security", "ready"],
            "the agent log of {}:\n{}",
            node.id(),
            machines.log(&node.id())
        );
    }
    // What a node was told: a startup script the shell accepts, fetching the
    // runtime from the spec's URL and checking its sha256.
    let script = &live[0].metadata[motorpool_gcp::STARTUP_SCRIPT_ITEM];
    common::assert_shell_parses(script);
    assert!(
        script.contains(RUNTIME_URL) && script.contains(RUNTIME_SHA256),
        "{script}"
    );
    // The driver published where it listens: a readable label, exact in metadata.
    let driver = with_label(&live, "motorpool-role", "driver")[0];
    let exact = tags_of(&fake, &driver.id());
    assert!(
        exact
            .get(tags::DRIVER_ADDRESS)
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{exact:?}"
    );
    assert!(
        driver
            .label(tags::DRIVER_ADDRESS)
            .is_some_and(|a| a.starts_with("127_0_0_1_")),
        "{driver:?}"
    );
    let status = mp(&env, &["status", "--output", "json"]).expect_code(0);
    let nodes = status.json()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nodes.len(), 5, "{nodes:#?}");
    assert!(
        nodes.iter().all(|n| n["node_type"] == "e2-small"),
        "{nodes:#?}"
    );

    // A worker is deleted behind motorpool's back: that is drift.
    let victim = with_label(&live, "motorpool-role", "worker")[0].clone();
    fake.delete(PROJECT, &victim.zone, &victim.name);
    mp(&env, &["plan", "--refresh-only", "--detailed-exitcode"]).expect_code(2);
    let drift = mp(&env, &["plan", "--detailed-exitcode", "--output", "json"]).expect_code(2);
    let plan = drift.json();
    let etl = plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["address"] == "cluster.etl")
        .cloned()
        .expect("cluster.etl in the plan");
    assert_eq!(etl["drift"], true, "{etl:#}");

    // Apply heals; then nothing is left to do, and the victim stays gone.
    mp(&env, &["apply", "--yes"]).expect_code(0);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let healed = fake.project_instances(PROJECT, "gcplife");
    assert_eq!(healed.len(), 5, "{healed:#?}");
    assert!(healed.iter().all(|i| i.id() != victim.id()));
    assert_eq!(with_label(&healed, "motorpool-role", "worker").len(), 3);
    // The heal drew the warm idle instance: its agent read the cluster's
    // startup from the project metadata and reported every step itself.
    let drawn = with_label(&healed, "motorpool-kind", "cluster")
        .into_iter()
        .find(|i| machines.log(&i.id()).contains("drawn into cluster etl"))
        .unwrap_or_else(|| panic!("no node was drawn from the pool: {healed:#?}"));
    assert_eq!(
        machines.steps_reported(&drawn.id()),
        [
            "runtime",
            "runtime",
            "formation",
            "libraries",
            "security",
            "ready"
        ],
        "warm-up, then the cluster's steps:\n{}",
        machines.log(&drawn.id())
    );

    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(
        fake.project_instances(PROJECT, "gcplife").is_empty(),
        "{:#?}",
        fake.project_instances(PROJECT, "gcplife")
    );
    assert!(
        boot_items(&fake).is_empty(),
        "the cluster's boot document went with it: {:?}",
        boot_items(&fake)
    );
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(2);
}

#[test]
fn idle_gcp_instances_join_a_cluster_and_return_when_it_goes() {
    let fake = FakeGce::start();
    let _nodes = fake_nodes(&fake, "gcppool");
    let env = Env::new();
    let pool = "pools:\n  general: { node_type: e2-small, min_idle: 2, max_capacity: 8 }\n";
    env.spec(&spec("gcppool", &fake, "", pool));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let idle: BTreeSet<String> = fake
        .project_instances(PROJECT, "gcppool")
        .iter()
        .map(FakeInstance::id)
        .collect();
    assert_eq!(idle.len(), 2);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let live = fake.project_instances(PROJECT, "gcppool");
            with_label(&live, "motorpool-step", "runtime").len() == 2
        }),
        "the idle instances never warmed up"
    );

    // A cluster draws its nodes from the pool's idle instances: relabelled, not launched.
    env.spec(&spec(
        "gcppool",
        &fake,
        "",
        &format!("{pool}clusters:\n  etl: {{ pool: general, workers: 1 }}\n"),
    ));
    let plan = mp(&env, &["plan"]).expect_code(0);
    assert!(
        plan.stdout
            .contains("takes 2 idle instances from pool `general`"),
        "{}",
        plan.stdout
    );
    mp(&env, &["apply", "--yes"]).expect_code(0);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = fake.project_instances(PROJECT, "gcppool");
    let members = with_label(&live, "motorpool-kind", "cluster");
    assert_eq!(members.len(), 2, "driver + 1 worker: {live:#?}");
    let taken: BTreeSet<String> = members.iter().map(|i| i.id()).collect();
    assert_eq!(taken, idle, "the cluster took the idle instances");
    for m in &members {
        assert_eq!(m.label("motorpool-name"), Some("etl"));
        assert_eq!(m.label("motorpool-pool"), Some("general"));
    }
    assert_eq!(
        with_label(&live, "motorpool-role", "idle").len(),
        2,
        "the pool refilled"
    );

    // The cluster goes: its instances go back to the pool.
    env.spec(&spec("gcppool", &fake, "", pool));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let live = fake.project_instances(PROJECT, "gcppool");
    assert!(
        with_label(&live, "motorpool-kind", "cluster").is_empty(),
        "{live:#?}"
    );
    for id in &taken {
        let back = live
            .iter()
            .find(|i| &i.id() == id)
            .unwrap_or_else(|| panic!("{id} was deleted instead of returned: {live:#?}"));
        assert_eq!(back.label("motorpool-kind"), Some("pool"));
        assert_eq!(back.label("motorpool-name"), Some("general"));
        assert_eq!(back.label("motorpool-role"), Some("idle"));
        assert_eq!(back.label("motorpool-pool"), None, "{back:?}");
    }
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_instances(PROJECT, "gcppool").is_empty());
}

fn many_clusters(clusters: usize, workers: usize) -> String {
    let mut s = String::from(
        "pools:\n  general: { node_type: e2-small, min_idle: 2, max_capacity: 40 }\nclusters:\n",
    );
    for i in 0..clusters {
        s.push_str(&format!(
            "  c{i}: {{ node_type: e2-small, workers: {workers} }}\n"
        ));
    }
    s
}

#[test]
fn a_gcp_apply_killed_midway_converges_when_run_again_with_no_duplicate() {
    let fake = FakeGce::start();
    // Slow operations so that the kill lands in the middle.
    fake.configure(r#"{"stage_ms": 150}"#);
    let _nodes = fake_nodes(&fake, "gcpkill");
    let env = Env::new();
    env.spec(&spec("gcpkill", &fake, "", &many_clusters(6, 2)));
    let expected = 2 + 6 * 3;

    let mut cmd = env.command(&["apply", "--yes", "--parallelism", "2"]);
    without_google_credentials(&mut cmd);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn motorpool");
    let mut first = common::ChildGuard(Some(child));
    let journal = env.project_file("gcpkill", "journal.jsonl");
    let some_done = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.matches("\"op_done\"").count() >= 3)
    });
    assert!(some_done, "the first apply made no progress");
    first.kill9();
    let partial = fake.project_instances(PROJECT, "gcpkill").len();
    assert!(
        partial < expected,
        "killed too late to test anything: {partial} instances"
    );

    let again = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(again.stdout.contains("interrupted"), "{}", again.stdout);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = fake.project_instances(PROJECT, "gcpkill");
    assert_eq!(
        live.len(),
        expected,
        "exactly the spec's instances: {live:#?}"
    );
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_instances(PROJECT, "gcpkill").is_empty());
}

#[test]
fn a_gcp_apply_converges_through_throttling_server_errors_and_lost_answers() {
    let fake = FakeGce::start();
    let _nodes = fake_nodes(&fake, "gcpfaults");
    let env = Env::new();
    env.spec(&spec("gcpfaults", &fake, "", &many_clusters(5, 2)));
    let expected = 2 + 5 * 3;
    // 20% of motorpool's calls fail: throttled, unavailable, or done with the answer lost.
    fake.configure(
        r#"{"faults": {"rate": 0.2, "kinds": ["429", "503", "lost"], "seed": 7, "methods": ["GET", "POST", "DELETE"]}}"#,
    );
    let run = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(run.stdout.contains(" retried"), "{}", run.stdout);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = fake.project_instances(PROJECT, "gcpfaults");
    assert_eq!(live.len(), expected, "no duplicate, no leak: {live:#?}");
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    fake.configure(r#"{"faults": {"rate": 0.0}}"#);
    assert!(
        fake.project_instances(PROJECT, "gcpfaults").is_empty(),
        "{:#?}",
        fake.project_instances(PROJECT, "gcpfaults")
    );
}

#[test]
fn a_zone_out_of_capacity_fails_over_and_a_quota_error_fails_clearly() {
    let fake = FakeGce::start();
    let _nodes = fake_nodes(&fake, "gcpcap");
    let env = Env::new();
    fake.configure(r#"{"exhausted_zones": ["us-central1-a"]}"#);
    env.spec(&spec(
        "gcpcap",
        &fake,
        "",
        "pools:\n  general: { node_type: e2-small, min_idle: 3, max_capacity: 6 }\n",
    ));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let live = fake.project_instances(PROJECT, "gcpcap");
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|i| i.zone == "us-central1-b"), "{live:#?}");

    // 8 n2-standard-8 (64 vCPUs) where the region allows 10 and the pool
    // holds 6: even the driver is refused, a quota error, nothing made.
    fake.configure(r#"{"exhausted_zones": [], "cpu_quota": {"us-central1": 10}}"#);
    env.spec(&spec(
        "gcpcap",
        &fake,
        "",
        "pools:\n  general: { node_type: e2-small, min_idle: 3, max_capacity: 6 }\n\
         clusters:\n  big: { node_type: n2-standard-8, workers: 7 }\n",
    ));
    let run = mp(&env, &["apply", "--yes"]).expect_code(1);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("quota exceeded") && all.contains("CPUS"),
        "{all}"
    );
    assert_eq!(fake.project_instances(PROJECT, "gcpcap").len(), 3);
    fake.configure(r#"{"cpu_quota": {"us-central1": null}}"#);
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_instances(PROJECT, "gcpcap").is_empty());
}

#[test]
fn gcp_settings_are_checked_with_their_positions() {
    let env = Env::new();
    env.spec(
        "project: gcpbad\n\
         provider: { kind: gcp, project: Bad_Project, zone: central, page_size: 900, labels: { motorpool-x: y } }\n\
         pools:\n  general: { node_type: e2-mega, max_capacity: 2 }\n",
    );
    let run = mp(&env, &["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:2:",
        "`Bad_Project` is not a GCP project id",
        "`central` is not a zone",
        "`page_size` of the gcp provider must be between 1 and 500",
        "needs `runtime_url`",
        "label `motorpool-x`",
        "unknown node type `e2-mega`",
    ] {
        assert!(
            run.stderr.contains(expected),
            "no `{expected}` in:\n{}",
            run.stderr
        );
    }
    // resources: picks the cheapest machine type that fits.
    let fake = FakeGce::start();
    env.spec(&spec(
        "gcpfit",
        &fake,
        "",
        "pools:\n  general: { resources: { cpus: 4, memory_gb: 30 }, max_capacity: 2 }\n",
    ));
    mp(&env, &["validate"]).expect_code(0);
}

#[test]
fn a_job_runs_on_a_gcp_cluster_at_the_address_its_agent_published() {
    let fake = FakeGce::start();
    let _machines = machines(&fake, "gcpjob");
    let env = Env::new();
    env.spec(&spec(
        "gcpjob",
        &fake,
        ", ready_timeout_minutes: 4",
        "clusters:\n  etl: { node_type: e2-small, workers: 1 }\n\
         jobs:\n  hello:\n    cluster: etl\n    tasks:\n      say: { command: \"echo hello from gcp\" }\n",
    ));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    // The agents' addresses travel in the instances' metadata-held tags.
    for i in fake.project_instances(PROJECT, "gcpjob") {
        let published = tags_of(&fake, &i.id());
        assert!(
            published
                .get("motorpool-agent-address")
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{published:?}"
        );
    }
    let run = mp(&env, &["run", "hello"]).expect_code(0);
    assert!(run.stdout.contains("hello from gcp"), "{}", run.stdout);
    let logs = mp(&env, &["logs", "etl"]).expect_code(0);
    assert!(logs.stdout.contains("(driver)"), "{}", logs.stdout);
    mp(&env, &["destroy", "--yes"]).expect_code(0);
}

#[test]
fn without_runtime_url_apply_puts_its_own_runtime_in_the_runtime_bucket_once() {
    let fake = FakeGce::start();
    let gcs = GcsEmulator::start();
    let key = TestKey::new();
    let env = Env::new();
    let bucket = "mp-runtime-gcprt";
    let write = |idle: u32| {
        env.spec(&format!(
            "project: gcprt\nprovider: {{ kind: gcp, project: {PROJECT}, zones: [us-central1-a], \
             endpoint_url: \"{}\", runtime_bucket: {bucket} }}\n\
             pools:\n  general: {{ node_type: e2-small, min_idle: {idle}, max_capacity: 4 }}\n",
            fake.url()
        ))
    };
    // Cloud Storage on loopback, with a service account key that can sign.
    let with_gcs = |signing: bool| {
        let (url, key) = (gcs.url(), key.path.clone());
        move |cmd: &mut Command| {
            without_google_credentials(cmd);
            cmd.env("STORAGE_EMULATOR_HOST", &url)
                .env_remove("GOOGLE_SERVICE_ACCOUNT")
                .env_remove("GOOGLE_SERVICE_ACCOUNT_KEY");
            if signing {
                cmd.env("GOOGLE_SERVICE_ACCOUNT_PATH", &key);
            } else {
                cmd.env_remove("GOOGLE_SERVICE_ACCOUNT_PATH");
            }
        }
    };
    write(1);
    // runtime_bucket stands in for runtime_url: validate asks for neither.
    let valid = env.mp_with(&["validate"], with_gcs(true)).expect_code(0);
    assert!(!valid.stderr.contains("runtime_url"), "{}", valid.stderr);

    let applied = env
        .mp_with(&["apply", "--yes"], with_gcs(true))
        .expect_code(0);
    // This very binary, stripped, once, under its version, platform and checksum.
    let objects = gcs.objects(bucket);
    assert_eq!(objects.len(), 1, "{objects:#?}\n{}", applied.stdout);
    let name = objects[0]["name"].as_str().unwrap_or_default().to_string();
    let sha = objects[0]["metadata"]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        name.starts_with("motorpool/runtime/") && name.ends_with(&format!("/{sha}/motorpool")),
        "{name}"
    );
    let generation = objects[0]["generation"].clone();
    let (_, made) = gcs.json(&format!("/storage/v1/b/{bucket}"));
    assert_eq!(made["labels"]["motorpool-project"], "gcprt", "{made}");

    // The node was told a signed URL of that object and its checksum, and
    // the URL serves exactly that file.
    let live = fake.project_instances(PROJECT, "gcprt");
    assert_eq!(live.len(), 1, "{live:#?}");
    let script = &live[0].metadata[motorpool_gcp::STARTUP_SCRIPT_ITEM];
    common::assert_shell_parses(script);
    let prefix = format!("{}/{bucket}/{name}?", gcs.url());
    let start = script
        .find(&prefix)
        .unwrap_or_else(|| panic!("no {prefix} in:\n{script}"));
    let url: String = script[start..]
        .chars()
        .take_while(|c| !matches!(c, '\'' | '"') && !c.is_whitespace())
        .collect();
    assert!(
        url.contains("X-Goog-Algorithm=GOOG4-RSA-SHA256") && url.contains("X-Goog-Expires=86400"),
        "{url}"
    );
    assert!(script.contains(&sha), "{script}");
    let (status, _, body) =
        gce::gcs::http_get(gcs.port, &url[gcs.url().len()..]).expect("download");
    assert_eq!(status, 200);
    let got: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, sha);

    // A second apply that launches again uploads nothing new.
    write(2);
    env.mp_with(&["apply", "--yes"], with_gcs(true))
        .expect_code(0);
    let objects = gcs.objects(bucket);
    assert_eq!(objects.len(), 1, "{objects:#?}");
    assert_eq!(objects[0]["generation"], generation, "uploaded again");
    let live = fake.project_instances(PROJECT, "gcprt");
    assert_eq!(live.len(), 2);
    assert!(live.iter().all(|i| {
        i.metadata[motorpool_gcp::STARTUP_SCRIPT_ITEM]
            .contains(&format!("{}/{bucket}/{name}?", gcs.url()))
    }));

    // Credentials that cannot sign: the apply stops before launching,
    // saying what to set.
    write(3);
    let refused = env
        .mp_with(&["apply", "--yes"], with_gcs(false))
        .expect_code(1);
    for part in [
        "service account key",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "runtime_url",
    ] {
        assert!(
            refused.stderr.contains(part),
            "{part:?} in:\n{}",
            refused.stderr
        );
    }
    assert_eq!(fake.project_instances(PROJECT, "gcprt").len(), 2);

    env.mp_with(&["destroy", "--yes"], with_gcs(true))
        .expect_code(0);
    assert!(fake.project_instances(PROJECT, "gcprt").is_empty());
}
