//! The project lock's contract, as every cloud provider must keep it: the
//! scenarios written once, generic over [`Provider`], and called from each
//! cloud's lock tests against its own stand-in (moto, the fake Compute API,
//! Azurite). It owns the scenarios and the sample `LockInfo`s they use; what
//! a cloud keeps beside the contract (how the lock is stored, lost answers,
//! keys) is checked by that cloud's own tests, before or after these.
//!
//! Test support only: included by path (`#[path]`) from each cloud's lock
//! tests, like `fake_process.rs`. It starts nothing and talks only to the
//! providers it is given.

use motorpool_provider::{LockAttempt, LockInfo, Provider, ProviderError};

/// Seconds since the epoch, as locks count them.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A lock of `id`, held by `ci@runner-ID`'s `apply` (pid 4242) until `expires`.
pub fn lock(id: &str, expires: u64) -> LockInfo {
    LockInfo {
        id: id.into(),
        owner: format!("ci@runner-{id}"),
        pid: 4242,
        command: "apply".into(),
        since: now(),
        expires,
    }
}

/// How a cloud takes over an expired lock, which decides what a winning
/// taker is told it replaced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(dead_code)] // each cloud's tests name the one way it takes over
pub enum Takeover {
    /// Replaced in place (a conditional write): the winner always replaced
    /// the dead lock.
    InPlace,
    /// Deleted, then made anew: the winner replaced the dead lock, or found
    /// the name free in the instant between another taker's delete and create.
    DeleteThenCreate,
}

/// Six takers of `project`'s lock at once (ids `t0`..`t5`), each with a
/// provider of its own from `make`: the ids that won, and every attempt.
async fn race<P, F>(make: &F, project: &str) -> (Vec<String>, Vec<LockAttempt>)
where
    P: Provider + 'static,
    F: Fn() -> P,
{
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = make();
            let l = lock(&format!("t{i}"), now() + 600);
            let project = project.to_string();
            tokio::spawn(async move { (l.id.clone(), p.try_lock(&project, &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut attempts = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        let attempt = attempt.expect("try_lock");
        match &attempt {
            LockAttempt::Taken { .. } => winners.push(id),
            LockAttempt::Held(_) => {}
            LockAttempt::NoCloudLock => panic!("this provider keeps a cloud lock"),
        }
        attempts.push(attempt);
    }
    (winners, attempts)
}

/// Of six takers of a free lock at once, exactly one holds it, and the five
/// others are told who (id, owner, pid, command). The winner's id.
pub async fn of_many_takers_exactly_one_wins<P, F>(make: F, project: &str) -> String
where
    P: Provider + 'static,
    F: Fn() -> P,
{
    let (winners, attempts) = race(&make, project).await;
    assert_eq!(winners.len(), 1, "one winner: {winners:?}");
    let winner = winners[0].clone();
    let mut told = 0;
    for attempt in attempts {
        match attempt {
            LockAttempt::Taken { taken_over } => assert_eq!(taken_over, None),
            LockAttempt::Held(holder) => {
                assert_eq!(holder.id, winner);
                assert_eq!(holder.owner, format!("ci@runner-{winner}"));
                assert_eq!(holder.pid, 4242);
                assert_eq!(holder.command, "apply");
                told += 1;
            }
            LockAttempt::NoCloudLock => unreachable!("refused in race"),
        }
    }
    assert_eq!(told, 5);
    assert_eq!(
        make().read_lock(project).await.expect("read").map(|l| l.id),
        Some(winner.clone())
    );
    winner
}

/// The holder of `project`'s lock takes it, is the one others are told of,
/// renews it, and releases it; another id neither renews nor unlocks it; a
/// released lock is free again, a renewal after release is a lost lock, and
/// `other_project` has a lock of its own. `after_release` runs once the lock
/// is released (the cloud's own check that nothing of it is left).
pub async fn the_holder_renews_and_releases_and_only_its_id_unlocks(
    p: &impl Provider,
    project: &str,
    other_project: &str,
    after_release: impl FnOnce(),
) {
    let mine = lock("mine", now() + 600);
    assert_eq!(
        p.try_lock(project, &mine).await.expect("take"),
        LockAttempt::Taken { taken_over: None }
    );
    // Someone else is refused, and told who holds it.
    let other = lock("other", now() + 600);
    assert_eq!(
        p.try_lock(project, &other).await.expect("try"),
        LockAttempt::Held(mine.clone())
    );
    let mut renewed = mine.clone();
    renewed.expires = now() + 1200;
    p.renew_lock(project, &renewed).await.expect("renew");
    assert_eq!(
        p.read_lock(project).await.expect("read"),
        Some(renewed.clone())
    );
    // Another id neither renews nor unlocks it; the refusal names the holder.
    assert!(matches!(
        p.renew_lock(project, &other).await,
        Err(ProviderError::NotFound(_))
    ));
    let refused = p.unlock(project, "other").await;
    assert!(
        matches!(&refused, Err(ProviderError::NotFound(m)) if m.contains("mine")),
        "{refused:?}"
    );
    assert_eq!(
        p.read_lock(project).await.expect("read"),
        Some(renewed.clone())
    );
    assert_eq!(
        p.try_lock(project, &other).await.expect("try"),
        LockAttempt::Held(renewed.clone())
    );
    p.unlock(project, "mine").await.expect("release");
    assert_eq!(p.read_lock(project).await.expect("read"), None);
    after_release();
    // Released twice is fine; a renewal after it is a lost lock.
    p.unlock(project, "mine").await.expect("release again");
    assert!(matches!(
        p.renew_lock(project, &renewed).await,
        Err(ProviderError::NotFound(_))
    ));
    // Free again; and other projects have locks of their own.
    assert_eq!(
        p.try_lock(project, &other).await.expect("take"),
        LockAttempt::Taken { taken_over: None }
    );
    assert_eq!(
        p.try_lock(other_project, &mine).await.expect("take"),
        LockAttempt::Taken { taken_over: None }
    );
    // Taking a lock one holds already (its answer lost) is taking it.
    assert_eq!(
        p.try_lock(other_project, &mine).await.expect("again"),
        LockAttempt::Taken { taken_over: None }
    );
    assert_eq!(
        p.read_lock(project).await.expect("read").map(|l| l.id),
        Some("other".to_string())
    );
}

/// A lock whose lease ran out (held by `dead`) is taken over by exactly one
/// of six takers at once; the others are told of the winner, not the dead
/// holder, whose renewal and release then find its lock gone. The winner's id.
pub async fn an_expired_lock_is_taken_over_by_exactly_one<P, F>(
    make: F,
    project: &str,
    takeover: Takeover,
) -> String
where
    P: Provider + 'static,
    F: Fn() -> P,
{
    let p = make();
    let dead = lock("dead", now().saturating_sub(5));
    assert_eq!(
        p.try_lock(project, &dead).await.expect("take"),
        LockAttempt::Taken { taken_over: None }
    );
    let (winners, attempts) = race(&make, project).await;
    assert_eq!(winners.len(), 1, "one taker wins: {winners:?}");
    let winner = winners[0].clone();
    for attempt in attempts {
        match attempt {
            LockAttempt::Taken { taken_over } => {
                let replaced = taken_over.map(|l| l.id);
                match takeover {
                    Takeover::InPlace => assert_eq!(replaced.as_deref(), Some("dead")),
                    Takeover::DeleteThenCreate => assert!(
                        replaced.is_none() || replaced.as_deref() == Some("dead"),
                        "{replaced:?}"
                    ),
                }
            }
            LockAttempt::Held(holder) => assert_eq!(holder.id, winner),
            LockAttempt::NoCloudLock => unreachable!("refused in race"),
        }
    }
    let held = p.read_lock(project).await.expect("read").expect("held");
    assert_eq!(held.id, winner);
    // The dead holder's renewal and release find its lock gone.
    assert!(matches!(
        p.renew_lock(project, &dead).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock(project, "dead").await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(p.read_lock(project).await.expect("read"), Some(held));
    winner
}
