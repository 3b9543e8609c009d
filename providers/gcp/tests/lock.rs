//! The project lock held in Compute Engine (an item of the project's common
//! instance metadata, changed by compare-and-swap on its fingerprint)
//! against the fake Compute API on 127.0.0.1: taken once of many at once,
//! refused naming its holder, renewed, taken over once expired (once, of
//! many takers at once), released and force-unlocked only by its id, and
//! still its taker's when the answer to the write was lost.

mod support;

use motorpool_gcp::lock::lock_item_key;
use motorpool_provider::{LockAttempt, LockInfo, Provider, ProviderError};
use support::{FakeGce, PROJECT};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock(id: &str, expires: u64) -> LockInfo {
    LockInfo {
        id: id.into(),
        owner: format!("ci@runner-{id}"),
        pid: 4242,
        command: "apply".into(),
        since: now(),
        expires,
    }
}

/// The project's common metadata items as the fake holds them.
fn items(fake: &FakeGce) -> Vec<(String, String)> {
    let (status, body) = fake
        .http("GET", &format!("/compute/v1/projects/{PROJECT}"), &[], "")
        .expect("read the project");
    assert_eq!(status, 200, "{body}");
    let project: serde_json::Value = serde_json::from_str(&body).expect("a project");
    project["commonInstanceMetadata"]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["key"].as_str().unwrap_or_default().to_string(),
                i["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Six takers of `project`'s lock at once, each with its own provider: the
/// ids that won, and the holders the others were told of.
async fn race(fake: &FakeGce, project: &'static str) -> (Vec<String>, Vec<LockAttempt>) {
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = fake.provider(|_| {});
            let l = lock(&format!("t{i}"), now() + 600);
            tokio::spawn(async move { (l.id.clone(), p.try_lock(project, &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut others = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        match attempt.expect("try_lock") {
            taken @ LockAttempt::Taken { .. } => {
                winners.push(id);
                others.push(taken);
            }
            held @ LockAttempt::Held(_) => others.push(held),
            LockAttempt::NoCloudLock => panic!("GCP keeps a cloud lock"),
        }
    }
    (winners, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_takers_at_once_exactly_one_holds_the_lock_and_the_rest_are_told_who() {
    let fake = FakeGce::start();
    let (winners, attempts) = race(&fake, "demo").await;
    assert_eq!(winners.len(), 1, "one winner: {winners:?}");
    for attempt in attempts {
        match attempt {
            LockAttempt::Taken { taken_over } => assert_eq!(taken_over, None),
            LockAttempt::Held(holder) => {
                assert_eq!(holder.id, winners[0]);
                assert_eq!(holder.owner, format!("ci@runner-{}", winners[0]));
                assert_eq!(holder.pid, 4242);
                assert_eq!(holder.command, "apply");
            }
            LockAttempt::NoCloudLock => unreachable!(),
        }
    }
    // One item, holding the winner's lock as JSON; the losers' writes were
    // refused as stale (412), not applied.
    let locks: Vec<_> = items(&fake)
        .into_iter()
        .filter(|(k, _)| k.starts_with("motorpool-lock-"))
        .collect();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].0, lock_item_key("demo"));
    let held: LockInfo = serde_json::from_str(&locks[0].1).expect("the lock as JSON");
    assert_eq!(held.id, winners[0]);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    // A cluster's boot document beside the lock is left alone by it.
    p.put_cluster_boot("demo-etl", "{\"boot\":1}")
        .await
        .expect("boot document");
    let mine = lock("mine", now() + 600);
    assert_eq!(
        p.try_lock("demo", &mine).await.expect("take"),
        LockAttempt::Taken { taken_over: None }
    );
    // Someone else is refused, and told who holds it.
    let other = lock("other", now() + 600);
    assert_eq!(
        p.try_lock("demo", &other).await.expect("take"),
        LockAttempt::Held(mine.clone())
    );
    let mut renewed = mine.clone();
    renewed.expires = now() + 1200;
    p.renew_lock("demo", &renewed).await.expect("renew");
    assert_eq!(
        p.read_lock("demo").await.expect("read"),
        Some(renewed.clone())
    );
    // Another id neither renews nor unlocks it.
    assert!(matches!(
        p.renew_lock("demo", &other).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock("demo", "other").await,
        Err(ProviderError::NotFound(m)) if m.contains("mine")
    ));
    assert_eq!(
        p.read_lock("demo").await.expect("read").map(|l| l.id),
        Some("mine".to_string())
    );
    p.unlock("demo", "mine").await.expect("release");
    assert_eq!(p.read_lock("demo").await.expect("read"), None);
    // Released twice is fine; a renewal after it is a lost lock.
    p.unlock("demo", "mine").await.expect("release again");
    assert!(matches!(
        p.renew_lock("demo", &renewed).await,
        Err(ProviderError::NotFound(_))
    ));
    // Free again; and other projects have locks of their own.
    assert!(matches!(
        p.try_lock("demo", &other).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    assert!(matches!(
        p.try_lock("another", &mine).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    assert_eq!(
        p.get_cluster_boot("demo-etl").await.expect("boot"),
        Some("{\"boot\":1}".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    let dead = lock("dead", now().saturating_sub(5));
    assert!(matches!(
        p.try_lock("demo", &dead).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    let (winners, attempts) = race(&fake, "demo").await;
    assert_eq!(winners.len(), 1, "one taker wins: {winners:?}");
    for attempt in attempts {
        match attempt {
            // The winner replaced exactly the dead lock it read.
            LockAttempt::Taken { taken_over } => {
                assert_eq!(taken_over.map(|l| l.id).as_deref(), Some("dead"))
            }
            LockAttempt::Held(holder) => assert_eq!(holder.id, winners[0]),
            LockAttempt::NoCloudLock => unreachable!(),
        }
    }
    let held = p.read_lock("demo").await.expect("read").expect("held");
    assert_eq!(held.id, winners[0]);
    // The dead holder's renewal and release find its lock gone.
    assert!(matches!(
        p.renew_lock("demo", &dead).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock("demo", "dead").await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(
        p.read_lock("demo").await.expect("read").map(|l| l.id),
        Some(winners[0].clone())
    );
}

#[tokio::test]
async fn a_lock_whose_write_answer_was_lost_is_still_its_takers() {
    let fake = FakeGce::start();
    // The write is made, but its answer never comes: the engine retries.
    fake.configure(
        r#"{"faults": {"rate": 1.0, "kinds": ["lost"], "seed": 1, "methods": ["POST"]}}"#,
    );
    let mine = lock("mine", now() + 600);
    let p = fake.provider(|_| {});
    let first = p.try_lock("demo", &mine).await;
    assert!(
        matches!(&first, Err(e) if e.is_retryable()),
        "a lost answer is worth a retry: {first:?}"
    );
    fake.configure(r#"{"faults": {"rate": 0.0}}"#);
    let again = p.try_lock("demo", &mine).await.expect("retry");
    assert_eq!(again, LockAttempt::Taken { taken_over: None });
    let other = lock("other", now() + 600);
    assert!(matches!(
        p.try_lock("demo", &other).await.expect("take"),
        LockAttempt::Held(held) if held.id == "mine"
    ));
}
