//! The project lock held in EC2 (a security group per project) against
//! moto's server on 127.0.0.1: taken once of many at once, refused naming
//! its holder, renewed, taken over once expired (once, of many takers at
//! once), released and force-unlocked only by its id: the contract every
//! cloud shares (`providers/testing/lock_contract.rs`), with EC2's own
//! checks (one lock group) after it, and a create whose answer was lost.

#[path = "../../testing/lock_contract.rs"]
mod lock_contract;
mod support;

use lock_contract::{Takeover, lock, now};
use motorpool_aws::lock::lock_group_name;
use motorpool_provider::{LockAttempt, Provider, ProviderError};
use support::{FaultProxy, Faults, Moto, provider};

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
    lock_contract::of_many_takers_exactly_one_wins(|| provider(&moto.url(), |_| {}), "demo").await;
    // One lock group in EC2, the winner's.
    assert_eq!(lock_groups(&moto, "demo").await, 1);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let moto = Moto::start();
    let p = provider(&moto.url(), |_| {});
    lock_contract::the_holder_renews_and_releases_and_only_its_id_unlocks(
        &p,
        "demo",
        "another",
        || {},
    )
    .await;
    assert_eq!(lock_groups(&moto, "demo").await, 1);
    assert_eq!(lock_groups(&moto, "another").await, 1);
}

#[tokio::test]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let moto = Moto::start();
    // The dead lock's group is deleted, then a new one made.
    lock_contract::an_expired_lock_is_taken_over_by_exactly_one(
        || provider(&moto.url(), |_| {}),
        "demo",
        Takeover::DeleteThenCreate,
    )
    .await;
    assert_eq!(lock_groups(&moto, "demo").await, 1);
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
