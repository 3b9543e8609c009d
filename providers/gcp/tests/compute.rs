//! The GCP provider against the fake Compute API (`support/fake_gce.py`),
//! call by call: what it sends, what the API then holds, and how each
//! failure the API reports comes back as a typed error.

mod support;

use std::collections::BTreeSet;

use motorpool_provider::{
    InstanceState, LaunchRequest, Provider, ProviderError, Retag, TagFilter, Tags, tags,
};
use support::{FakeGce, PROJECT};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn launch(count: u32, token: &str, project: &str) -> LaunchRequest {
    let mut tags = Tags::new();
    tags.insert(tags::PROJECT.into(), project.into());
    tags.insert(tags::KIND.into(), "pool".into());
    tags.insert(tags::NAME.into(), "general".into());
    tags.insert(tags::ROLE.into(), "idle".into());
    // Not a label: a colon and dots; kept exactly in metadata.
    tags.insert(tags::DRIVER_ADDRESS.into(), "10.128.0.7:7077".into());
    LaunchRequest {
        count,
        node_type: "e2-small".into(),
        image: None,
        tags,
        user_data: "#!/bin/sh\necho hello\n".into(),
        client_token: token.into(),
    }
}

fn project_filter(project: &str) -> TagFilter {
    let mut f = TagFilter::new();
    f.insert(tags::PROJECT.into(), project.into());
    f
}

async fn list_all(p: &dyn Provider, filter: &TagFilter) -> Vec<motorpool_provider::Instance> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = p.list_page(filter, token).await.expect("list");
        out.extend(page.instances);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

#[test]
fn the_fake_refuses_what_the_api_refuses() {
    // The fake's own tests: shapes against the recorded ones in testdata/,
    // fingerprints, request ids, filters, quota and capacity errors.
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "test_fake_gce"])
        .current_dir(support::support_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3 -m unittest");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the fake's tests failed:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn instances_are_launched_labelled_listed_by_page_retagged_and_deleted() {
    let fake = FakeGce::start();
    let p = fake.provider(|c| c.page_size = 2);
    let rt = rt();
    let made = rt
        .block_on(p.launch(&launch(5, "tok-1", "alpha")))
        .expect("launch");
    assert_eq!(made.len(), 5, "{made:#?}");
    let held = fake.project_instances(PROJECT, "alpha");
    assert_eq!(held.len(), 5);
    for i in &held {
        assert_eq!(i.machine_type, "e2-small");
        assert_eq!(i.label("motorpool-role"), Some("idle"));
        // The address is a readable label and exact in metadata.
        assert_eq!(i.label("motorpool-driver-address"), Some("10_128_0_7_7077"));
        assert!(i.metadata["motorpool-tags"].contains("10.128.0.7:7077"));
        assert_eq!(i.metadata["startup-script"], "#!/bin/sh\necho hello\n");
        assert!(
            i.label("motorpool-launch").is_some(),
            "labelled at creation"
        );
    }
    // All in one zone (a bulkInsert is zonal), named after the launch.
    let zones: BTreeSet<&str> = held.iter().map(|i| i.zone.as_str()).collect();
    assert_eq!(zones.len(), 1);

    // Listed by page: 5 instances at 2 a page are 3 pages, not 5 calls.
    let before = fake.count("GET aggregated/instances");
    let listed = rt.block_on(list_all(&p, &project_filter("alpha")));
    assert_eq!(fake.count("GET aggregated/instances") - before, 3);
    assert_eq!(listed.len(), 5);
    for i in &listed {
        assert_eq!(
            i.tag(tags::DRIVER_ADDRESS),
            Some("10.128.0.7:7077"),
            "{i:?}"
        );
        assert_eq!(i.node_type, "e2-small");
        assert_eq!(i.image, motorpool_gcp::DEFAULT_IMAGE);
        assert!(i.launched_at > 1_700_000_000, "{i:?}");
        assert!(
            !i.tags.contains_key("motorpool-launch"),
            "bookkeeping is no tag"
        );
    }
    // Another project's filter sees none of them.
    assert!(
        rt.block_on(list_all(&p, &project_filter("beta")))
            .is_empty()
    );

    // Retag: a label change, a metadata-held change and a removal at once.
    let ids: Vec<String> = listed.iter().take(2).map(|i| i.id.clone()).collect();
    let mut change = Retag::default();
    change.set.insert(tags::ROLE.into(), "driver".into());
    change
        .set
        .insert(tags::STEP.into(), "failed:runtime".into());
    change.remove.push(tags::DRIVER_ADDRESS.into());
    rt.block_on(p.retag(&ids, &change)).expect("retag");
    let described = rt.block_on(p.describe(&ids)).expect("describe");
    assert_eq!(described.len(), 2);
    for i in &described {
        assert_eq!(i.tag(tags::ROLE), Some("driver"));
        assert_eq!(i.tag(tags::STEP), Some("failed:runtime"));
        assert_eq!(i.tag(tags::DRIVER_ADDRESS), None, "{i:?}");
    }
    let mut drivers = project_filter("alpha");
    drivers.insert(tags::ROLE.into(), "driver".into());
    assert_eq!(rt.block_on(list_all(&p, &drivers)).len(), 2);

    // Stop and start (warm: stopped pools), then delete: gone from the API.
    rt.block_on(p.stop(&ids)).expect("stop");
    let stopped = rt.block_on(p.describe(&ids)).expect("describe");
    assert!(
        stopped.iter().all(|i| i.state == InstanceState::Stopped),
        "{stopped:#?}"
    );
    rt.block_on(p.start(&ids)).expect("start");
    let started = rt.block_on(p.describe(&ids)).expect("describe");
    assert!(
        started.iter().all(|i| i.state == InstanceState::Running),
        "{started:#?}"
    );
    let all: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();
    rt.block_on(p.terminate(&all)).expect("terminate");
    assert!(fake.project_instances(PROJECT, "alpha").is_empty());
    // Terminating what is gone is fine.
    rt.block_on(p.terminate(&all)).expect("terminate again");
    assert!(rt.block_on(p.describe(&all)).expect("describe").is_empty());
}

#[test]
fn a_repeated_launch_returns_the_first_instances() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    let first = rt
        .block_on(p.launch(&launch(3, "same-token", "gamma")))
        .expect("launch");
    let again = rt
        .block_on(p.launch(&launch(3, "same-token", "gamma")))
        .expect("relaunch");
    let ids = |v: &[motorpool_provider::Instance]| -> BTreeSet<String> {
        v.iter().map(|i| i.id.clone()).collect()
    };
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(fake.project_instances(PROJECT, "gamma").len(), 3);
    assert_eq!(
        fake.count("POST instances/bulkInsert"),
        1,
        "{}",
        fake.requests()
    );
}

#[test]
fn a_zone_out_of_capacity_fails_over_and_a_quota_error_fails_clearly() {
    let fake = FakeGce::start();
    let rt = rt();
    // Two zones; whichever the token picks first is exhausted.
    fake.configure(r#"{"exhausted_zones": ["us-central1-a"]}"#);
    let p = fake.provider(|c| c.zones = vec!["us-central1-a".into(), "us-central1-b".into()]);
    for n in 0..4 {
        let made = rt
            .block_on(p.launch(&launch(2, &format!("cap-{n}"), "delta")))
            .expect("a launch fails over to the zone with capacity");
        assert!(
            made.iter().all(|i| i.id.starts_with("us-central1-b/")),
            "{made:#?}"
        );
    }
    // Every zone exhausted: a capacity error naming what was tried.
    fake.configure(r#"{"exhausted_zones": ["us-central1-a", "us-central1-b"]}"#);
    match rt.block_on(p.launch(&launch(1, "cap-x", "delta"))) {
        Err(ProviderError::Capacity(m)) => {
            assert!(
                m.contains("ZONE_RESOURCE_POOL_EXHAUSTED") || m.contains("resources"),
                "{m}"
            );
            assert!(m.contains("also tried"), "{m}");
        }
        other => panic!("expected a capacity error, got {other:?}"),
    }
    // A quota error is not retried elsewhere: it fails, and nothing is made.
    fake.configure(r#"{"exhausted_zones": [], "cpu_quota": {"us-central1": 20}}"#);
    let before = fake.project_instances(PROJECT, "epsilon").len();
    match rt.block_on(p.launch(&launch(20, "quota-1", "epsilon"))) {
        Err(ProviderError::Quota(m)) => assert!(m.contains("CPUS"), "{m}"),
        other => panic!("expected a quota error, got {other:?}"),
    }
    assert_eq!(fake.project_instances(PROJECT, "epsilon").len(), before);
}

#[test]
fn cluster_boot_documents_live_in_project_metadata() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    assert_eq!(rt.block_on(p.get_cluster_boot("etl")).expect("get"), None);
    rt.block_on(p.put_cluster_boot("etl", "{\"v\":1}"))
        .expect("put");
    rt.block_on(p.put_cluster_boot("other.cluster", "{\"v\":9}"))
        .expect("put");
    rt.block_on(p.put_cluster_boot("etl", "{\"v\":2}"))
        .expect("replace");
    assert_eq!(
        rt.block_on(p.get_cluster_boot("etl"))
            .expect("get")
            .as_deref(),
        Some("{\"v\":2}")
    );
    rt.block_on(p.delete_cluster_boot("etl")).expect("delete");
    rt.block_on(p.delete_cluster_boot("etl"))
        .expect("deleting twice is fine");
    assert_eq!(rt.block_on(p.get_cluster_boot("etl")).expect("get"), None);
    assert_eq!(
        rt.block_on(p.get_cluster_boot("other.cluster"))
            .expect("get")
            .as_deref(),
        Some("{\"v\":9}"),
        "the other document is untouched"
    );
}

#[test]
fn api_errors_come_back_typed() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    // An unknown machine type is the API's 400: invalid, not retried.
    let mut bad = launch(1, "bad-type", "zeta");
    bad.node_type = "e2-gigantic".into();
    match rt.block_on(p.launch(&bad)) {
        Err(ProviderError::Invalid { message, .. }) => {
            assert!(message.contains("e2-gigantic"), "{message}")
        }
        other => panic!("expected an invalid request, got {other:?}"),
    }
    // Every call throttled: the error is retryable throttling.
    fake.configure(r#"{"faults": {"rate": 1.0, "kinds": ["429"], "seed": 1, "methods": ["GET"]}}"#);
    match rt.block_on(p.list_page(&project_filter("zeta"), None)) {
        Err(e @ ProviderError::Throttled(_)) => assert!(e.is_retryable()),
        other => panic!("expected throttling, got {other:?}"),
    }
    fake.configure(r#"{"faults": {"rate": 1.0, "kinds": ["503"], "seed": 1, "methods": ["GET"]}}"#);
    match rt.block_on(p.list_page(&project_filter("zeta"), None)) {
        Err(e @ ProviderError::Server(_)) => assert!(e.is_retryable()),
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn a_reader_never_sees_a_lossy_label_without_its_exact_value() {
    // The driver publishes its address while workers read it: every read
    // must give the old value or the new one, never `10_0_0_9_7078`.
    let fake = FakeGce::start();
    let p = std::sync::Arc::new(fake.provider(|_| {}));
    // One runtime for the writer and the reader, as in a node's agent: the
    // provider's pooled connections run on its worker threads, so a
    // connection one thread opened still answers while that thread waits
    // (two current-thread runtimes sharing one client hang on each other).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let made = rt
        .block_on(p.launch(&launch(1, "reader", "eta")))
        .expect("launch");
    let id = made[0].id.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reader_p, reader_id, reader_stop) = (p.clone(), id.clone(), stop.clone());
    let handle = rt.handle().clone();
    let reader = std::thread::spawn(move || {
        let rt = handle;
        let mut seen = BTreeSet::new();
        while !reader_stop.load(std::sync::atomic::Ordering::SeqCst) {
            let found = rt
                .block_on(reader_p.describe(std::slice::from_ref(&reader_id)))
                .expect("describe");
            seen.insert(found[0].tag(tags::DRIVER_ADDRESS).map(str::to_string));
            // Read often, but leave the (single-process) fake room to answer the writer.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        seen
    });
    for address in ["10.0.0.9:7078", "10.0.0.10:7079", "10.0.0.9:7078"] {
        let mut change = Retag::default();
        change
            .set
            .insert(tags::DRIVER_ADDRESS.into(), address.into());
        rt.block_on(p.retag(std::slice::from_ref(&id), &change))
            .expect("retag");
    }
    let mut change = Retag::default();
    change.remove.push(tags::DRIVER_ADDRESS.into());
    rt.block_on(p.retag(std::slice::from_ref(&id), &change))
        .expect("retag");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.join().expect("the reader");
    let allowed: BTreeSet<Option<String>> = [
        None,
        Some("10.128.0.7:7077".to_string()),
        Some("10.0.0.9:7078".to_string()),
        Some("10.0.0.10:7079".to_string()),
    ]
    .into();
    assert!(seen.is_subset(&allowed), "a reader saw {seen:?}");
    assert!(seen.len() >= 2, "the reader saw the changes: {seen:?}");
}
