//! The Azure provider against the fake Resource Manager
//! (`support/fake_arm.py`), call by call: what it sends, what ARM then
//! holds, and how each failure ARM reports comes back as a typed error.

mod support;

use std::collections::BTreeSet;

use motorpool_provider::{
    InstanceState, LaunchRequest, Provider, ProviderError, Retag, TagFilter, Tags, tags,
};
use support::FakeArm;

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
    tags.insert(tags::DRIVER_ADDRESS.into(), "10.0.0.7:7077".into());
    LaunchRequest {
        count,
        node_type: "Standard_D2s_v5".into(),
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
fn the_fake_refuses_what_resource_manager_refuses() {
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "test_fake_arm"])
        .current_dir(support::support_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3 -m unittest");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the fake's tests failed:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn vms_are_launched_tagged_listed_by_page_retagged_and_deleted() {
    let fake = FakeArm::start();
    fake.configure(r#"{"page_size": 2}"#);
    let p = fake.provider(|_| {});
    let rt = rt();
    let made = rt
        .block_on(p.launch(&launch(5, "tok-1", "alpha")))
        .expect("launch");
    assert_eq!(made.len(), 5, "{made:#?}");
    let held = fake.project_vms("alpha");
    assert_eq!(held.len(), 5);
    for vm in &held {
        assert_eq!(vm.size, "Standard_D2s_v5");
        assert_eq!(vm.resource_group, support::GROUP);
        assert_eq!(vm.tag("motorpool-role"), Some("idle"));
        assert_eq!(vm.tag("motorpool-driver-address"), Some("10.0.0.7:7077"));
        assert!(vm.tag("motorpool-launch").is_some(), "tagged at creation");
        assert_eq!(vm.custom_data, "#!/bin/sh\necho hello\n");
        assert_eq!(vm.power_state, "running");
        assert_eq!(vm.nic_ids.len(), 1, "one network interface, in the subnet");
    }
    assert_eq!(fake.nic_count(), 5);

    // Listed by page: 5 VMs at 2 a page are 3 pages.
    let before = fake.count("GET virtualMachines");
    let listed = rt.block_on(list_all(&p, &project_filter("alpha")));
    assert_eq!(fake.count("GET virtualMachines") - before, 3);
    assert_eq!(listed.len(), 5);
    for i in &listed {
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.node_type, "Standard_D2s_v5");
        assert_eq!(i.image, motorpool_azure::DEFAULT_IMAGE);
        assert!(i.launched_at > 1_700_000_000, "{i:?}");
        assert!(!i.tags.contains_key("motorpool-launch"));
    }
    assert!(
        rt.block_on(list_all(&p, &project_filter("beta")))
            .is_empty()
    );

    // Retag two: a change, an addition and a removal at once.
    let ids: Vec<String> = listed.iter().take(2).map(|i| i.id.clone()).collect();
    let mut change = Retag::default();
    change.set.insert(tags::ROLE.into(), "driver".into());
    change.set.insert("team/area?".into(), "data & ml".into());
    change.remove.push(tags::DRIVER_ADDRESS.into());
    rt.block_on(p.retag(&ids, &change)).expect("retag");
    for i in rt.block_on(p.describe(&ids)).expect("describe") {
        assert_eq!(i.tag(tags::ROLE), Some("driver"));
        assert_eq!(
            i.tag("team/area?"),
            Some("data & ml"),
            "a name Azure forbids, escaped"
        );
        assert_eq!(i.tag(tags::DRIVER_ADDRESS), None);
    }

    // Deallocate and start (warm: stopped pools), then delete: VM, NIC and disk go.
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
    assert!(fake.project_vms("alpha").is_empty());
    assert_eq!(fake.nic_count(), 0, "the NICs went with their VMs");
    rt.block_on(p.terminate(&all))
        .expect("terminating again is fine");
}

#[test]
fn a_repeated_launch_returns_the_first_vms() {
    let fake = FakeArm::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    let first = rt
        .block_on(p.launch(&launch(3, "same", "gamma")))
        .expect("launch");
    let again = rt
        .block_on(p.launch(&launch(3, "same", "gamma")))
        .expect("relaunch");
    let ids = |v: &[motorpool_provider::Instance]| -> BTreeSet<String> {
        v.iter().map(|i| i.id.clone()).collect()
    };
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(fake.project_vms("gamma").len(), 3);
    assert_eq!(
        fake.count("PUT virtualMachines/{name}"),
        3,
        "{}",
        fake.requests()
    );
}

#[test]
fn capacity_and_quota_errors_fail_clearly_and_leave_nothing() {
    let fake = FakeArm::start();
    let rt = rt();
    let p = fake.provider(|_| {});
    // A size out of capacity at once (409 SkuNotAvailable).
    fake.configure(r#"{"unavailable_sizes": ["Standard_D2s_v5"]}"#);
    match rt.block_on(p.launch(&launch(2, "sku", "delta"))) {
        Err(ProviderError::Capacity(m)) => {
            assert!(m.contains("SKU") || m.contains("Capacity"), "{m}")
        }
        other => panic!("expected a capacity error, got {other:?}"),
    }
    // A size whose allocation fails later: the failed VMs are deleted again.
    fake.configure(r#"{"unavailable_sizes": [], "allocation_failures": ["Standard_D2s_v5"]}"#);
    match rt.block_on(p.launch(&launch(2, "alloc", "delta"))) {
        Err(ProviderError::Capacity(m)) => assert!(m.contains("llocation"), "{m}"),
        other => panic!("expected a capacity error, got {other:?}"),
    }
    assert!(
        fake.project_vms("delta").is_empty(),
        "{:#?}",
        fake.project_vms("delta")
    );
    // With spot: true, Spot out of capacity falls back to regular VMs.
    fake.configure(r#"{"allocation_failures": [], "spot_core_quota": {"westeurope": 0}}"#);
    let spot = fake.provider(|c| c.spot = true);
    let made = rt.block_on(spot.launch(&launch(1, "spot", "delta")));
    match made {
        Ok(made) => {
            assert_eq!(made.len(), 1);
            assert_eq!(fake.project_vms("delta")[0].priority, "Regular");
        }
        Err(e) => panic!("spot fell back to regular: {e}"),
    }
    // Over the regional core quota: a quota error, nothing made.
    fake.configure(r#"{"core_quota": {"westeurope": 4}}"#);
    match rt.block_on(p.launch(&launch(3, "quota", "epsilon"))) {
        Err(ProviderError::Quota(m)) => assert!(m.contains("quota"), "{m}"),
        other => panic!("expected a quota error, got {other:?}"),
    }
    assert!(fake.project_vms("epsilon").is_empty());
}

#[test]
fn cluster_boot_documents_live_in_template_specs() {
    let fake = FakeArm::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    assert_eq!(rt.block_on(p.get_cluster_boot("etl")).expect("get"), None);
    rt.block_on(p.put_cluster_boot("etl", "{\"v\":1}"))
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
}

#[test]
fn resource_manager_errors_come_back_typed() {
    let fake = FakeArm::start();
    let p = fake.provider(|_| {});
    let rt = rt();
    let mut bad = launch(1, "bad-size", "zeta");
    bad.node_type = "Standard_Z99".into();
    match rt.block_on(p.launch(&bad)) {
        Err(ProviderError::Invalid { message, .. }) => {
            assert!(message.contains("Standard_Z99"), "{message}")
        }
        other => panic!("expected an invalid request, got {other:?}"),
    }
    fake.configure(r#"{"faults": {"rate": 1.0, "kinds": ["429"], "seed": 1, "methods": ["GET"]}}"#);
    match rt.block_on(p.list_page(&project_filter("zeta"), None)) {
        Err(e @ ProviderError::Throttled(_)) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("retry after"), "{e}");
        }
        other => panic!("expected throttling, got {other:?}"),
    }
    fake.configure(r#"{"faults": {"rate": 1.0, "kinds": ["503"], "seed": 1, "methods": ["GET"]}}"#);
    match rt.block_on(p.list_page(&project_filter("zeta"), None)) {
        Err(e @ ProviderError::Server(_)) => assert!(e.is_retryable()),
        other => panic!("expected a server error, got {other:?}"),
    }
    fake.configure(r#"{"faults": {"rate": 0.0}, "deny_token": "motorpool-local-placeholder"}"#);
    match rt.block_on(p.list_page(&project_filter("zeta"), None)) {
        Err(ProviderError::Auth(m)) => assert!(
            m.contains("AuthorizationFailed") || m.contains("authoriz"),
            "{m}"
        ),
        other => panic!("expected an authorization error, got {other:?}"),
    }
}
