//! The AWS provider against a real EC2 API implementation: moto's server on
//! 127.0.0.1 (one fresh server per test), sometimes behind the fault proxy of
//! `support`, which also records what went over the wire.

mod support;

use std::collections::BTreeSet;

use motorpool_aws::AwsProvider;
use motorpool_aws::aws_sdk_ec2;
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, Provider, ProviderError, Retag, TagFilter, Tags, tags,
};
use support::{AMI, FaultProxy, Faults, Moto, provider};

fn pool_tags(project: &str, pool: &str) -> Tags {
    let mut t = Tags::new();
    t.insert(tags::PROJECT.into(), project.into());
    t.insert(tags::KIND.into(), "pool".into());
    t.insert(tags::NAME.into(), pool.into());
    t.insert(tags::ROLE.into(), "idle".into());
    t
}

fn request(project: &str, count: u32, token: &str) -> LaunchRequest {
    LaunchRequest {
        count,
        node_type: "t3.micro".into(),
        image: None,
        tags: pool_tags(project, "general"),
        user_data: String::new(),
        client_token: token.into(),
    }
}

fn filter(pairs: &[(&str, &str)]) -> TagFilter {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every instance matching `filter`, page by page; and the number of pages.
async fn list_all(p: &AwsProvider, filter: &TagFilter) -> (Vec<Instance>, usize) {
    let mut all = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = p.list_page(filter, token).await.expect("list a page");
        pages += 1;
        all.extend(page.instances);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return (all, pages),
        }
    }
}

fn ids(instances: &[Instance]) -> BTreeSet<String> {
    instances.iter().map(|i| i.id.clone()).collect()
}

fn field(e: &ProviderError) -> Option<&str> {
    match e {
        ProviderError::Invalid { field, .. } => field.as_deref(),
        _ => None,
    }
}

#[tokio::test]
async fn launches_are_batched_tagged_at_birth_and_listed_by_tag() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port, Faults::default());
    let p = provider(&proxy.url(), |c| {
        c.tags.insert("team".into(), "data".into());
        c.root_volume_gb = Some(20);
    });
    let mut first = request("births", 3, "mp-births-a");
    first.user_data = "#cloud-config\nruncmd: [echo hi]\n".into();
    let a = p.launch(&first).await.expect("launch 3");
    let b = p
        .launch(&request("births", 2, "mp-births-b"))
        .await
        .expect("launch 2");
    assert_eq!((a.len(), b.len()), (3, 2));
    for i in a.iter().chain(&b) {
        assert_eq!(i.node_type, "t3.micro", "{i:?}");
        assert_eq!(i.image, AMI, "{i:?}");
        assert_eq!(i.tag(tags::PROJECT), Some("births"), "{i:?}");
        assert_eq!(i.tag(tags::ROLE), Some("idle"), "{i:?}");
        assert_eq!(i.tag("team"), Some("data"), "extra spec tags: {i:?}");
        assert!(
            i.tag(motorpool_aws::LAUNCH_TAG).is_none(),
            "bookkeeping tag hidden"
        );
        assert!(i.id.starts_with("i-"), "{i:?}");
    }

    // What went over the wire: one RunInstances per batch, all or nothing,
    // tagged at birth (instance and volume), idempotency token, user data, root volume.
    let bodies = proxy.stats.run_instances_bodies();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    let body = &bodies[0];
    for part in [
        "MinCount=3",
        "MaxCount=3",
        "ClientToken=mp-births-a",
        "InstanceType=t3.micro",
        "TagSpecification.1.ResourceType=instance",
        "TagSpecification.2.ResourceType=volume",
        "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fxvda",
        "BlockDeviceMapping.1.Ebs.VolumeSize=20",
    ] {
        assert!(body.contains(part), "`{part}` missing from {body}");
    }
    let user_data = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("UserData="))
        .expect("user data sent");
    assert!(
        user_data.starts_with("I2Nsb3VkLWNvbmZpZw"),
        "base64 of #cloud-config: {user_data}"
    );
    assert_eq!(
        proxy.stats.count("DescribeImages"),
        1,
        "root device looked up once"
    );

    // Tagged at birth: listed by tag at once, no CreateTags needed.
    assert_eq!(proxy.stats.count("CreateTags"), 0);
    let (listed, _) = list_all(&p, &filter(&[(tags::PROJECT, "births")])).await;
    assert_eq!(ids(&listed), &ids(&a) | &ids(&b));
    assert!(listed.iter().all(|i| i.state == InstanceState::Running));
    // Another project's instances and other names stay out of a filtered list.
    p.launch(&request("others", 1, "mp-others"))
        .await
        .expect("launch");
    let (listed, _) = list_all(&p, &filter(&[(tags::PROJECT, "births")])).await;
    assert_eq!(listed.len(), 5);
    let (none, _) = list_all(
        &p,
        &filter(&[(tags::PROJECT, "births"), (tags::NAME, "nope")]),
    )
    .await;
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_launch_with_the_same_token_returns_the_same_instances() {
    let moto = Moto::start();
    let direct = provider(&moto.url(), |_| {});
    let first = direct
        .launch(&request("idem", 3, "mp-idem-1"))
        .await
        .expect("launch");
    let again = direct
        .launch(&request("idem", 3, "mp-idem-1"))
        .await
        .expect("launch again");
    assert_eq!(ids(&first), ids(&again));

    // The response of a launch is lost (503 after moto made the instances):
    // the retry with the same token finds them instead of launching more.
    let lossy = FaultProxy::start(
        moto.port,
        Faults {
            lost_response_rate: 1.0,
            ..Faults::default()
        },
    );
    let through_lossy = provider(&lossy.url(), |_| {});
    let err = through_lossy
        .launch(&request("idem", 2, "mp-idem-2"))
        .await
        .expect_err("the response is lost");
    assert!(
        matches!(err, ProviderError::Server(_)) && err.is_retryable(),
        "{err:?}"
    );
    assert_eq!(
        lossy.stats.lost.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let retried = direct
        .launch(&request("idem", 2, "mp-idem-2"))
        .await
        .expect("retry");
    assert_eq!(retried.len(), 2);
    let (all, _) = list_all(&direct, &filter(&[(tags::PROJECT, "idem")])).await;
    assert_eq!(all.len(), 5, "3 + 2, nothing twice: {all:#?}");
    assert!(ids(&retried).is_subset(&ids(&all)));

    // Terminated instances of a token are still its instances (as EC2's
    // ClientToken does): a replay never launches again.
    direct
        .terminate(&first.iter().map(|i| i.id.clone()).collect::<Vec<_>>())
        .await
        .expect("terminate");
    let replay = direct
        .launch(&request("idem", 3, "mp-idem-1"))
        .await
        .expect("replay");
    assert_eq!(ids(&replay), ids(&first));
    assert!(replay.iter().all(|i| i.state == InstanceState::Terminated));
}

#[tokio::test]
async fn listing_is_paginated_and_leaves_out_terminated_instances() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port, Faults::default());
    let p = provider(&proxy.url(), |c| c.page_size = 5);
    let mut launched = Vec::new();
    for n in 0..12 {
        let batch = p
            .launch(&request("pages", 1, &format!("mp-pages-{n}")))
            .await
            .expect("launch");
        launched.extend(batch);
    }
    let (_, _) = list_all(&p, &filter(&[(tags::PROJECT, "pages")])).await;
    let before = proxy.stats.count("DescribeInstances");
    let (all, pages) = list_all(&p, &filter(&[(tags::PROJECT, "pages")])).await;
    assert_eq!(ids(&all), ids(&launched), "every instance exactly once");
    assert_eq!(all.len(), 12);
    assert_eq!(pages, 3, "12 instances, 5 per page");
    assert_eq!(
        proxy.stats.count("DescribeInstances") - before,
        3,
        "one call per page"
    );

    // Stopped ones are listed, terminated ones are not.
    p.stop(std::slice::from_ref(&launched[0].id))
        .await
        .expect("stop");
    p.terminate(std::slice::from_ref(&launched[1].id))
        .await
        .expect("terminate");
    let (all, _) = list_all(&p, &filter(&[(tags::PROJECT, "pages")])).await;
    assert_eq!(all.len(), 11);
    assert!(!ids(&all).contains(&launched[1].id));
    let stopped = all
        .iter()
        .find(|i| i.id == launched[0].id)
        .expect("stopped one listed");
    assert!(
        matches!(
            stopped.state,
            InstanceState::Stopped | InstanceState::Stopping
        ),
        "{stopped:?}"
    );
}

#[tokio::test]
async fn pool_instances_are_retagged_into_a_cluster_and_back() {
    let moto = Moto::start();
    let p = provider(&moto.url(), |_| {});
    let mut req = request("retag", 3, "mp-retag");
    req.tags
        .insert(tags::IDLE_SINCE.into(), "1700000000".into());
    let pool = p.launch(&req).await.expect("launch");
    let taken: Vec<String> = pool.iter().take(2).map(|i| i.id.clone()).collect();

    let mut into = Retag::default();
    into.set.insert(tags::KIND.into(), "cluster".into());
    into.set.insert(tags::NAME.into(), "etl".into());
    into.set.insert(tags::ROLE.into(), "worker".into());
    into.set.insert(tags::POOL.into(), "general".into());
    into.remove.push(tags::IDLE_SINCE.into());
    p.retag(&taken, &into).await.expect("into the cluster");
    // Repeating a retag is harmless.
    p.retag(&taken, &into).await.expect("again");

    let cluster = filter(&[
        (tags::PROJECT, "retag"),
        (tags::KIND, "cluster"),
        (tags::NAME, "etl"),
    ]);
    let (workers, _) = list_all(&p, &cluster).await;
    assert_eq!(ids(&workers), taken.iter().cloned().collect());
    for w in &workers {
        assert_eq!(w.tag(tags::ROLE), Some("worker"));
        assert_eq!(w.tag(tags::POOL), Some("general"));
        assert_eq!(w.tag(tags::IDLE_SINCE), None, "removed: {w:?}");
    }
    let pool_filter = filter(&[
        (tags::PROJECT, "retag"),
        (tags::KIND, "pool"),
        (tags::NAME, "general"),
    ]);
    assert_eq!(list_all(&p, &pool_filter).await.0.len(), 1);

    // The cluster goes: its instances return to the pool.
    let mut back = Retag::default();
    back.set.insert(tags::KIND.into(), "pool".into());
    back.set.insert(tags::NAME.into(), "general".into());
    back.set.insert(tags::ROLE.into(), "idle".into());
    back.set
        .insert(tags::IDLE_SINCE.into(), "1700000100".into());
    back.remove.push(tags::POOL.into());
    p.retag(&taken, &back).await.expect("back to the pool");
    assert!(list_all(&p, &cluster).await.0.is_empty());
    let (idle, _) = list_all(&p, &pool_filter).await;
    assert_eq!(idle.len(), 3);
    assert!(
        idle.iter()
            .all(|i| i.tag(tags::POOL).is_none() && i.tag(tags::ROLE) == Some("idle"))
    );

    let err = p
        .retag(&["local-1".to_string()], &back)
        .await
        .expect_err("not an EC2 id");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn instances_stop_start_and_terminate_safely_in_batches() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port, Faults::default());
    let p = provider(&proxy.url(), |_| {});
    let launched = p
        .launch(&request("states", 3, "mp-states"))
        .await
        .expect("launch");
    let all: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    let project = filter(&[(tags::PROJECT, "states")]);
    let state_of = |list: &[Instance], id: &str| {
        list.iter()
            .find(|i| i.id == id)
            .map(|i| i.state)
            .unwrap_or(InstanceState::Terminated)
    };

    p.stop(&all[..2]).await.expect("stop");
    p.stop(&all[..2]).await.expect("stop again is fine");
    let (listed, _) = list_all(&p, &project).await;
    for id in &all[..2] {
        assert!(
            matches!(
                state_of(&listed, id),
                InstanceState::Stopped | InstanceState::Stopping
            ),
            "{listed:#?}"
        );
    }
    assert_eq!(state_of(&listed, &all[2]), InstanceState::Running);
    p.start(&all[..2]).await.expect("start");
    p.start(&all).await.expect("start running ones too");
    let (listed, _) = list_all(&p, &project).await;
    assert!(listed.iter().all(|i| i.state.is_live()), "{listed:#?}");

    let unknown = "i-0123456789abcdef0".to_string();
    let err = p
        .stop(std::slice::from_ref(&unknown))
        .await
        .expect_err("no such instance");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");

    // Terminate skips ids that are gone or not EC2's, and is safe to repeat.
    let mixed = vec![all[0].clone(), unknown.clone(), "local-7".to_string()];
    p.terminate(&mixed).await.expect("terminate with a gone id");
    p.terminate(&mixed).await.expect("and again");
    let (listed, _) = list_all(&p, &project).await;
    assert_eq!(ids(&listed), all[1..].iter().cloned().collect());

    // More than 1000 ids go in several calls.
    let before = proxy.stats.count("TerminateInstances");
    let mut many: Vec<String> = (0..1100).map(|n| format!("i-{n:017x}")).collect();
    many.extend(all[1..].iter().cloned());
    p.terminate(&many).await.expect("terminate 1102 ids");
    let calls = proxy.stats.count("TerminateInstances") - before;
    assert!(calls >= 2, "{calls} TerminateInstances calls for 1102 ids");
    assert!(list_all(&p, &project).await.0.is_empty());
}

#[tokio::test]
async fn ec2_errors_are_typed_and_name_the_spec_field() {
    let moto = Moto::start();
    let p = provider(&moto.url(), |_| {});

    let mut bad_image = request("errors", 1, "mp-errors-ami");
    bad_image.image = Some("ami-00000000000000000".into());
    let err = p.launch(&bad_image).await.expect_err("no such AMI");
    assert_eq!(field(&err), Some("provider.image"), "{err:?}");
    assert!(err.to_string().contains("provider.image"), "{err}");
    assert!(!err.is_retryable());

    let bad_subnet = provider(&moto.url(), |c| {
        c.subnet_ids = vec!["subnet-00000000000000000".into()]
    });
    let err = bad_subnet
        .launch(&request("errors", 1, "mp-errors-subnet"))
        .await
        .expect_err("no such subnet");
    assert_eq!(field(&err), Some("provider.subnet_ids"), "{err:?}");

    let bad_root = provider(&moto.url(), |c| {
        c.image = Some("ami-0000000000000000f".into());
        c.root_volume_gb = Some(30);
    });
    let err = bad_root
        .launch(&request("errors", 1, "mp-errors-root"))
        .await
        .expect_err("no such AMI to size");
    assert_eq!(field(&err), Some("provider.image"), "{err:?}");

    // Throttling and 5xx from the wire are the retryable kinds.
    let throttling = FaultProxy::start(
        moto.port,
        Faults {
            throttle_rate: 1.0,
            ..Faults::default()
        },
    );
    let err = provider(&throttling.url(), |_| {})
        .list_page(&filter(&[(tags::PROJECT, "errors")]), None)
        .await
        .expect_err("throttled");
    assert!(matches!(err, ProviderError::Throttled(_)), "{err:?}");
    assert!(err.to_string().contains("RequestLimitExceeded"), "{err}");
    let unavailable = FaultProxy::start(
        moto.port,
        Faults {
            unavailable_rate: 1.0,
            ..Faults::default()
        },
    );
    let err = provider(&unavailable.url(), |_| {})
        .launch(&request("errors", 1, "mp-errors-503"))
        .await
        .expect_err("unavailable");
    assert!(matches!(err, ProviderError::Server(_)), "{err:?}");
    // Nothing was launched by any of that.
    let (all, _) = list_all(&p, &filter(&[(tags::PROJECT, "errors")])).await;
    assert!(all.is_empty(), "{all:#?}");

    // An endpoint with nothing behind it is a transient (retryable) failure.
    let port = support::free_port();
    let err = provider(&format!("http://127.0.0.1:{port}"), |_| {})
        .list_page(&TagFilter::new(), None)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, ProviderError::Server(_)), "{err:?}");
}

/// The default VPC's subnets of moto's us-east-1, via the SDK.
async fn subnets(p: &AwsProvider) -> Vec<String> {
    let client = p.ec2_client().await.expect("client");
    let out = client
        .describe_subnets()
        .send()
        .await
        .expect("describe subnets");
    let mut ids: Vec<String> = out
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// instance id -> (subnet, lifecycle) as EC2 reports them.
async fn placement(
    p: &AwsProvider,
    project: &str,
) -> std::collections::BTreeMap<String, (String, Option<String>)> {
    let client = p.ec2_client().await.expect("client");
    let out = client
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", tags::PROJECT))
                .values(project)
                .build(),
        )
        .send()
        .await
        .expect("describe");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            Some((
                i.instance_id()?.to_string(),
                (
                    i.subnet_id().unwrap_or_default().to_string(),
                    i.instance_lifecycle().map(|l| l.as_str().to_string()),
                ),
            ))
        })
        .collect()
}

#[tokio::test]
async fn capacity_errors_fail_over_to_the_next_subnet_and_spot_falls_back() {
    let moto = Moto::start();
    let direct = provider(&moto.url(), |_| {});
    let all_subnets = subnets(&direct).await;
    assert!(all_subnets.len() >= 2, "{all_subnets:?}");
    let (full, open) = (all_subnets[0].clone(), all_subnets[1].clone());
    let two = vec![full.clone(), open.clone()];

    // Subnet `full` has no capacity: every launch ends up in `open`.
    let proxy = FaultProxy::start(
        moto.port,
        Faults {
            full_subnets: vec![full.clone()],
            ..Faults::default()
        },
    );
    let p = provider(&proxy.url(), |c| c.subnet_ids = two.clone());
    for n in 0..6 {
        p.launch(&request("failover", 1, &format!("mp-failover-{n}")))
            .await
            .expect("launch fails over");
    }
    let placed = placement(&direct, "failover").await;
    assert_eq!(placed.len(), 6);
    assert!(placed.values().all(|(s, _)| *s == open), "{placed:#?}");
    let refused = proxy
        .stats
        .capacity
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused >= 1, "some launches started in the full subnet");
    // Launches spread: without the full subnet they use both.
    let spread = provider(&moto.url(), |c| c.subnet_ids = two.clone());
    for n in 0..8 {
        spread
            .launch(&request("spread", 1, &format!("mp-spread-{n}")))
            .await
            .expect("launch");
    }
    let used: BTreeSet<String> = placement(&direct, "spread")
        .await
        .into_values()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(used.len(), 2, "8 launches over 2 subnets: {used:?}");
    // A repeated launch that had failed over returns its instances.
    let again = p
        .launch(&request("failover", 1, "mp-failover-0"))
        .await
        .expect("again");
    assert_eq!(placement(&direct, "failover").await.len(), 6);
    assert_eq!(again.len(), 1);

    // No spot capacity anywhere: spot falls back to on-demand.
    let no_spot = FaultProxy::start(
        moto.port,
        Faults {
            no_spot: true,
            ..Faults::default()
        },
    );
    let spot = provider(&no_spot.url(), |c| {
        c.subnet_ids = two.clone();
        c.spot = true;
    });
    spot.launch(&request("spot", 2, "mp-spot-1"))
        .await
        .expect("on-demand fallback");
    let placed = placement(&direct, "spot").await;
    assert_eq!(placed.len(), 2);
    assert!(
        placed.values().all(|(_, l)| l.is_none()),
        "on-demand: {placed:#?}"
    );
    let bodies = no_spot.stats.run_instances_bodies();
    assert_eq!(bodies.len(), 3, "spot in both subnets, then on-demand");
    assert!(bodies[..2].iter().all(|b| b.contains("MarketType=spot")));
    assert!(!bodies[2].contains("MarketType=spot"));
    // With spot capacity, spot it is.
    let spot_ok = provider(&moto.url(), |c| c.spot = true);
    spot_ok
        .launch(&request("spot-ok", 1, "mp-spot-2"))
        .await
        .expect("spot");
    let placed = placement(&direct, "spot-ok").await;
    assert!(
        placed.values().all(|(_, l)| l.as_deref() == Some("spot")),
        "{placed:#?}"
    );

    // Both subnets full: a capacity error that says what was tried.
    let all_full = FaultProxy::start(
        moto.port,
        Faults {
            full_subnets: two.clone(),
            ..Faults::default()
        },
    );
    let err = provider(&all_full.url(), |c| c.subnet_ids = two.clone())
        .launch(&request("full", 1, "mp-full"))
        .await
        .expect_err("no capacity anywhere");
    assert!(matches!(err, ProviderError::Capacity(_)), "{err:?}");
    assert!(err.to_string().contains("also tried"), "{err}");
    assert!(placement(&direct, "full").await.is_empty());
}
