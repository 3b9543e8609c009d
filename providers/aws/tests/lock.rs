//! The project lock held in EC2 (a security group per project) against
//! moto's server on 127.0.0.1: taken once of many at once, refused naming
//! its holder, renewed, taken over once expired (once, of many takers at
//! once), released and force-unlocked only by its id.

mod support;

use motorpool_aws::lock::lock_group_name;
use motorpool_provider::{LockAttempt, LockInfo, Provider, ProviderError};
use support::{FaultProxy, Faults, Moto, provider};

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

/// How many lock groups of `project` EC2 holds.
async fn lock_groups(moto: &Moto, project: &str) -> usize {
    let client = provider(&moto.url(), |_| {})
        .ec2_client()
        .await
        .expect("client");
    let out = client
        .describe_security_groups()
        .filters(
            motorpool_aws::aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values(lock_group_name(project))
                .build(),
        )
        .send()
        .await
        .expect("describe security groups");
    out.security_groups().len()
}

#[tokio::test]
async fn of_many_takers_at_once_exactly_one_holds_the_lock_and_the_rest_are_told_who() {
    let moto = Moto::start();
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = provider(&moto.url(), |_| {});
            let l = lock(&format!("t{i}"), now() + 600);
            tokio::spawn(async move { (l.id.clone(), p.try_lock("demo", &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut told = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        match attempt.expect("try_lock") {
            LockAttempt::Taken { taken_over } => {
                assert_eq!(taken_over, None);
                winners.push(id);
            }
            LockAttempt::Held(holder) => told.push(holder),
            LockAttempt::NoCloudLock => panic!("AWS keeps a cloud lock"),
        }
    }
    assert_eq!(winners.len(), 1, "one winner: {winners:?}");
    assert_eq!(told.len(), 5);
    for holder in &told {
        assert_eq!(holder.id, winners[0]);
        assert_eq!(holder.owner, format!("ci@runner-{}", winners[0]));
        assert_eq!(holder.pid, 4242);
        assert_eq!(holder.command, "apply");
    }
    assert_eq!(lock_groups(&moto, "demo").await, 1);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let moto = Moto::start();
    let p = provider(&moto.url(), |_| {});
    let mine = lock("mine", now() + 600);
    assert!(matches!(
        p.try_lock("demo", &mine).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    let mut renewed = mine.clone();
    renewed.expires = now() + 1200;
    p.renew_lock("demo", &renewed).await.expect("renew");
    assert_eq!(
        p.read_lock("demo").await.expect("read"),
        Some(renewed.clone())
    );
    // Another id neither renews nor unlocks it.
    let other = lock("other", now() + 600);
    assert!(matches!(
        p.renew_lock("demo", &other).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock("demo", "other").await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(p.read_lock("demo").await.expect("read").is_some());
    p.unlock("demo", "mine").await.expect("release");
    assert_eq!(p.read_lock("demo").await.expect("read"), None);
    // Released twice is fine; a renewal after it is a lost lock.
    p.unlock("demo", "mine").await.expect("release again");
    assert!(matches!(
        p.renew_lock("demo", &renewed).await,
        Err(ProviderError::NotFound(_))
    ));
    // Other projects have locks of their own.
    assert!(matches!(
        p.try_lock("demo", &other).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    assert!(matches!(
        p.try_lock("another", &mine).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
}

#[tokio::test]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let moto = Moto::start();
    let p = provider(&moto.url(), |_| {});
    let dead = lock("dead", now().saturating_sub(5));
    assert!(matches!(
        p.try_lock("demo", &dead).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = provider(&moto.url(), |_| {});
            let l = lock(&format!("t{i}"), now() + 600);
            tokio::spawn(async move { (l.id.clone(), p.try_lock("demo", &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        match attempt.expect("try_lock") {
            LockAttempt::Taken { taken_over } => {
                // The winner replaced the dead lock, or found the name free
                // in the instant between another taker's delete and create.
                let replaced = taken_over.map(|l| l.id);
                assert!(
                    replaced.is_none() || replaced.as_deref() == Some("dead"),
                    "{replaced:?}"
                );
                winners.push(id);
            }
            LockAttempt::Held(holder) => assert_ne!(holder.id, "dead"),
            LockAttempt::NoCloudLock => panic!("AWS keeps a cloud lock"),
        }
    }
    assert_eq!(winners.len(), 1, "one taker wins: {winners:?}");
    let held = p.read_lock("demo").await.expect("read").expect("held");
    assert_eq!(held.id, winners[0]);
    assert_eq!(lock_groups(&moto, "demo").await, 1);
    // The dead holder's renewal finds its lock gone.
    assert!(matches!(
        p.renew_lock("demo", &dead).await,
        Err(ProviderError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_lock_whose_create_answer_was_lost_is_still_its_takers() {
    let moto = Moto::start();
    let lossy = FaultProxy::start(
        moto.port,
        Faults {
            lost_response_rate: 1.0,
            ..Faults::default()
        },
    );
    let mine = lock("mine", now() + 600);
    // The group is made, but the answer is a 503: the engine retries.
    let first = provider(&lossy.url(), |_| {}).try_lock("demo", &mine).await;
    assert!(matches!(first, Err(ProviderError::Server(_))), "{first:?}");
    let again = provider(&moto.url(), |_| {})
        .try_lock("demo", &mine)
        .await
        .expect("retry");
    assert_eq!(again, LockAttempt::Taken { taken_over: None });
    let other = lock("other", now() + 600);
    assert!(matches!(
        provider(&moto.url(), |_| {})
            .try_lock("demo", &other)
            .await
            .expect("take"),
        LockAttempt::Held(held) if held.id == "mine"
    ));
}
