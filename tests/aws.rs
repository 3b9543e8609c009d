//! The AWS provider through the CLI, as a user runs it, against moto's EC2
//! server on 127.0.0.1: plan -> apply -> plan -> drift -> heal -> destroy,
//! pool instances re-tagged into a cluster and back, an apply killed half way,
//! and an apply through a proxy that throttles and fails.
//!
//! Each test starts its own moto (killed on drop, also on failure). Every
//! motorpool run gets fake static credentials, a region, an explicit loopback
//! endpoint (in the spec, or `AWS_ENDPOINT_URL`) and
//! `AWS_EC2_METADATA_DISABLED=true`, so nothing can reach AWS or IMDS.

mod common;
#[path = "../providers/aws/tests/support/mod.rs"]
mod moto;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::machines::{FakeNodes, Machine, Machines};
use common::{Env, Run, wait_until};
use moto::{AMI, FaultProxy, Faults, Moto};
use motorpool_aws::aws_sdk_ec2::types::{Filter, InstanceAttributeName};

/// Run motorpool with the test AWS environment (endpoint: the spec's, or
/// `endpoint` as `AWS_ENDPOINT_URL` when given).
fn mp(env: &Env, endpoint: Option<&str>, args: &[&str]) -> Run {
    env.mp_with(args, |cmd| moto::with_aws_env(cmd, endpoint))
}

/// Where the test specs say nodes download the runtime from: never fetched
/// (moto runs no user data; the node player starts the agent itself).
const RUNTIME_URL: &str = "https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux";
const RUNTIME_SHA256: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

fn spec(project: &str, endpoint: Option<&str>, body: &str) -> String {
    spec_with(project, endpoint, "", body)
}

/// [`spec`] with more provider settings (`extra` starts with `, `).
fn spec_with(project: &str, endpoint: Option<&str>, extra: &str, body: &str) -> String {
    let endpoint = endpoint
        .map(|e| format!(", endpoint_url: \"{e}\""))
        .unwrap_or_default();
    format!(
        "project: {project}\nprovider: {{ kind: aws, region: {}, image: {AMI}, page_size: 5{endpoint}, \
         runtime_url: \"{RUNTIME_URL}\", runtime_sha256: {RUNTIME_SHA256}{extra} }}\n{body}",
        moto::REGION
    )
}

/// One instance as EC2 (moto) reports it, read with the SDK directly.
#[derive(Debug, Clone)]
struct Ec2Instance {
    id: String,
    state: String,
    tags: BTreeMap<String, String>,
}

/// Reads and changes EC2 behind motorpool's back.
struct Ec2 {
    rt: tokio::runtime::Runtime,
    client: motorpool_aws::aws_sdk_ec2::Client,
}

impl Ec2 {
    fn new(moto: &Moto) -> Ec2 {
        Ec2::at(&moto.url())
    }

    fn at(url: &str) -> Ec2 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let provider = moto::provider(url, |_| {});
        let client = rt.block_on(provider.ec2_client()).expect("an EC2 client");
        Ec2 { rt, client }
    }

    /// The names of every launch template.
    fn launch_templates(&self) -> Vec<String> {
        self.rt
            .block_on(self.client.describe_launch_templates().send())
            .expect("describe launch templates")
            .launch_templates()
            .iter()
            .filter_map(|t| t.launch_template_name().map(str::to_string))
            .collect()
    }

    /// The user data EC2 holds for instance `id`, decoded; None without any.
    fn user_data(&self, id: &str) -> Option<String> {
        let out = self
            .rt
            .block_on(
                self.client
                    .describe_instance_attribute()
                    .instance_id(id)
                    .attribute(InstanceAttributeName::UserData)
                    .send(),
            )
            .ok()?;
        let encoded = out.user_data()?.value()?;
        String::from_utf8(base64_decode(encoded)?).ok()
    }

    /// Every instance of `project` in every state, all pages.
    fn instances(&self, project: &str) -> Vec<Ec2Instance> {
        self.rt.block_on(async {
            let mut all = Vec::new();
            let mut token = None;
            loop {
                let out = self
                    .client
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name("tag:motorpool-project")
                            .values(project)
                            .build(),
                    )
                    .set_next_token(token)
                    .send()
                    .await
                    .expect("describe instances");
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    all.push(Ec2Instance {
                        id: i.instance_id().unwrap_or_default().to_string(),
                        state: i
                            .state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_string())
                            .unwrap_or_default(),
                        tags: i
                            .tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                            .collect(),
                    });
                }
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return all,
                }
            }
        })
    }

    /// The project's instances that are not terminated (or terminating).
    fn live(&self, project: &str) -> Vec<Ec2Instance> {
        self.instances(project)
            .into_iter()
            .filter(|i| i.state != "terminated" && i.state != "shutting-down")
            .collect()
    }

    fn terminate(&self, id: &str) {
        self.rt.block_on(async {
            self.client
                .terminate_instances()
                .instance_ids(id)
                .send()
                .await
                .expect("terminate behind motorpool's back");
        });
    }
}

/// Plays the node side while a test runs, as each node's agent will on a real
/// instance: it tags its own instance with the last startup step it finished
/// (`motorpool-step`): `runtime` once an idle pool instance has warmed up,
/// `ready` once a cluster node has started. moto runs no user data, so this
/// stands in for it. Stopped on drop.
fn fake_nodes(moto: &Moto, project: &str) -> FakeNodes {
    let url = moto.url();
    FakeNodes::start(move || moto::provider(&url, |_| {}), project)
}

/// The project's instances as machines, with the user data moto holds
/// (DescribeInstanceAttribute userData) for the running ones.
fn project_machines(moto: &Moto, project: &str) -> impl FnMut() -> Vec<Machine> + Send + 'static {
    let (url, project) = (moto.url(), project.to_string());
    let mut ec2: Option<Ec2> = None;
    move || {
        let ec2 = ec2.get_or_insert_with(|| Ec2::at(&url));
        ec2.instances(&project)
            .into_iter()
            .map(|i| Machine {
                running: i.state == "running",
                user_data: if i.state == "running" {
                    ec2.user_data(&i.id)
                } else {
                    None
                },
                id: i.id,
            })
            .collect()
    }
}

/// Plays the machines, not the nodes: real agents on the project's running
/// instances, from the user data moto holds (DescribeInstanceAttribute
/// userData), with the test's AWS environment (endpoint: moto).
fn machines(moto: &Moto, project: &str) -> Machines {
    let agent_url = moto.url();
    Machines::start(project_machines(moto, project), move |cmd| {
        moto::with_aws_env(cmd, Some(&agent_url))
    })
}

/// Standard base64 (what EC2 returns user data in), for the node player.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn with_tag<'a>(list: &'a [Ec2Instance], key: &str, value: &str) -> Vec<&'a Ec2Instance> {
    list.iter()
        .filter(|i| i.tags.get(key).map(String::as_str) == Some(value))
        .collect()
}

fn retried(run: &Run) -> u64 {
    run.stdout
        .split(" retried")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary counts retries: {}", run.stdout))
}

#[test]
fn an_aws_cluster_comes_up_drifts_heals_and_goes_away() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    // Real agents on every machine: the cluster is ready only when they say so.
    let machines = machines(&moto, "awslife");
    let env = Env::new();
    env.spec(&spec_with(
        "awslife",
        Some(&moto.url()),
        ", ready_timeout_minutes: 4",
        "pools:\n  general: { node_type: t3.micro, min_idle: 1, max_capacity: 6 }\n\
         clusters:\n  etl: { pool: general, workers: 2, tags: { team: data } }\n",
    ));

    let plan = mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(2);
    // 4 t3.micro at $0.0104/hour (us-east-1 on-demand).
    assert!(
        plan.stdout.contains("Cost after apply: $0.04/hour"),
        "plan shows the hourly cost: {}",
        plan.stdout
    );
    let applied = mp(&env, None, &["apply", "--yes"]).expect_code(0);
    assert!(
        applied.stdout.contains("Apply complete: 2 created"),
        "{}",
        applied.stdout
    );
    mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(0);

    let live = ec2.live("awslife");
    assert_eq!(live.len(), 4, "1 idle + 1 driver + 2 workers: {live:#?}");
    assert!(live.iter().all(|i| i.state == "running"), "{live:#?}");
    assert_eq!(with_tag(&live, "motorpool-role", "driver").len(), 1);
    assert_eq!(with_tag(&live, "motorpool-role", "worker").len(), 2);
    assert_eq!(with_tag(&live, "motorpool-role", "idle").len(), 1);
    // Each cluster node reported every startup step itself, in order, through its tags.
    for node in with_tag(&live, "motorpool-kind", "cluster") {
        assert_eq!(
            node.tags.get("motorpool-step").map(String::as_str),
            Some("ready"),
            "{node:?}"
        );
        assert_eq!(
            machines.steps_reported(&node.id),
            ["runtime", "formation", "libraries", "security", "ready"],
            "the agent log of {}:\n{}",
            node.id,
            machines.log(&node.id)
        );
    }
    let driver = with_tag(&live, "motorpool-role", "driver")[0];
    assert!(
        driver
            .tags
            .get("motorpool-driver-address")
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "the driver published where it listens: {driver:?}"
    );
    let status = mp(&env, None, &["status", "--output", "json"]).expect_code(0);
    let nodes = status.json()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nodes.len(), 4, "{nodes:#?}");
    assert!(
        nodes.iter().all(|n| n["node_type"] == "t3.micro"),
        "{nodes:#?}"
    );

    // A worker is terminated behind motorpool's back: that is drift.
    let victim = with_tag(&live, "motorpool-role", "worker")[0].id.clone();
    ec2.terminate(&victim);
    mp(
        &env,
        None,
        &["plan", "--refresh-only", "--detailed-exitcode"],
    )
    .expect_code(2);
    let drift = mp(
        &env,
        None,
        &["plan", "--detailed-exitcode", "--output", "json"],
    )
    .expect_code(2);
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
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(0);
    let healed = ec2.live("awslife");
    assert_eq!(healed.len(), 4, "{healed:#?}");
    assert!(healed.iter().all(|i| i.id != victim));
    assert_eq!(with_tag(&healed, "motorpool-role", "worker").len(), 2);
    // The heal drew the warm idle instance: its agent read the cluster's
    // startup from the launch template and reported every step itself.
    let drawn = with_tag(&healed, "motorpool-kind", "cluster")
        .into_iter()
        .find(|i| machines.log(&i.id).contains("drawn into cluster etl"))
        .unwrap_or_else(|| panic!("no node was drawn from the pool: {healed:#?}"));
    assert_eq!(
        machines.steps_reported(&drawn.id),
        [
            "runtime",
            "runtime",
            "formation",
            "libraries",
            "security",
            "ready"
        ],
        "warm-up, then the cluster's steps:\n{}",
        machines.log(&drawn.id)
    );

    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
    assert!(ec2.live("awslife").is_empty(), "{:#?}", ec2.live("awslife"));
    assert!(
        ec2.launch_templates().is_empty(),
        "the cluster's boot document went with it: {:?}",
        ec2.launch_templates()
    );
    mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(2);
}

#[test]
fn idle_pool_instances_join_a_cluster_and_return_when_it_goes() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    let _nodes = fake_nodes(&moto, "awspool");
    let env = Env::new();
    let pool = "pools:\n  general: { node_type: t3.micro, min_idle: 2, max_capacity: 8 }\n";
    env.spec(&spec("awspool", Some(&moto.url()), pool));
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    let idle: BTreeSet<String> = ec2.live("awspool").into_iter().map(|i| i.id).collect();
    assert_eq!(idle.len(), 2);
    // Their nodes report warm (a cluster draws only warm idle instances).
    assert!(
        wait_until(Duration::from_secs(20), || {
            let live = ec2.live("awspool");
            with_tag(&live, "motorpool-step", "runtime").len() == 2
        }),
        "the idle instances never warmed up: {:#?}",
        ec2.live("awspool")
    );

    // A cluster draws its nodes from the pool's idle instances: re-tagged, not launched.
    env.spec(&spec(
        "awspool",
        Some(&moto.url()),
        &format!("{pool}clusters:\n  etl: {{ pool: general, workers: 1 }}\n"),
    ));
    let plan = mp(&env, None, &["plan"]).expect_code(0);
    assert!(
        plan.stdout
            .contains("takes 2 idle instances from pool `general`"),
        "{}",
        plan.stdout
    );
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = ec2.live("awspool");
    let members: Vec<&Ec2Instance> = with_tag(&live, "motorpool-kind", "cluster");
    assert_eq!(members.len(), 2, "driver + 1 worker: {live:#?}");
    let taken: BTreeSet<String> = members.iter().map(|i| i.id.clone()).collect();
    assert_eq!(taken, idle, "the cluster took the idle instances");
    for m in &members {
        assert_eq!(
            m.tags.get("motorpool-name").map(String::as_str),
            Some("etl")
        );
        assert_eq!(
            m.tags.get("motorpool-pool").map(String::as_str),
            Some("general")
        );
    }
    // The pool refilled its idle instances.
    assert_eq!(
        with_tag(&live, "motorpool-role", "idle").len(),
        2,
        "{live:#?}"
    );

    // The cluster goes: its instances go back to the pool.
    env.spec(&spec("awspool", Some(&moto.url()), pool));
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    let live = ec2.live("awspool");
    assert!(
        with_tag(&live, "motorpool-kind", "cluster").is_empty(),
        "{live:#?}"
    );
    for id in &taken {
        let back = live
            .iter()
            .find(|i| &i.id == id)
            .unwrap_or_else(|| panic!("{id} was terminated instead of returned: {live:#?}"));
        assert_eq!(
            back.tags.get("motorpool-kind").map(String::as_str),
            Some("pool")
        );
        assert_eq!(
            back.tags.get("motorpool-name").map(String::as_str),
            Some("general")
        );
        assert_eq!(
            back.tags.get("motorpool-role").map(String::as_str),
            Some("idle")
        );
        assert!(!back.tags.contains_key("motorpool-pool"), "{back:?}");
    }
    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
    assert!(ec2.live("awspool").is_empty());
}

fn many_clusters(clusters: usize, workers: usize) -> String {
    let mut s = String::from(
        "pools:\n  general: { node_type: t3.micro, min_idle: 2, max_capacity: 40 }\nclusters:\n",
    );
    for i in 0..clusters {
        s.push_str(&format!(
            "  c{i}: {{ node_type: t3.micro, workers: {workers} }}\n"
        ));
    }
    s
}

#[test]
fn an_aws_apply_killed_midway_converges_when_run_again_with_no_duplicate() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    let _nodes = fake_nodes(&moto, "awskill");
    // Slow EC2 down so that the kill lands in the middle; the endpoint comes
    // from AWS_ENDPOINT_URL this time, not from the spec.
    let slow = FaultProxy::start(
        moto.port,
        Faults {
            latency: Duration::from_millis(120),
            ..Faults::default()
        },
    );
    let env = Env::new();
    env.spec(&spec("awskill", None, &many_clusters(6, 2)));
    let expected = 2 + 6 * 3;

    let mut cmd = env.command(&["apply", "--yes", "--parallelism", "2"]);
    moto::with_aws_env(&mut cmd, Some(&slow.url()));
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn motorpool");
    let mut first = common::ChildGuard(Some(child));
    let journal = env.project_file("awskill", "journal.jsonl");
    let some_done = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.matches("\"op_done\"").count() >= 3)
    });
    assert!(some_done, "the first apply made no progress");
    first.kill9();
    let partial = ec2.live("awskill").len();
    assert!(
        partial < expected,
        "killed too late to test anything: {partial} instances"
    );

    let again = mp(&env, Some(&slow.url()), &["apply", "--yes"]).expect_code(0);
    assert!(again.stdout.contains("interrupted"), "{}", again.stdout);
    mp(&env, Some(&slow.url()), &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = ec2.live("awskill");
    assert_eq!(
        live.len(),
        expected,
        "exactly the spec's instances: {live:#?}"
    );
    let ids: BTreeSet<&str> = live.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), expected);
    mp(&env, Some(&moto.url()), &["destroy", "--yes"]).expect_code(0);
    assert!(ec2.live("awskill").is_empty());
}

#[test]
fn an_aws_apply_converges_through_throttling_and_server_errors() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    let _nodes = fake_nodes(&moto, "awsfaults");
    let faulty = FaultProxy::start(
        moto.port,
        Faults {
            throttle_rate: 0.2,
            unavailable_rate: 0.1,
            lost_response_rate: 0.05,
            seed: 7,
            ..Faults::default()
        },
    );
    let env = Env::new();
    env.spec(&spec(
        "awsfaults",
        Some(&faulty.url()),
        &many_clusters(5, 2),
    ));
    let expected = 2 + 5 * 3;

    let run = mp(&env, None, &["apply", "--yes"]).expect_code(0);
    assert!(
        retried(&run) > 0,
        "20% throttling and 10% 503s must cause retries: {}",
        run.stdout
    );
    assert!(
        faulty
            .stats
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        faulty
            .stats
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    mp(&env, None, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = ec2.live("awsfaults");
    assert_eq!(live.len(), expected, "no duplicate, no leak: {live:#?}");
    assert_eq!(
        ec2.instances("awsfaults").len(),
        expected,
        "not even a terminated duplicate"
    );

    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
    assert!(
        ec2.live("awsfaults").is_empty(),
        "{:#?}",
        ec2.live("awsfaults")
    );
}

#[test]
fn a_node_that_never_reports_fails_apply_after_the_ready_timeout_naming_it() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    // No machines: nothing runs the user data, so no node ever reports.
    let env = Env::new();
    env.spec(&spec_with(
        "awsmute",
        Some(&moto.url()),
        ", ready_timeout_minutes: 0.1",
        "clusters:\n  etl: { node_type: t3.micro, workers: 1 }\n",
    ));
    let started = std::time::Instant::now();
    let run = mp(&env, None, &["apply", "--yes"]).expect_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the 6-second ready timeout was not used: {:?}",
        started.elapsed()
    );
    let live = ec2.live("awsmute");
    assert_eq!(live.len(), 2, "{live:#?}");
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("2 nodes never reported ready within 6s"),
        "{all}"
    );
    for node in &live {
        assert!(
            all.contains(&format!("{} (last step: none)", node.id)),
            "{} is named: {all}",
            node.id
        );
    }
    // What the nodes were told: the runtime from the spec's URL, checked, and their agent's config.
    let user_data = ec2.user_data(&live[0].id).expect("launched with user data");
    assert!(user_data.starts_with("#!/bin/sh"), "{user_data}");
    assert!(user_data.contains(RUNTIME_URL) && user_data.contains(RUNTIME_SHA256));
    let config = motorpool::agent::AgentConfig::from_user_data(&user_data).expect("agent config");
    let boot = config.cluster.expect("a cluster node's startup");
    assert_eq!(boot.cluster, "etl");
    assert_eq!(boot.spec.workers, 1);
    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
}

#[test]
fn aws_settings_are_checked_with_their_positions() {
    let env = Env::new();
    env.spec(
        "project: awsbad\n\
         provider: { kind: aws, image: ubuntu, page_size: 2000, ready_timeout_minutes: 0, subnet_ids: [subnet-0abc, net-1], tags: { motorpool-x: y } }\n\
         pools:\n  general: { node_type: t3.mega, max_capacity: 2 }\n",
    );
    let run = mp(&env, None, &["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:2:",
        "`image`",
        "`page_size` of the aws provider must be between 5 and 1000",
        "needs `runtime_url`",
        "needs `runtime_sha256`",
        "`ready_timeout_minutes` must be more than 0",
        "`net-1` in `subnet_ids`",
        "tag `motorpool-x`",
        "unknown node type `t3.mega`",
    ] {
        assert!(
            run.stderr.contains(expected),
            "no `{expected}` in:\n{}",
            run.stderr
        );
    }
    // A runtime bucket stands in for runtime_url and its checksum; its
    // name and the public driver ranges are checked where they are written.
    env.spec(
        "project: awsbucket\n\
         provider: { kind: aws, runtime_bucket: Bad_Bucket, public_driver_cidrs: [10.0.0.0/8, 203.0.113.7] }\n\
         pools:\n  general: { node_type: t3.micro, max_capacity: 2 }\n",
    );
    let run = mp(&env, None, &["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:2:40: error: `runtime_bucket`: `Bad_Bucket` is not an S3 bucket name",
        "motorpool.yaml:2:86: error: `203.0.113.7` in `public_driver_cidrs`: not a CIDR block",
    ] {
        assert!(
            run.stderr.contains(expected),
            "no `{expected}` in:\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains("needs `runtime_url`"),
        "{}",
        run.stderr
    );
    // resources: picks the cheapest EC2 type that fits.
    env.spec(&spec(
        "awsfit",
        Some("http://127.0.0.1:9"),
        "pools:\n  general: { resources: { cpus: 4, memory_gb: 30 }, max_capacity: 2 }\n",
    ));
    mp(&env, None, &["validate"]).expect_code(0);
}

// ---------------------------------------------------------------------------
// Jobs on AWS clusters whose nodes boot from their user data.

/// Plays the machines as fresh nodes: each running instance runs the user
/// data moto holds, for real ([`Machines::boot_user_data`]).
fn booted_machines(moto: &Moto, project: &str) -> Machines {
    let agent_url = moto.url();
    Machines::boot_user_data(project_machines(moto, project), moto::REGION, move |cmd| {
        moto::with_aws_env(cmd, Some(&agent_url));
        // Executors read and write job data on moto's S3 (plain HTTP).
        cmd.env("AWS_ALLOW_HTTP", "true");
    })
}

/// An S3 client on moto, and a runtime to drive it.
fn s3(moto: &Moto) -> (tokio::runtime::Runtime, motorpool_aws::aws_sdk_s3::Client) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let config = moto::provider(&moto.url(), |_| {}).config().clone();
    let client = rt
        .block_on(motorpool_aws::s3_client(&config))
        .expect("an S3 client");
    (rt, client)
}

/// The objects in `bucket` (key -> metadata `sha256`), and the bucket's tags.
fn bucket(moto: &Moto, bucket: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (rt, s3) = s3(moto);
    rt.block_on(async {
        let listed = s3
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .expect("list the bucket");
        let mut objects = BTreeMap::new();
        for key in listed.contents().iter().filter_map(|o| o.key()) {
            let head = s3
                .head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("head");
            let sha = head
                .metadata()
                .and_then(|m| m.get("sha256"))
                .cloned()
                .unwrap_or_default();
            objects.insert(key.to_string(), sha);
        }
        let tags = s3
            .get_bucket_tagging()
            .bucket(bucket)
            .send()
            .await
            .expect("bucket tags")
            .tag_set()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect();
        (objects, tags)
    })
}

const WC_PY: &str = "def words(line):\n    for w in line.split():\n        yield w, 1\n\n\
                     def add(a, b):\n    return a + b\n";

/// Input files in `dir/data`, and the counts one process finds in them.
fn write_words(dir: &std::path::Path) -> BTreeMap<String, u64> {
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let vocab = [
        "pool", "cluster", "job", "driver", "worker", "shuffle", "s3",
    ];
    let mut counts = BTreeMap::new();
    for f in 0..3 {
        let mut text = String::new();
        for line in 0..400usize {
            let n = 1 + (line * 7 + f * 3) % 5;
            let words: Vec<&str> = (0..n)
                .map(|k| vocab[(line + k * f + k) % vocab.len()])
                .collect();
            for w in &words {
                *counts.entry(w.to_string()).or_insert(0) += 1;
            }
            text.push_str(&words.join(" "));
            text.push('\n');
        }
        std::fs::write(dir.join("data").join(format!("part{f}.txt")), text).expect("input");
    }
    counts
}

#[test]
fn an_aws_job_runs_on_nodes_booted_from_their_user_data_with_the_runtime_apply_uploaded() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    let machines = booted_machines(&moto, "awsjobs");
    let env = Env::new();
    let runtime_bucket = format!("mp-runtime-{}", fastrand::u32(..));
    let data = format!("mp-data-{}", fastrand::u32(..));
    env.spec(&format!(
        "project: awsjobs\n\
         provider: {{ kind: aws, region: {region}, image: {AMI}, endpoint_url: \"{url}\", \
         runtime_bucket: {runtime_bucket}, ready_timeout_minutes: 4 }}\n\
         clusters:\n  etl: {{ node_type: t3.micro, workers: 2 }}\n\
         jobs:\n  wc:\n    cluster: etl\n    tasks:\n      count:\n\
         \x20       map: {{ input: \"data/*.txt\", partitions: 4, python: {{ file: wc.py, function: words }} }}\n\
         \x20       reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}\n\
         \x20       output: out/wc\n\
         \x20 wcs3:\n    cluster: etl\n    tasks:\n      count:\n\
         \x20       map: {{ input: \"s3://{data}/in/*.txt\", partitions: 4, python: {{ file: wc.py, function: words }} }}\n\
         \x20       reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}\n\
         \x20       output: \"s3://{data}/out/wc/\"\n\
         \x20 adhoc:\n    new_cluster: {{ node_type: t3.micro, workers: 1 }}\n    tasks:\n\
         \x20     hello: {{ command: \"echo hello from a job cluster\" }}\n",
        region = moto::REGION,
        url = moto.url(),
    ));
    std::fs::write(env.dir.path().join("wc.py"), WC_PY).expect("wc.py");
    let expected = write_words(env.dir.path());
    // The same input on S3, for the job that reads it there.
    let (rt, s3) = s3(&moto);
    rt.block_on(async {
        s3.create_bucket()
            .bucket(&data)
            .send()
            .await
            .expect("data bucket");
        for f in 0..3 {
            let body =
                std::fs::read(env.dir.path().join(format!("data/part{f}.txt"))).expect("input");
            s3.put_object()
                .bucket(&data)
                .key(format!("in/part{f}.txt"))
                .body(body.into())
                .send()
                .await
                .expect("put input");
        }
    });

    // No runtime_url: apply uploads this very binary, stripped, to the bucket.
    let applied = mp(&env, None, &["apply", "--yes"]).expect_code(0);
    let (objects, tags) = bucket(&moto, &runtime_bucket);
    assert_eq!(objects.len(), 1, "one runtime object: {objects:?}");
    let (key, sha) = objects.iter().next().expect("the runtime");
    assert!(
        key.starts_with("motorpool/runtime/") && key.ends_with(&format!("/{sha}/motorpool")),
        "{key}"
    );
    assert_eq!(
        tags.get("motorpool-project").map(String::as_str),
        Some("awsjobs"),
        "the bucket was made as the project's: {tags:?}"
    );
    // Every node downloaded exactly that file, checked it, and runs it.
    let live = ec2.live("awsjobs");
    assert_eq!(live.len(), 3, "{live:#?}\n{}", applied.stdout);
    for node in &live {
        let log = machines.log(&node.id);
        assert_eq!(
            machines.steps_reported(&node.id),
            ["runtime", "formation", "libraries", "security", "ready"],
            "{}:\n{log}",
            node.id
        );
        let published = node
            .tags
            .get("motorpool-agent-address")
            .unwrap_or_else(|| panic!("{} published no address: {node:?}", node.id));
        assert!(
            published.starts_with("127.") && published.ends_with(":7443"),
            "the agent published the loopback address it listens on: {published}"
        );
    }

    // status and logs reach the cloud nodes at the addresses their agents published.
    let status = mp(&env, None, &["status", "--output", "json"]).expect_code(0);
    let nodes = status.json()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for n in &nodes {
        assert!(
            n["address"].as_str().is_some_and(|a| a.ends_with(":7443")),
            "{n:#}"
        );
        assert!(
            n["private_ip"]
                .as_str()
                .is_some_and(|ip| !ip.starts_with("127.")),
            "EC2's own private address is reported (and never dialled): {n:#}"
        );
    }
    let logs = mp(&env, None, &["logs", "etl"]).expect_code(0);
    assert!(logs.stdout.contains("(driver)"), "{}", logs.stdout);

    // A map/reduce job on the AWS cluster: the answer equals one process's.
    mp(&env, None, &["run", "wc"]).expect_code(0);
    let got = common::read_part_files(&env.dir.path().join("out/wc"));
    assert_eq!(got, expected);

    // The same job with its data on S3: the executors on the nodes read and
    // write it there, and nothing of it passes through this machine.
    let run = mp(&env, None, &["run", "wcs3"]).expect_code(0);
    assert!(
        run.stdout.contains(&format!("s3://{data}/out/wc/")),
        "{}",
        run.stdout
    );
    let from_s3 = rt.block_on(async {
        let listed = s3
            .list_objects_v2()
            .bucket(&data)
            .prefix("out/wc/")
            .send()
            .await
            .expect("list the output");
        let mut counts = BTreeMap::new();
        for key in listed.contents().iter().filter_map(|o| o.key()) {
            assert!(key.starts_with("out/wc/part-"), "{key}");
            let body = s3
                .get_object()
                .bucket(&data)
                .key(key)
                .send()
                .await
                .expect("get")
                .body
                .collect()
                .await
                .expect("body")
                .into_bytes();
            for line in String::from_utf8_lossy(&body).lines() {
                let (word, n) = line.split_once('\t').expect("key<TAB>value");
                counts.insert(word.to_string(), n.trim().parse::<u64>().expect("a count"));
            }
        }
        counts
    });
    assert_eq!(from_s3, expected);

    // A job cluster made on AWS for one run, and removed after it; its
    // output and logs are kept.
    let adhoc = mp(&env, None, &["run", "adhoc"]).expect_code(0);
    assert!(
        adhoc.stdout.contains("hello from a job cluster"),
        "{}",
        adhoc.stdout
    );
    let after = ec2.live("awsjobs");
    assert_eq!(after.len(), 3, "the job cluster is gone: {after:#?}");
    let kept = mp(&env, None, &["logs", "adhoc"]).expect_code(0);
    assert!(
        kept.stdout.contains("hello from a job cluster"),
        "{}",
        kept.stdout
    );

    // A second apply uploads nothing new.
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    assert_eq!(bucket(&moto, &runtime_bucket).0.len(), 1);
    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
    assert!(ec2.live("awsjobs").is_empty());
}

#[test]
fn a_runtime_that_does_not_match_its_checksum_stops_the_node_with_a_step_failure() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    let _machines = booted_machines(&moto, "awsbadsum");
    // The runtime is served on loopback; the spec's checksum is another file's.
    let served = tempfile::tempdir().expect("dir");
    std::fs::write(
        served.path().join("motorpool"),
        b"#!/bin/sh\necho not motorpool\n",
    )
    .expect("file");
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    let body = std::fs::read(served.path().join("motorpool")).expect("read");
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut stream in server.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    let env = Env::new();
    let wrong = "0".repeat(64);
    env.spec(&format!(
        "project: awsbadsum\n\
         provider: {{ kind: aws, region: {region}, image: {AMI}, endpoint_url: \"{url}\", \
         runtime_url: \"http://127.0.0.1:{port}/motorpool\", runtime_sha256: \"{wrong}\", \
         ready_timeout_minutes: 2 }}\n\
         clusters:\n  etl: {{ node_type: t3.micro, workers: 1 }}\n",
        region = moto::REGION,
        url = moto.url(),
    ));
    let run = mp(&env, None, &["apply", "--yes"]).expect_code(1);
    let all = format!("{}{}", run.stdout, run.stderr);
    // Whatever apply did with them after (they failed), both nodes said why.
    let launched = ec2.instances("awsbadsum");
    assert_eq!(launched.len(), 2, "{launched:#?}");
    for node in &launched {
        assert_eq!(
            node.tags.get("motorpool-step").map(String::as_str),
            Some("failed:runtime"),
            "{node:?}"
        );
        assert!(
            all.contains(&format!(
                "{} (failed at runtime: the downloaded runtime's SHA-256 is",
                node.id
            )),
            "the failure names the node and why: {all}"
        );
    }
    assert!(
        all.contains(&format!("not the runtime_sha256 {wrong}")),
        "{all}"
    );
    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
}

#[test]
fn public_drivers_get_a_public_address_open_only_to_the_listed_ranges() {
    let moto = Moto::start();
    let ec2 = Ec2::new(&moto);
    // Nothing here is dialled: the nodes' tags are played, and the public
    // addresses moto hands out are only read back.
    let _nodes = fake_nodes(&moto, "awspub");
    let env = Env::new();
    env.spec(&spec_with(
        "awspub",
        Some(&moto.url()),
        ", public_driver_cidrs: [\"203.0.113.7/32\", \"198.51.100.0/24\"]",
        "clusters:\n  etl: { node_type: t3.micro, workers: 1 }\n",
    ));
    mp(&env, None, &["apply", "--yes"]).expect_code(0);
    let (driver, worker) = ec2.rt.block_on(async {
        let out = ec2
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:motorpool-project")
                    .values("awspub")
                    .build(),
            )
            .send()
            .await
            .expect("describe");
        let all: Vec<_> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .cloned()
            .collect();
        let role = |i: &motorpool_aws::aws_sdk_ec2::types::Instance| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some("motorpool-role"))
                .and_then(|t| t.value())
                .map(str::to_string)
        };
        let pick = |r: &str| {
            all.iter()
                .find(|i| role(i).as_deref() == Some(r))
                .cloned()
                .unwrap_or_else(|| panic!("no {r}: {all:#?}"))
        };
        (pick("driver"), pick("worker"))
    });
    // The groups of the instance's network interface (EC2 reports them there too).
    let groups = |i: &motorpool_aws::aws_sdk_ec2::types::Instance| -> Vec<String> {
        i.network_interfaces()
            .iter()
            .flat_map(|n| n.groups())
            .chain(i.security_groups())
            .filter_map(|g| g.group_name().map(str::to_string))
            .collect()
    };
    assert!(driver.public_ip_address().is_some(), "{driver:#?}");
    assert!(
        groups(&driver).contains(&"motorpool-awspub-driver-access".to_string()),
        "{:?}",
        groups(&driver)
    );
    assert!(
        !groups(&worker).contains(&"motorpool-awspub-driver-access".to_string()),
        "a worker stays private: {:?}",
        groups(&worker)
    );
    let rules = ec2.rt.block_on(async {
        ec2.client
            .describe_security_groups()
            .filters(
                Filter::builder()
                    .name("group-name")
                    .values("motorpool-awspub-driver-access")
                    .build(),
            )
            .send()
            .await
            .expect("groups")
            .security_groups()
            .iter()
            .flat_map(|g| g.ip_permissions())
            .flat_map(|p| {
                p.ip_ranges().iter().map(move |r| {
                    (
                        p.from_port(),
                        p.to_port(),
                        r.cidr_ip().unwrap_or_default().to_string(),
                    )
                })
            })
            .collect::<BTreeSet<_>>()
    });
    assert_eq!(
        rules,
        BTreeSet::from([
            (Some(7443), Some(7444), "198.51.100.0/24".to_string()),
            (Some(7443), Some(7444), "203.0.113.7/32".to_string()),
        ])
    );
    mp(&env, None, &["destroy", "--yes"]).expect_code(0);
}
