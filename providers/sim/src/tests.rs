use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, Provider, ProviderError, Retag, TagFilter, Tags,
};

use super::*;

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn request(count: u32, token: &str, pairs: &[(&str, &str)]) -> LaunchRequest {
    LaunchRequest {
        count,
        node_type: "small".to_string(),
        image: None,
        tags: tags(pairs),
        user_data: String::new(),
        client_token: token.to_string(),
    }
}

fn sim(home: &Path) -> SimProvider {
    sim_with(home, |_| {})
}

fn sim_with(home: &Path, f: impl FnOnce(&mut SimConfig)) -> SimProvider {
    let mut config = SimConfig {
        home: home.to_path_buf(),
        seed: Some(7),
        ..SimConfig::default()
    };
    f(&mut config);
    match SimProvider::new(config) {
        Ok(p) => p,
        Err(e) => panic!("cannot make a sim provider: {e}"),
    }
}

fn home() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("no temp dir: {e}"),
    }
}

async fn list_all(p: &SimProvider, filter: &TagFilter) -> Result<(Vec<Instance>, usize)> {
    let mut all = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = p.list_page(filter, token).await?;
        pages += 1;
        all.extend(page.instances);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok((all, pages)),
        }
    }
}

fn ids(instances: &[Instance]) -> Vec<String> {
    instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn defaults_and_basics() -> Result<()> {
    let d = SimConfig::default();
    assert_eq!(d.page_size, 1000);
    assert_eq!(d.latency, Duration::ZERO);
    assert_eq!((d.throttle_rate, d.error_rate), (0.0, 0.0));
    assert_eq!(d.boot_time, Duration::ZERO);
    assert!(d.capacity.is_none());

    let h = home();
    let p = sim(h.path());
    assert_eq!(p.kind(), "sim");
    assert_eq!(p.default_image(), "sim-image-1");
    assert_eq!(p.catalog(), catalog().as_slice());
    assert_eq!(p.state_path(), h.path().join("sim").join("state.db"));

    // A fresh account lists nothing, and does not need a state file for that.
    let page = p.list_page(&TagFilter::new(), None).await?;
    assert!(page.instances.is_empty() && page.next_token.is_none());

    let got = p.launch(&request(3, "t1", &[("team", "data")])).await?;
    assert_eq!(ids(&got), ["sim-00000001", "sim-00000002", "sim-00000003"]);
    for i in &got {
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.image, "sim-image-1");
        assert_eq!(i.node_type, "small");
        assert_eq!(i.tag("team"), Some("data"));
        assert!(i.launched_at > 1_600_000_000);
    }
    assert!(state_path(h.path()).is_file());
    assert_eq!(p.api_calls(), 2);
    Ok(())
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let h = home();
    for f in [
        (|c: &mut SimConfig| c.throttle_rate = 1.5) as fn(&mut SimConfig),
        |c| c.error_rate = -0.1,
        |c| c.error_rate = f64::NAN,
        |c| c.page_size = 0,
        |c| c.home = PathBuf::new(),
    ] {
        let mut config = SimConfig {
            home: h.path().to_path_buf(),
            ..SimConfig::default()
        };
        f(&mut config);
        assert!(matches!(
            SimProvider::new(config),
            Err(ProviderError::Invalid { .. })
        ));
    }
}

#[tokio::test]
async fn pagination_covers_every_instance_exactly_once() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| c.page_size = 7);
    p.launch(&request(30, "a", &[("motorpool-project", "a")]))
        .await?;
    p.launch(&request(20, "b", &[("motorpool-project", "b"), ("x", "1")]))
        .await?;
    p.launch(&request(5, "c", &[("motorpool-project", "a"), ("x", "1")]))
        .await?;

    let (all, pages) = list_all(&p, &TagFilter::new()).await?;
    assert_eq!(all.len(), 55);
    assert_eq!(pages, 8); // 7 full pages and one of 6: no trailing empty page
    let listed = ids(&all);
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "sorted by id, no duplicates");

    let (a, _) = list_all(&p, &tags(&[("motorpool-project", "a")])).await?;
    assert_eq!(a.len(), 35);
    assert!(a.iter().all(|i| i.tag("motorpool-project") == Some("a")));
    let (ax, _) = list_all(&p, &tags(&[("motorpool-project", "a"), ("x", "1")])).await?;
    assert_eq!(ax.len(), 5);
    let (none, pages) = list_all(&p, &tags(&[("motorpool-project", "zzz")])).await?;
    assert!(none.is_empty());
    assert_eq!(pages, 1);

    // Exactly a multiple of the page size: the last full page has no token.
    let (b, pages) = list_all(&p, &tags(&[("motorpool-project", "b")])).await?;
    assert_eq!((b.len(), pages), (20, 3));
    let q = sim_with(h.path(), |c| c.page_size = 5);
    let (b, pages) = list_all(&q, &tags(&[("motorpool-project", "b")])).await?;
    assert_eq!((b.len(), pages), (20, 4));
    Ok(())
}

#[tokio::test]
async fn changes_between_pages_do_not_skip_or_repeat_others() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| c.page_size = 10);
    let first = p.launch(&request(30, "a", &[])).await?;
    let page1 = p.list_page(&TagFilter::new(), None).await?;
    // Terminate the last one listed and one further on; launch new ones.
    p.terminate(&[first[9].id.clone(), first[15].id.clone()])
        .await?;
    p.launch(&request(3, "b", &[])).await?;
    let mut seen = ids(&page1.instances);
    let mut token = page1.next_token;
    while let Some(t) = token {
        let page = p.list_page(&TagFilter::new(), Some(t)).await?;
        seen.extend(ids(&page.instances));
        token = page.next_token;
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len());
    assert_eq!(seen.len(), 10 + 19 + 3);
    assert!(!seen.contains(&first[15].id));
    Ok(())
}

#[tokio::test]
async fn a_foreign_page_token_is_invalid() {
    let h = home();
    let p = sim(h.path());
    let r = p
        .list_page(&TagFilter::new(), Some("i-123".to_string()))
        .await;
    assert!(matches!(r, Err(ProviderError::Invalid { .. })), "{r:?}");
}

#[tokio::test]
async fn launch_is_idempotent_per_client_token() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let first = p.launch(&request(4, "tok", &[("k", "v")])).await?;
    let again = p.launch(&request(4, "tok", &[("k", "v")])).await?;
    assert_eq!(first, again);
    assert_eq!(p.snapshot().await?.len(), 4);

    // The same token reports the current state, terminated ones included.
    p.stop(&[first[0].id.clone()]).await?;
    p.terminate(&[first[1].id.clone()]).await?;
    let again = p.launch(&request(4, "tok", &[("k", "v")])).await?;
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(again[0].state, InstanceState::Stopped);
    assert_eq!(again[1].state, InstanceState::Terminated);
    assert_eq!(again[2].state, InstanceState::Running);
    assert_eq!(p.snapshot().await?.len(), 3);

    // A token reused for another launch is refused.
    let r = p.launch(&request(5, "tok", &[("k", "v")])).await;
    assert!(
        matches!(&r, Err(ProviderError::Invalid { field: Some(f), .. }) if f == "client_token"),
        "{r:?}"
    );

    // Another token makes new ones; an empty token is no idempotency.
    let other = p.launch(&request(1, "tok2", &[])).await?;
    assert_eq!(ids(&other), ["sim-00000005"]);
    p.launch(&request(1, "", &[])).await?;
    p.launch(&request(1, "", &[])).await?;
    assert_eq!(p.snapshot().await?.len(), 6);
    Ok(())
}

#[tokio::test]
async fn invalid_launches() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let r = p.launch(&request(0, "t", &[])).await;
    assert!(matches!(r, Err(ProviderError::Invalid { .. })), "{r:?}");
    let mut req = request(1, "t", &[]);
    req.node_type = "galactic".to_string();
    let r = p.launch(&req).await;
    match r {
        Err(ProviderError::Invalid { field, message }) => {
            assert_eq!(field.as_deref(), Some("node_type"));
            assert!(message.contains("galactic"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(p.snapshot().await?.is_empty());
    // The token was not used up by the failed launch.
    let mut req = request(1, "t", &[]);
    req.image = Some("custom".to_string());
    assert_eq!(p.launch(&req).await?[0].image, "custom");
    Ok(())
}

#[tokio::test]
async fn capacity_is_enforced_on_launch_and_start() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| c.capacity = Some(10));
    let first = p.launch(&request(8, "a", &[])).await?;
    let r = p.launch(&request(3, "b", &[])).await;
    assert!(matches!(r, Err(ProviderError::Capacity(_))), "{r:?}");
    assert_eq!(
        p.snapshot().await?.len(),
        8,
        "a refused launch changes nothing"
    );
    // Stopped instances do not count.
    p.stop(&ids(&first[..3])).await?;
    p.launch(&request(5, "b", &[])).await?;
    let r = p.start(&ids(&first[..3])).await;
    assert!(matches!(r, Err(ProviderError::Capacity(_))), "{r:?}");
    p.terminate(&ids(&first[3..6])).await?;
    p.start(&ids(&first[..3])).await?;
    assert_eq!(p.snapshot().await?.len(), 10);
    Ok(())
}

#[tokio::test]
async fn terminate_stop_start_retag() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let got = p
        .launch(&request(3, "a", &[("motorpool-role", "idle"), ("x", "1")]))
        .await?;
    let all = ids(&got);

    p.stop(&all[..2]).await?;
    p.stop(&all[..2]).await?; // safe to repeat
    let snap = p.snapshot().await?;
    assert_eq!(snap[0].state, InstanceState::Stopped);
    assert_eq!(snap[1].state, InstanceState::Stopped);
    assert_eq!(snap[2].state, InstanceState::Running);
    p.start(&all[..1]).await?;
    p.start(&all[..1]).await?;
    assert_eq!(p.snapshot().await?[0].state, InstanceState::Running);

    let change = Retag {
        set: tags(&[("motorpool-role", "worker"), ("y", "2")]),
        remove: vec!["x".to_string(), "absent".to_string()],
    };
    p.retag(&all[1..], &change).await?;
    p.retag(&all[1..], &change).await?;
    let snap = p.snapshot().await?;
    assert_eq!(
        snap[0].tags,
        tags(&[("motorpool-role", "idle"), ("x", "1")])
    );
    assert_eq!(
        snap[2].tags,
        tags(&[("motorpool-role", "worker"), ("y", "2")])
    );

    let ghost = "sim-0000ffff".to_string();
    for r in [
        p.retag(&[all[0].clone(), ghost.clone()], &change).await,
        p.stop(std::slice::from_ref(&ghost)).await,
        p.start(std::slice::from_ref(&ghost)).await,
    ] {
        match r {
            Err(ProviderError::NotFound(m)) => assert!(m.contains(&ghost), "{m}"),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    // The failed retag changed nothing, not even on the instance that exists.
    assert_eq!(p.snapshot().await?[0].tags.get("y"), None);

    p.terminate(&[all[0].clone(), ghost.clone()]).await?;
    p.terminate(&[all[0].clone()]).await?;
    assert_eq!(ids(&p.snapshot().await?), all[1..].to_vec());
    p.terminate(&[]).await?;
    Ok(())
}

#[tokio::test]
async fn boot_time_makes_instances_pending_after_launch_and_start() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| c.boot_time = Duration::from_millis(300));
    let got = p.launch(&request(2, "a", &[])).await?;
    assert!(got.iter().all(|i| i.state == InstanceState::Pending));
    let page = p.list_page(&TagFilter::new(), None).await?;
    assert!(
        page.instances
            .iter()
            .all(|i| i.state == InstanceState::Pending)
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let page = p.list_page(&TagFilter::new(), None).await?;
    assert!(
        page.instances
            .iter()
            .all(|i| i.state == InstanceState::Running)
    );
    p.stop(&ids(&got[..1])).await?;
    p.start(&ids(&got[..1])).await?;
    let snap = p.snapshot().await?;
    assert_eq!(snap[0].state, InstanceState::Pending);
    assert_eq!(snap[1].state, InstanceState::Running);
    Ok(())
}

#[tokio::test]
async fn fault_rates_roughly_hold() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| {
        c.throttle_rate = 0.1;
        c.error_rate = 0.2;
        c.seed = Some(42);
    });
    let n = 4000;
    let (mut throttled, mut server, mut ok) = (0, 0, 0);
    for _ in 0..n {
        match p.list_page(&TagFilter::new(), None).await {
            Ok(_) => ok += 1,
            Err(ProviderError::Throttled(_)) => throttled += 1,
            Err(ProviderError::Server(_)) => server += 1,
            Err(e) => return Err(e),
        }
    }
    assert_eq!(p.api_calls(), n);
    // Expected: 400 throttled, 0.9 * 0.2 * 4000 = 720 server errors.
    assert!((330..=470).contains(&throttled), "throttled {throttled}");
    assert!((630..=810).contains(&server), "server {server}");
    assert_eq!(ok + throttled + server, n);

    // Seeded: the same seed gives the same sequence.
    let run = |seed| async move {
        let h = home();
        let p = sim_with(h.path(), |c| {
            c.throttle_rate = 0.3;
            c.error_rate = 0.3;
            c.seed = Some(seed);
        });
        let mut kinds = Vec::new();
        for _ in 0..50 {
            kinds.push(match p.list_page(&TagFilter::new(), None).await {
                Ok(_) => 'o',
                Err(ProviderError::Throttled(_)) => 't',
                Err(_) => 's',
            });
        }
        kinds
    };
    assert_eq!(run(9).await, run(9).await);
    assert_ne!(run(9).await, run(10).await);
    Ok(())
}

#[tokio::test]
async fn half_of_the_server_errors_on_mutations_lose_the_response() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| {
        c.error_rate = 1.0;
        c.seed = Some(3);
    });
    let clean = sim(h.path());
    let n = 400;
    let mut lost = 0;
    for i in 0..n {
        let r = p.launch(&request(1, &format!("t{i}"), &[])).await;
        assert!(matches!(r, Err(ProviderError::Server(_))), "{r:?}");
        let now = clean.snapshot().await?.len();
        if now > lost {
            lost = now;
        }
    }
    // About half of the failed launches were made anyway.
    assert!((150..=250).contains(&lost), "lost responses: {lost}");
    Ok(())
}

#[tokio::test]
async fn retry_after_a_lost_launch_response_makes_no_duplicate() -> Result<()> {
    let h = home();
    let flaky = sim_with(h.path(), |c| {
        c.error_rate = 1.0;
        c.seed = Some(11);
    });
    let clean = sim(h.path());
    let req = request(
        5,
        "plan-1/cluster.etl/workers",
        &[("motorpool-name", "etl")],
    );
    // Call until a launch was made but its answer lost.
    let mut attempts = 0;
    while clean.snapshot().await?.is_empty() {
        attempts += 1;
        assert!(attempts < 100, "never saved a launch");
        let r = flaky.launch(&req).await;
        assert!(matches!(r, Err(ProviderError::Server(_))), "{r:?}");
    }
    // More failed retries with the same token still make nothing new.
    for _ in 0..20 {
        let _ = flaky.launch(&req).await;
    }
    let saved = clean.snapshot().await?;
    assert_eq!(saved.len(), 5);
    // The retry that gets through returns exactly those.
    let got = clean.launch(&req).await?;
    assert_eq!(got, saved);
    assert_eq!(clean.snapshot().await?.len(), 5);

    // A retried engine loop on a flaky provider converges too.
    let retrying = sim_with(h.path(), |c| {
        c.throttle_rate = 0.3;
        c.error_rate = 0.5;
        c.seed = Some(5);
    });
    let req2 = request(3, "plan-1/pool.general", &[]);
    let mut got = None;
    for _ in 0..200 {
        match retrying.launch(&req2).await {
            Ok(v) => {
                got = Some(v);
                break;
            }
            Err(e) if e.is_retryable() => continue,
            Err(e) => return Err(e),
        }
    }
    let got = got.unwrap_or_default();
    assert_eq!(got.len(), 3);
    assert_eq!(clean.snapshot().await?.len(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_launches_all_persist() -> Result<()> {
    let h = home();
    let p = Arc::new(sim(h.path()));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            p.launch(&request(3, &format!("task-{t}"), &[])).await
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let got = task
            .await
            .map_err(|e| ProviderError::Internal(e.to_string()))??;
        assert_eq!(got.len(), 3);
        all.extend(ids(&got));
    }
    assert_eq!(all.len(), 192);
    // Persisted: a fresh provider (a cold cache) reads them all back.
    let fresh = sim(h.path());
    let on_disk: BTreeSet<String> = ids(&fresh.snapshot().await?).into_iter().collect();
    assert_eq!(on_disk, all);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_providers_on_one_home_serialize_and_see_each_other() -> Result<()> {
    let h = home();
    // Two providers do not share the in-process mutex: only flock orders them,
    // as between two processes.
    let a = Arc::new(sim(h.path()));
    let b = Arc::new(sim(h.path()));
    assert!(
        a.list_page(&TagFilter::new(), None)
            .await?
            .instances
            .is_empty()
    );
    assert!(
        b.list_page(&TagFilter::new(), None)
            .await?
            .instances
            .is_empty()
    );

    a.launch(&request(2, "from-a", &[])).await?;
    let seen_by_b = b.list_page(&TagFilter::new(), None).await?;
    assert_eq!(seen_by_b.instances.len(), 2);
    b.retag(
        &ids(&seen_by_b.instances),
        &Retag {
            set: tags(&[("by", "b")]),
            remove: vec![],
        },
    )
    .await?;
    let seen_by_a = a.list_page(&TagFilter::new(), None).await?;
    assert!(seen_by_a.instances.iter().all(|i| i.tag("by") == Some("b")));

    let mut tasks = Vec::new();
    for t in 0..40 {
        let p = Arc::clone(if t % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            p.launch(&request(1, &format!("t{t}"), &[])).await
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| ProviderError::Internal(e.to_string()))??;
    }
    let (from_a, _) = list_all(&a, &TagFilter::new()).await?;
    let (from_b, _) = list_all(&b, &TagFilter::new()).await?;
    assert_eq!(from_a.len(), 42);
    assert_eq!(from_a, from_b);
    let unique: BTreeSet<_> = ids(&from_a).into_iter().collect();
    assert_eq!(unique.len(), 42);
    Ok(())
}

fn io(e: std::io::Error) -> ProviderError {
    ProviderError::Internal(e.to_string())
}

#[tokio::test]
async fn a_corrupt_state_database_is_a_clear_error() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    p.launch(&request(3, "a", &[])).await?;
    // The last connection's close folds the write-ahead log into the file.
    drop(p);
    let path = state_path(h.path());
    let len = std::fs::metadata(&path).map_err(io)?.len() as usize;
    assert!(len > 0);
    let garbage = vec![b'x'; len];
    std::fs::write(&path, &garbage).map_err(io)?;

    let q = sim(h.path());
    match q.list_page(&TagFilter::new(), None).await {
        Err(ProviderError::Internal(m)) => {
            assert!(m.contains(&path.display().to_string()), "{m}");
            assert!(m.contains("corrupt"), "{m}");
        }
        other => panic!("expected Internal, got {other:?}"),
    }
    let r = q.launch(&request(1, "b", &[])).await;
    assert!(matches!(r, Err(ProviderError::Internal(_))), "{r:?}");
    // Nothing overwrote the broken file.
    assert_eq!(std::fs::read(&path).map_err(io)?, garbage);

    std::fs::write(&path, b"not a database").map_err(io)?;
    let r = sim(h.path()).list_page(&TagFilter::new(), None).await;
    assert!(matches!(r, Err(ProviderError::Internal(_))), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_database_of_another_format_version_is_refused() -> Result<()> {
    let h = home();
    sim(h.path()).launch(&request(1, "a", &[])).await?;
    let db = rusqlite::Connection::open(state_path(h.path()))
        .map_err(|e| ProviderError::Internal(e.to_string()))?;
    db.execute("UPDATE meta SET value = 99 WHERE key = 'format'", [])
        .map_err(|e| ProviderError::Internal(e.to_string()))?;
    drop(db);
    match sim(h.path()).list_page(&TagFilter::new(), None).await {
        Err(ProviderError::Internal(m)) => assert!(m.contains("format version 99"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn filters_of_several_pairs_page_through_exactly_their_instances() -> Result<()> {
    let h = home();
    let p = sim_with(h.path(), |c| c.page_size = 7);
    // A common pair (project), a rarer one (team) and a rare one (name),
    // interleaved in id order.
    for round in 0..6 {
        for (name, count) in [("big", 20), ("small", 3)] {
            let team = if round % 2 == 0 { "data" } else { "ml" };
            p.launch(&request(
                count,
                &format!("{name}-{round}"),
                &[("motorpool-project", "p"), ("team", team), ("name", name)],
            ))
            .await?;
        }
    }
    p.launch(&request(
        5,
        "other",
        &[("motorpool-project", "q"), ("name", "small")],
    ))
    .await?;
    let cases: [(&[(&str, &str)], usize); 4] = [
        (&[("motorpool-project", "p"), ("name", "small")], 18),
        (
            &[("motorpool-project", "p"), ("team", "ml"), ("name", "big")],
            60,
        ),
        (&[("name", "small"), ("team", "data")], 9),
        (&[("motorpool-project", "q"), ("team", "data")], 0),
    ];
    for (pairs, want) in cases {
        let filter = tags(pairs);
        let (got, pages) = list_all(&p, &filter).await?;
        assert_eq!(got.len(), want, "{pairs:?}");
        assert_eq!(pages, want.div_ceil(7).max(1), "{pairs:?}");
        assert!(
            got.windows(2).all(|w| w[0].id < w[1].id),
            "sorted, no repeats"
        );
        for i in &got {
            for (k, v) in pairs {
                assert_eq!(i.tag(k), Some(*v), "{} under {pairs:?}", i.id);
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn ids_of_other_shapes_are_unknown() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let got = p.launch(&request(1, "a", &[])).await?;
    assert_eq!(got[0].id, "sim-00000001");
    for id in [
        "sim-1",
        "sim-00000001 ",
        "SIM-00000001",
        "sim-0000000g",
        "i-00000001",
    ] {
        let r = p.stop(&[id.to_string()]).await;
        assert!(matches!(r, Err(ProviderError::NotFound(_))), "{id}: {r:?}");
        p.terminate(&[id.to_string()]).await?;
    }
    assert_eq!(p.snapshot().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn vanish_and_tamper_act_behind_the_back() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let got = p
        .launch(&request(3, "a", &[("motorpool-role", "worker")]))
        .await?;
    let calls = p.api_calls();
    assert!(p.vanish(&got[0].id).await?);
    assert!(!p.vanish(&got[0].id).await?);
    assert!(
        p.tamper(&got[1].id, |i| {
            i.node_type = "large".to_string();
            i.tags.remove("motorpool-role");
            i.state = InstanceState::Stopped;
        })
        .await?
    );
    assert!(!p.tamper("sim-0000ffff", |_| {}).await?);
    assert_eq!(p.api_calls(), calls, "helpers are not API calls");
    let (all, _) = list_all(&p, &TagFilter::new()).await?;
    assert_eq!(ids(&all), ids(&got[1..]));
    assert_eq!(all[0].node_type, "large");
    assert_eq!(all[0].state, InstanceState::Stopped);
    assert!(all[0].tags.is_empty());
    assert_eq!(all[1].state, InstanceState::Running);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_instances_list_in_pages() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let started = Instant::now();
    // 10 clusters of 1000 nodes, with the tags motorpool writes.
    for c in 0..10 {
        let name = format!("cluster-{c}");
        let t = tags(&[
            ("motorpool-project", "bench"),
            ("motorpool-kind", "cluster"),
            ("motorpool-name", &name),
            ("motorpool-role", "worker"),
            ("motorpool-spec", "3f2a9c0d11e4b7a8"),
            ("motorpool-step", "ready"),
            ("motorpool-runtime", "1"),
            ("motorpool-size", "1000"),
        ]);
        let mut req = request(1000, &format!("launch-{c}"), &[]);
        req.tags = t;
        p.launch(&req).await?;
    }
    let launched = started.elapsed();
    let bytes = std::fs::metadata(state_path(h.path()))
        .map(|m| m.len())
        .unwrap_or(0);

    // A fresh provider: a cold connection.
    let fresh = sim(h.path());
    let started = Instant::now();
    let (all, pages) = list_all(&fresh, &tags(&[("motorpool-project", "bench")])).await?;
    let cold = started.elapsed();
    let started = Instant::now();
    let (again, _) = list_all(&fresh, &tags(&[("motorpool-project", "bench")])).await?;
    let warm = started.elapsed();
    println!(
        "10,000 instances: 10 launches in {launched:?}, state file {bytes} bytes, \
         listed in {pages} pages in {cold:?} (cold) / {warm:?} (warm)"
    );
    assert_eq!(pages, 10);
    assert_eq!(fresh.api_calls(), 20);
    assert_eq!(all.len(), 10_000);
    assert_eq!(all, again);
    let unique: BTreeSet<_> = ids(&all).into_iter().collect();
    assert_eq!(unique.len(), 10_000);
    assert_eq!(all[0].id, "sim-00000001");
    assert_eq!(all[9_999].id, "sim-00002710");

    let (one, pages) = list_all(&fresh, &tags(&[("motorpool-name", "cluster-7")])).await?;
    assert_eq!((one.len(), pages), (1000, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launch_is_one_write_and_concurrent_mutations_share_writes() -> Result<()> {
    let h = home();
    let p = Arc::new(sim(h.path()));
    let got = p.launch(&request(100, "big", &[])).await?;
    assert_eq!(got.len(), 100);
    assert_eq!(p.state_writes(), 1);
    // Reads and no-op mutations write nothing.
    list_all(&p, &TagFilter::new()).await?;
    p.launch(&request(100, "big", &[])).await?;
    p.terminate(&["sim-0000ffff".to_string()]).await?;
    assert_eq!(p.state_writes(), 1);

    let mut tasks = Vec::new();
    for (n, id) in ids(&got).into_iter().enumerate() {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            let change = Retag {
                set: tags(&[("n", &n.to_string())]),
                remove: vec![],
            };
            p.retag(&[id], &change).await
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| ProviderError::Internal(e.to_string()))??;
    }
    let writes = p.state_writes() - 1;
    println!("100 concurrent retags took {writes} state writes");
    assert!((1..=100).contains(&writes));
    let snap = sim(h.path()).snapshot().await?;
    for (n, i) in snap.iter().enumerate() {
        assert_eq!(i.tag("n"), Some(n.to_string().as_str()));
    }
    Ok(())
}

/// Set by the cross-process tests when they run this test binary as a child:
/// `HOME|TOKEN_PREFIX|ROUNDS|MODE`. Mode `launch`: launch one instance tagged
/// `by=PREFIX` per round. Mode `retag`: per round, set `last=PREFIX-ROUND` on
/// every instance tagged `base=yes`, in one call.
const CHILD_ENV: &str = "MOTORPOOL_SIM_TEST_CHILD";

/// Not a test of its own: the body of a child process of the tests below.
#[tokio::test]
async fn child_process_helper() -> Result<()> {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let bad = || ProviderError::Internal(format!("bad {CHILD_ENV}: {spec}"));
    let parts: Vec<&str> = spec.split('|').collect();
    let [home, prefix, rounds, mode] = parts[..] else {
        return Err(bad());
    };
    let rounds: u32 = rounds.parse().map_err(|_| bad())?;
    let p = sim(Path::new(home));
    match mode {
        "launch" => {
            for i in 0..rounds {
                p.launch(&request(1, &format!("{prefix}-{i}"), &[("by", prefix)]))
                    .await?;
            }
        }
        "retag" => {
            let (base, _) = list_all(&p, &tags(&[("base", "yes")])).await?;
            for i in 0..rounds {
                let change = Retag {
                    set: tags(&[("last", &format!("{prefix}-{i}"))]),
                    remove: vec![],
                };
                p.retag(&ids(&base), &change).await?;
            }
        }
        _ => return Err(bad()),
    }
    Ok(())
}

/// A child process of this test binary, killed if still running when dropped
/// (a failing test leaves nothing behind).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    fn wait_success(&mut self) {
        match self.0.wait() {
            Ok(status) => assert!(status.success(), "child failed: {status}"),
            Err(e) => panic!("cannot wait for a child: {e}"),
        }
    }
}

fn spawn_child(home: &Path, prefix: &str, rounds: u32, mode: &str) -> Child {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => panic!("no test binary path: {e}"),
    };
    let child = std::process::Command::new(exe)
        .args([
            "--exact",
            "tests::child_process_helper",
            "--test-threads=1",
            "-q",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{prefix}|{rounds}|{mode}", home.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn();
    match child {
        Ok(c) => Child(c),
        Err(e) => panic!("cannot start a child process: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processes_share_the_account_without_lost_updates() -> Result<()> {
    let h = home();
    let mut children = [
        spawn_child(h.path(), "child-a", 40, "launch"),
        spawn_child(h.path(), "child-b", 40, "launch"),
    ];
    let p = sim(h.path());
    for i in 0..40 {
        p.launch(&request(1, &format!("parent-{i}"), &[("by", "parent")]))
            .await?;
    }
    for child in &mut children {
        child.wait_success();
    }
    let (all, _) = list_all(&p, &TagFilter::new()).await?;
    assert_eq!(all.len(), 120);
    for by in ["parent", "child-a", "child-b"] {
        assert_eq!(all.iter().filter(|i| i.tag("by") == Some(by)).count(), 40);
        let (tagged, _) = list_all(&p, &tags(&[("by", by)])).await?;
        assert_eq!(tagged.len(), 40, "the tag index agrees");
    }
    let unique: BTreeSet<_> = ids(&all).into_iter().collect();
    assert_eq!(unique.len(), 120);
    p.store.check_consistency()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_retagging_the_same_instances_at_once_leave_each_call_whole() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    p.launch(&request(300, "base", &[("base", "yes")])).await?;
    let mut children = [
        spawn_child(h.path(), "a", 60, "retag"),
        spawn_child(h.path(), "b", 60, "retag"),
    ];
    // Meanwhile this process launches and terminates others.
    for round in 0..10 {
        let more = p
            .launch(&request(5, &format!("more-{round}"), &[("base", "no")]))
            .await?;
        p.terminate(&ids(&more[..2])).await?;
    }
    for child in &mut children {
        child.wait_success();
    }
    let (left, _) = list_all(&p, &tags(&[("base", "yes")])).await?;
    assert_eq!(left.len(), 300);
    // Every retag call set one value on all 300 at once: whichever came last
    // is on every instance, never a mix of two calls.
    let last: BTreeSet<Option<&str>> = left.iter().map(|i| i.tag("last")).collect();
    assert_eq!(last.len(), 1, "a mix of retags: {last:?}");
    let winner = last.into_iter().next().flatten().unwrap_or_default();
    assert!(winner == "a-59" || winner == "b-59", "{winner}");
    let (by_index, _) = list_all(&p, &tags(&[("last", winner), ("base", "yes")])).await?;
    assert_eq!(ids(&by_index), ids(&left));
    assert_eq!(list_all(&p, &tags(&[("base", "no")])).await?.0.len(), 30);
    p.store.check_consistency()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_write_leaves_a_consistent_account() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    p.launch(&request(5000, "base", &[("motorpool-project", "big")]))
        .await?;
    for delay_ms in [50, 120, 230] {
        let mut child = spawn_child(h.path(), &format!("k{delay_ms}"), 100_000, "launch");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        // SIGKILL, in the middle of some transaction.
        drop(child.0.kill());
        drop(child);
        let fresh = sim(h.path());
        let (all, _) = list_all(&fresh, &TagFilter::new()).await?;
        assert!(all.len() >= 5000);
        let prefix = format!("k{delay_ms}");
        let made = all.iter().filter(|i| i.tag("by") == Some(&prefix)).count();
        println!("child killed after {delay_ms} ms had launched {made}");
        fresh.store.check_consistency()?;
        let after = fresh
            .launch(&request(1, &format!("after-{delay_ms}"), &[]))
            .await?;
        assert!(ids(&all).iter().all(|id| *id < after[0].id), "no id reused");
    }
    Ok(())
}

#[tokio::test]
async fn a_cancelled_mutation_that_never_ran_does_not_run_later() -> Result<()> {
    let h = home();
    let p = sim(h.path());
    let got = p.launch(&request(2, "a", &[])).await?;
    let writer = p.store.hold_writer().await;
    let r = tokio::time::timeout(
        Duration::from_millis(20),
        p.terminate(std::slice::from_ref(&got[0].id)),
    )
    .await;
    assert!(
        r.is_err(),
        "the terminate should have been stuck behind the writer"
    );
    drop(writer);
    p.stop(std::slice::from_ref(&got[1].id)).await?;
    let snap = p.snapshot().await?;
    assert_eq!(ids(&snap), ids(&got), "the cancelled terminate did not run");
    assert_eq!(snap[1].state, InstanceState::Stopped);
    Ok(())
}
