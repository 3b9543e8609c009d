//! The Azure provider through the CLI, as a user runs it, against the fake
//! Resource Manager on 127.0.0.1 (`providers/azure/tests/support/fake_arm.py`):
//! plan -> apply -> plan -> drift -> heal -> destroy with real agents
//! playing the VMs from their custom data, pool VMs moved into a cluster and
//! back, an apply killed half way, an apply through 429s, 503s and lost
//! answers, quota and capacity errors, and the runtime apply uploads to a
//! container of the project's on Azurite (Azure's storage emulator) when the
//! spec gives no `runtime_url`.
//!
//! Each test starts its own fake (killed on drop, also on failure). Every
//! motorpool run gets an explicit loopback `endpoint_url` in the spec and no
//! Azure credentials (the `AZURE_*` variables removed, `AZURE_CONFIG_DIR`
//! pointing at an empty directory), so a placeholder token is sent and
//! nothing can reach Azure or an instance metadata service.

#[path = "../providers/azure/tests/support/mod.rs"]
mod arm;
mod common;
#[path = "common/object_stores.rs"]
mod object_stores;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use arm::{FakeArm, FakeVm, GROUP, SUBNET, SUBSCRIPTION};
use common::machines::{FakeNodes, Machine, Machines};
use common::{Env, Run, wait_until};
use object_stores::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite};
use sha2::{Digest, Sha256};

const RUNTIME_URL: &str = "https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux";
const RUNTIME_SHA256: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// No Azure credentials reach a test's processes.
fn without_azure_credentials(cmd: &mut Command) {
    for var in [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "IDENTITY_ENDPOINT",
        "MSI_ENDPOINT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AZURE_CONFIG_DIR", "/nonexistent/motorpool-test-azure");
}

fn mp(env: &Env, args: &[&str]) -> Run {
    env.mp_with(args, without_azure_credentials)
}

fn spec(project: &str, fake: &FakeArm, extra: &str, body: &str) -> String {
    format!(
        "project: {project}\nprovider: {{ kind: azure, subscription_id: {SUBSCRIPTION}, \
         resource_group: {GROUP}, location: westeurope, subnet_id: \"{SUBNET}\", \
         endpoint_url: \"{}\", runtime_url: \"{RUNTIME_URL}\", \
         runtime_sha256: {RUNTIME_SHA256}{extra} }}\n{body}",
        fake.url()
    )
}

fn with_tag<'a>(list: &'a [FakeVm], key: &str, value: &str) -> Vec<&'a FakeVm> {
    list.iter().filter(|v| v.tag(key) == Some(value)).collect()
}

/// Real agents on the project's running VMs, from the custom data the fake
/// holds (instance id: the VM name, as the script learns it from IMDS).
fn machines(fake: &FakeArm, project: &str) -> Machines {
    let (port, project) = (fake.port, project.to_string());
    Machines::start(
        move || {
            FakeArm::attach(port)
                .project_vms(&project)
                .into_iter()
                .map(|v| Machine {
                    // (A tag update makes the VM `Updating` for a while: it runs on.)
                    running: v.power_state == "running",
                    user_data: Some(v.custom_data.clone()),
                    id: v.name,
                })
                .collect()
        },
        without_azure_credentials,
    )
}

fn fake_nodes(fake: &FakeArm, project: &str) -> FakeNodes {
    let port = fake.port;
    FakeNodes::start(move || FakeArm::attach(port).provider(|_| {}), project)
}

/// The boot document of cluster `name` the fake holds, read with the provider.
fn boot_document(fake: &FakeArm, name: &str) -> Option<String> {
    use motorpool_provider::Provider;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(fake.provider(|_| {}).get_cluster_boot(name))
        .expect("read the template spec")
}

#[test]
fn an_azure_cluster_comes_up_drifts_heals_and_goes_away() {
    let fake = FakeArm::start();
    fake.configure(r#"{"page_size": 2}"#);
    let machines = machines(&fake, "azlife");
    let env = Env::new();
    env.spec(&spec(
        "azlife",
        &fake,
        ", ready_timeout_minutes: 4",
        "pools:\n  general: { node_type: Standard_D2s_v5, min_idle: 1, max_capacity: 6 }\n\
         clusters:\n  etl: { pool: general, workers: 3, tags: { team: data } }\n",
    ));

    let plan = mp(&env, &["plan", "--detailed-exitcode"]).expect_code(2);
    // 5 Standard_D2s_v5 at $0.096/hour (East US pay-as-you-go).
    assert!(
        plan.stdout.contains("Cost after apply: $0.48/hour"),
        "plan shows the hourly cost: {}",
        plan.stdout
    );
    let applied = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(
        applied.stdout.contains("Apply complete: 2 created"),
        "{}",
        applied.stdout
    );
    // A plan lists the resource group's VMs by page: 5 VMs at 2 a page.
    let lists = fake.count("GET virtualMachines");
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        fake.count("GET virtualMachines") - lists,
        3,
        "{}",
        fake.requests()
    );

    let live = fake.project_vms("azlife");
    assert_eq!(live.len(), 5, "1 idle + 1 driver + 3 workers: {live:#?}");
    assert!(live.iter().all(|v| v.power_state == "running"), "{live:#?}");
    assert_eq!(with_tag(&live, "motorpool-role", "driver").len(), 1);
    assert_eq!(with_tag(&live, "motorpool-role", "worker").len(), 3);
    assert_eq!(with_tag(&live, "motorpool-role", "idle").len(), 1);
    for node in with_tag(&live, "motorpool-kind", "cluster") {
        assert_eq!(node.tag("motorpool-step"), Some("ready"), "{node:?}");
        assert_eq!(node.tag("team"), Some("data"));
        assert_eq!(
            machines.steps_reported(&node.name),
            ["runtime", "formation", "libraries", "security", "ready"],
            "the agent log of {}:\n{}",
            node.name,
            machines.log(&node.name)
        );
    }
    assert!(
        boot_document(&fake, &motorpool::words::cluster_boot_name("azlife", "etl")).is_some(),
        "the cluster's startup is kept for drawn VMs"
    );
    // What a VM was told: custom data the shell accepts, fetching the runtime
    // from the spec's URL and checking its sha256.
    common::assert_shell_parses(&live[0].custom_data);
    assert!(
        live[0].custom_data.contains(RUNTIME_URL) && live[0].custom_data.contains(RUNTIME_SHA256),
        "{}",
        live[0].custom_data
    );
    let driver = with_tag(&live, "motorpool-role", "driver")[0];
    assert!(
        driver
            .tag("motorpool-driver-address")
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "the driver published where it listens: {driver:?}"
    );
    let status = mp(&env, &["status", "--output", "json"]).expect_code(0);
    let nodes = status.json()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nodes.len(), 5, "{nodes:#?}");

    // A worker is deleted behind motorpool's back: that is drift.
    let victim = with_tag(&live, "motorpool-role", "worker")[0].name.clone();
    fake.delete(&victim);
    mp(&env, &["plan", "--refresh-only", "--detailed-exitcode"]).expect_code(2);
    let drift = mp(&env, &["plan", "--detailed-exitcode", "--output", "json"]).expect_code(2);
    let etl = drift.json()["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["address"] == "cluster.etl")
        .cloned()
        .expect("cluster.etl in the plan");
    assert_eq!(etl["drift"], true, "{etl:#}");

    mp(&env, &["apply", "--yes"]).expect_code(0);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let healed = fake.project_vms("azlife");
    assert_eq!(healed.len(), 5, "{healed:#?}");
    assert!(healed.iter().all(|v| v.name != victim));
    // The heal drew the warm idle VM: its agent read the cluster's startup
    // from the template spec and reported every step itself.
    let drawn = with_tag(&healed, "motorpool-kind", "cluster")
        .into_iter()
        .find(|v| machines.log(&v.name).contains("drawn into cluster etl"))
        .unwrap_or_else(|| panic!("no node was drawn from the pool: {healed:#?}"));
    assert_eq!(
        machines.steps_reported(&drawn.name),
        [
            "runtime",
            "runtime",
            "formation",
            "libraries",
            "security",
            "ready"
        ],
        "warm-up, then the cluster's steps:\n{}",
        machines.log(&drawn.name)
    );

    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(
        fake.project_vms("azlife").is_empty(),
        "{:#?}",
        fake.project_vms("azlife")
    );
    assert_eq!(fake.nic_count(), 0, "no network interface is left");
    assert_eq!(
        boot_document(&fake, &motorpool::words::cluster_boot_name("azlife", "etl")),
        None,
        "the boot document went with it"
    );
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(2);
}

#[test]
fn idle_azure_vms_join_a_cluster_and_return_when_it_goes() {
    let fake = FakeArm::start();
    let _nodes = fake_nodes(&fake, "azpool");
    let env = Env::new();
    let pool = "pools:\n  general: { node_type: Standard_D2s_v5, min_idle: 2, max_capacity: 8 }\n";
    env.spec(&spec("azpool", &fake, "", pool));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let idle: BTreeSet<String> = fake
        .project_vms("azpool")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(idle.len(), 2);
    assert!(
        wait_until(Duration::from_secs(20), || {
            with_tag(&fake.project_vms("azpool"), "motorpool-step", "runtime").len() == 2
        }),
        "the idle VMs never warmed up"
    );
    env.spec(&spec(
        "azpool",
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
    let live = fake.project_vms("azpool");
    let members = with_tag(&live, "motorpool-kind", "cluster");
    let taken: BTreeSet<String> = members.iter().map(|v| v.name.clone()).collect();
    assert_eq!(taken, idle, "the cluster took the idle VMs");
    assert_eq!(
        with_tag(&live, "motorpool-role", "idle").len(),
        2,
        "the pool refilled"
    );

    env.spec(&spec("azpool", &fake, "", pool));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let live = fake.project_vms("azpool");
    assert!(
        with_tag(&live, "motorpool-kind", "cluster").is_empty(),
        "{live:#?}"
    );
    for name in &taken {
        let back = live
            .iter()
            .find(|v| &v.name == name)
            .unwrap_or_else(|| panic!("{name} was deleted instead of returned: {live:#?}"));
        assert_eq!(back.tag("motorpool-kind"), Some("pool"));
        assert_eq!(back.tag("motorpool-role"), Some("idle"));
        assert_eq!(back.tag("motorpool-pool"), None, "{back:?}");
    }
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_vms("azpool").is_empty());
    assert_eq!(fake.nic_count(), 0);
}

fn many_clusters(clusters: usize, workers: usize) -> String {
    let mut s = String::from(
        "pools:\n  general: { node_type: Standard_D2s_v5, min_idle: 2, max_capacity: 40 }\nclusters:\n",
    );
    for i in 0..clusters {
        s.push_str(&format!(
            "  c{i}: {{ node_type: Standard_D2s_v5, workers: {workers} }}\n"
        ));
    }
    s
}

#[test]
fn an_azure_apply_killed_midway_converges_when_run_again_with_no_duplicate() {
    let fake = FakeArm::start();
    fake.configure(r#"{"stage_ms": 150}"#);
    let _nodes = fake_nodes(&fake, "azkill");
    let env = Env::new();
    env.spec(&spec("azkill", &fake, "", &many_clusters(6, 2)));
    let expected = 2 + 6 * 3;
    let mut cmd = env.command(&["apply", "--yes", "--parallelism", "2"]);
    without_azure_credentials(&mut cmd);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn motorpool");
    let mut first = common::ChildGuard(Some(child));
    let journal = env.project_file("azkill", "journal.jsonl");
    let some_done = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.matches("\"op_done\"").count() >= 3)
    });
    assert!(some_done, "the first apply made no progress");
    first.kill9();
    let partial = fake.project_vms("azkill").len();
    assert!(
        partial < expected,
        "killed too late to test anything: {partial} VMs"
    );

    let again = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(again.stdout.contains("interrupted"), "{}", again.stdout);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    let live = fake.project_vms("azkill");
    assert_eq!(live.len(), expected, "exactly the spec's VMs: {live:#?}");
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_vms("azkill").is_empty());
    assert_eq!(fake.nic_count(), 0);
}

#[test]
fn an_azure_apply_converges_through_throttling_server_errors_and_lost_answers() {
    let fake = FakeArm::start();
    let _nodes = fake_nodes(&fake, "azfaults");
    let env = Env::new();
    env.spec(&spec("azfaults", &fake, "", &many_clusters(5, 2)));
    let expected = 2 + 5 * 3;
    // 20% of calls fail: 429 with `Retry-After: 1` (honoured), 503, or done
    // with the answer lost.
    fake.configure(
        r#"{"retry_after": 1, "faults": {"rate": 0.2, "kinds": ["429", "503", "lost"], "seed": 7, "methods": ["GET", "PUT", "PATCH", "POST", "DELETE"]}}"#,
    );
    let run = mp(&env, &["apply", "--yes"]).expect_code(0);
    assert!(run.stdout.contains(" retried"), "{}", run.stdout);
    mp(&env, &["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        fake.project_vms("azfaults").len(),
        expected,
        "no duplicate, no leak"
    );
    mp(&env, &["destroy", "--yes"]).expect_code(0);
    fake.configure(r#"{"faults": {"rate": 0.0}}"#);
    assert!(
        fake.project_vms("azfaults").is_empty(),
        "{:#?}",
        fake.project_vms("azfaults")
    );
    assert_eq!(fake.nic_count(), 0);
}

#[test]
fn azure_quota_and_capacity_errors_fail_clearly() {
    let fake = FakeArm::start();
    let _nodes = fake_nodes(&fake, "azcap");
    let env = Env::new();
    fake.configure(r#"{"core_quota": {"westeurope": 4}}"#);
    env.spec(&spec(
        "azcap",
        &fake,
        "",
        "clusters:\n  big: { node_type: Standard_D8s_v5, workers: 2 }\n",
    ));
    let run = mp(&env, &["apply", "--yes"]).expect_code(1);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("quota exceeded") && all.contains("Regional Cores"),
        "{all}"
    );
    assert!(fake.project_vms("azcap").is_empty());

    fake.configure(
        r#"{"core_quota": {"westeurope": null}, "unavailable_sizes": ["Standard_D8s_v5"]}"#,
    );
    let run = mp(&env, &["apply", "--yes"]).expect_code(1);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("insufficient capacity") && all.contains("SKU"),
        "{all}"
    );
    assert!(fake.project_vms("azcap").is_empty());
    mp(&env, &["destroy", "--yes"]).expect_code(0);
}

#[test]
fn azure_settings_are_checked_with_their_positions() {
    let env = Env::new();
    env.spec(
        "project: azbad\n\
         provider: { kind: azure, subscription_id: nope, resource_group: rg, location: westeurope, subnet_id: /bad, tags: { motorpool-x: y } }\n\
         pools:\n  general: { node_type: Standard_Z9, max_capacity: 2 }\n",
    );
    let run = mp(&env, &["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:2:",
        "`nope` is not a subscription id",
        "`/bad` is not a subnet id",
        "needs `runtime_url`",
        "tag `motorpool-x`",
        "unknown node type `Standard_Z9`",
    ] {
        assert!(
            run.stderr.contains(expected),
            "no `{expected}` in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn a_job_runs_on_an_azure_cluster_at_the_address_its_agent_published() {
    let fake = FakeArm::start();
    let _machines = machines(&fake, "azjob");
    let env = Env::new();
    env.spec(&spec(
        "azjob",
        &fake,
        ", ready_timeout_minutes: 4",
        "clusters:\n  etl: { node_type: Standard_D2s_v5, workers: 1 }\n\
         jobs:\n  hello:\n    cluster: etl\n    tasks:\n      say: { command: \"echo hello from azure\" }\n",
    ));
    mp(&env, &["apply", "--yes"]).expect_code(0);
    let vms = FakeArm::attach(fake.port).project_vms("azjob");
    assert_eq!(vms.len(), 2);
    let status = mp(&env, &["status", "--output", "json"]).expect_code(0);
    for n in status.json()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert!(
            n["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "the agent's published address: {n:#}"
        );
    }
    let run = mp(&env, &["run", "hello"]).expect_code(0);
    assert!(run.stdout.contains("hello from azure"), "{}", run.stdout);
    mp(&env, &["destroy", "--yes"]).expect_code(0);
}

/// `mp` with Azurite's account key in the environment (`AZURE_STORAGE_ACCOUNT_KEY`).
fn mp_with_key(env: &Env, args: &[&str]) -> Run {
    env.mp_with(args, |cmd| {
        without_azure_credentials(cmd);
        cmd.env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
    })
}

/// The runtime URL in a VM's custom data: the shell-quoted word that starts
/// with `base`.
fn runtime_url_in(custom_data: &str, base: &str) -> String {
    let start = custom_data
        .find(base)
        .unwrap_or_else(|| panic!("no URL of {base} in:\n{custom_data}"));
    custom_data[start..]
        .split(['\'', ' ', '\n'])
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn without_runtime_url_apply_uploads_the_runtime_once_to_the_container_and_nodes_get_a_sas_url() {
    let fake = FakeArm::start();
    let azurite = Azurite::start();
    let _machines = machines(&fake, "azrt");
    let env = Env::new();
    let blob_endpoint = format!("{}/{AZURITE_ACCOUNT}", azurite.url());
    env.spec(&format!(
        "project: azrt\nprovider: {{ kind: azure, subscription_id: {SUBSCRIPTION}, \
         resource_group: {GROUP}, location: westeurope, subnet_id: \"{SUBNET}\", \
         endpoint_url: \"{}\", storage_account: {AZURITE_ACCOUNT}, \
         runtime_container: mp-runtime, blob_endpoint: \"{blob_endpoint}\", \
         ready_timeout_minutes: 4 }}\n\
         clusters:\n  etl: {{ node_type: Standard_D2s_v5, workers: 1 }}\n",
        fake.url()
    ));
    // The container stands in for runtime_url: validate asks for none.
    let valid = mp(&env, &["validate"]);
    assert!(
        !valid.stderr.contains("runtime_url"),
        "validate still asks for runtime_url:\n{}",
        valid.stderr
    );
    valid.expect_code(0);

    // Without the account key there is no SAS to give the nodes: the
    // error says what to set, and nothing is launched.
    let keyless = mp(&env, &["apply", "--yes"]).expect_code(1);
    assert!(
        keyless.stderr.contains("AZURE_STORAGE_ACCOUNT_KEY"),
        "{}",
        keyless.stderr
    );
    assert!(fake.project_vms("azrt").is_empty());

    let applied = mp_with_key(&env, &["apply", "--yes"]).expect_code(0);
    let uploaded = azurite.etags("mp-runtime", "motorpool/runtime/");
    assert_eq!(uploaded.len(), 1, "one runtime blob: {uploaded:?}");
    let (name, etag) = uploaded[0].clone();
    // motorpool/runtime/<version>/x86_64-linux/<sha256>/motorpool
    let parts: Vec<&str> = name.split('/').collect();
    assert_eq!(parts.len(), 6, "{name}");
    assert_eq!(parts[3], "x86_64-linux", "{name}");
    assert_eq!(parts[5], "motorpool", "{name}");
    let sha = parts[4].to_string();
    assert_eq!(sha.len(), 64, "{name}");
    let containers = azurite.containers_xml();
    assert!(
        containers.contains("<motorpool_project>azrt</motorpool_project>"),
        "the container was made as the project's: {containers}"
    );

    // Every VM was told the SAS URL of that blob and its checksum.
    let live = fake.project_vms("azrt");
    assert_eq!(live.len(), 2, "{live:#?}\n{}", applied.stdout);
    let mut urls = BTreeSet::new();
    for vm in &live {
        common::assert_shell_parses(&vm.custom_data);
        assert!(vm.custom_data.contains(&sha), "{}", vm.custom_data);
        urls.insert(runtime_url_in(&vm.custom_data, &azurite.url()));
    }
    assert_eq!(urls.len(), 1, "{urls:?}");
    let url = urls.into_iter().next().expect("a URL");
    let path_and_query = url
        .strip_prefix(&azurite.url())
        .expect("the URL is Azurite's")
        .to_string();
    assert!(
        path_and_query.starts_with(&format!("/{AZURITE_ACCOUNT}/mp-runtime/{name}?")),
        "{url}"
    );
    // (sp, sr and se need no decoding, but for se's colons.)
    let query: std::collections::BTreeMap<String, String> = path_and_query
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":")))
        .collect();
    assert_eq!(query.get("sp").map(String::as_str), Some("r"), "{query:?}");
    assert_eq!(query.get("sr").map(String::as_str), Some("b"), "{query:?}");
    let expiry = query.get("se").cloned().unwrap_or_default();
    assert!(expiry.ends_with('Z'), "an expiry: {query:?}");

    // A GET of that URL (no other credential) returns exactly the binary
    // whose checksum the nodes were told.
    let got = object_stores::http(azurite.port, "GET", &path_and_query, &[], b"");
    assert_eq!(got.status, 200, "{}", got.text());
    let digest: String = Sha256::digest(&got.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, sha);
    // The container stays private, and the URL only reads.
    let (path, _) = path_and_query.split_once('?').expect("a query");
    let anonymous = object_stores::http(azurite.port, "GET", path, &[], b"");
    assert_ne!(
        anonymous.status, 200,
        "the blob is readable without the SAS"
    );
    let write = object_stores::http(
        azurite.port,
        "PUT",
        &path_and_query,
        &[("x-ms-blob-type".into(), "BlockBlob".into())],
        b"not motorpool",
    );
    assert_eq!(write.status, 403, "{}", write.text());

    // A second apply uploads nothing: the blob is the one of the first.
    mp_with_key(&env, &["apply", "--yes"]).expect_code(0);
    assert_eq!(
        azurite.etags("mp-runtime", "motorpool/runtime/"),
        [(name, etag)]
    );
    mp_with_key(&env, &["destroy", "--yes"]).expect_code(0);
    assert!(fake.project_vms("azrt").is_empty());
}
