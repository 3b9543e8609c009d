//! The project lock held in Compute Engine (an item of the project's common
//! instance metadata, changed by compare-and-swap on its fingerprint)
//! against the fake Compute API on 127.0.0.1: taken once of many at once,
//! refused naming its holder, renewed, taken over once expired (once, of
//! many takers at once), released and force-unlocked only by its id (the
//! contract every cloud shares, `providers/testing/lock_contract.rs`, with
//! the metadata items checked after it), and still its taker's when the
//! answer to the write was lost.

#[path = "../../testing/lock_contract.rs"]
mod lock_contract;
mod support;

use lock_contract::{Takeover, lock, now};
use motorpool_gcp::lock::lock_item_key;
use motorpool_provider::{LockAttempt, LockInfo, Provider};
use support::{FakeGce, PROJECT};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_takers_at_once_exactly_one_holds_the_lock_and_the_rest_are_told_who() {
    let fake = FakeGce::start();
    let winner =
        lock_contract::of_many_takers_exactly_one_wins(|| fake.provider(|_| {}), "demo").await;
    // One item, holding the winner's lock as JSON; the losers' writes were
    // refused as stale (412), not applied.
    let locks: Vec<_> = items(&fake)
        .into_iter()
        .filter(|(k, _)| k.starts_with("motorpool-lock-"))
        .collect();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].0, lock_item_key("demo"));
    let held: LockInfo = serde_json::from_str(&locks[0].1).expect("the lock as JSON");
    assert_eq!(held.id, winner);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let fake = FakeGce::start();
    let p = fake.provider(|_| {});
    // A cluster's boot document beside the lock is left alone by it.
    p.put_cluster_boot("demo-etl", "{\"boot\":1}")
        .await
        .expect("boot document");
    lock_contract::the_holder_renews_and_releases_and_only_its_id_unlocks(
        &p,
        "demo",
        "another",
        || {
            let left: Vec<_> = items(&fake)
                .into_iter()
                .filter(|(k, _)| k.starts_with("motorpool-lock-"))
                .collect();
            assert!(left.is_empty(), "released, yet {left:?}");
        },
    )
    .await;
    assert_eq!(
        p.get_cluster_boot("demo-etl").await.expect("boot"),
        Some("{\"boot\":1}".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let fake = FakeGce::start();
    // Compare-and-swap on the metadata: the winner replaced exactly the dead
    // lock it read.
    lock_contract::an_expired_lock_is_taken_over_by_exactly_one(
        || fake.provider(|_| {}),
        "demo",
        Takeover::InPlace,
    )
    .await;
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
