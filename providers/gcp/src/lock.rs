//! The project lock held in Compute Engine: one item `motorpool-lock-<project>`
//! ([`lock_item_key`]) of the GCP project's common instance metadata, whose
//! value is the [`LockInfo`] as JSON.
//!
//! Every change goes through `projects.setCommonInstanceMetadata` with the
//! metadata fingerprint read just before it (the provider's
//! `edit_project_item`), and the API refuses a stale fingerprint (412
//! `conditionNotMet`). So a take, a takeover, a renewal and a release are
//! each a compare-and-swap on the whole metadata: of two takers that read
//! the same state, only the first write is accepted; the other reads again
//! and decides again on what it finds then (the winner's unexpired lock:
//! held). Taking over an expired lock replaces exactly the lock that was
//! read, because the write carries the fingerprint of that read.
//!
//! This file decides what each lock call does with the item it finds; it
//! must not touch instances or other metadata items.

use motorpool_provider::{LockAttempt, LockInfo, ProviderError, Result};

/// The project metadata item prefix of project locks.
pub const LOCK_ITEM_PREFIX: &str = "motorpool-lock-";

/// The project metadata key holding the lock of motorpool project `project`.
pub fn lock_item_key(project: &str) -> String {
    crate::item_key(LOCK_ITEM_PREFIX, project)
}

/// What a lock call does with the item it read.
#[derive(Debug)]
pub(crate) enum Edit<T> {
    /// Write nothing, answer `T`.
    Keep(T),
    /// Set the item (`None`: remove it), then answer `T`.
    Write(Option<String>, T),
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a lock item says. A value that is no lock (written by hand) holds
/// nothing: it reads as run out, by an unknown holder.
pub(crate) fn parse(value: &str) -> LockInfo {
    serde_json::from_str(value).unwrap_or_else(|_| LockInfo {
        id: String::new(),
        owner: "an unknown holder".to_string(),
        pid: 0,
        command: String::new(),
        since: 0,
        expires: 0,
    })
}

fn encode(lock: &LockInfo) -> Result<String> {
    serde_json::to_string(lock)
        .map_err(|e| ProviderError::Internal(format!("the lock as JSON: {e}")))
}

/// `try_lock`: take a free lock, take over one that ran out, find our own
/// (an earlier write whose answer was lost), or report the holder.
pub(crate) fn take(current: Option<&str>, lock: &LockInfo, now: u64) -> Result<Edit<LockAttempt>> {
    let Some(current) = current else {
        return Ok(Edit::Write(
            Some(encode(lock)?),
            LockAttempt::Taken { taken_over: None },
        ));
    };
    let held = parse(current);
    if held.id == lock.id {
        return Ok(Edit::Keep(LockAttempt::Taken { taken_over: None }));
    }
    if !held.expired(now) {
        return Ok(Edit::Keep(LockAttempt::Held(held)));
    }
    Ok(Edit::Write(
        Some(encode(lock)?),
        LockAttempt::Taken {
            taken_over: Some(held),
        },
    ))
}

/// `renew_lock`: a new expiry on our own lock; anyone else's is lost to us.
pub(crate) fn renew(current: Option<&str>, project: &str, lock: &LockInfo) -> Result<Edit<()>> {
    let key = lock_item_key(project);
    let Some(current) = current else {
        return Err(ProviderError::NotFound(format!(
            "the project lock {key} is gone"
        )));
    };
    let held = parse(current);
    if held.id != lock.id {
        return Err(ProviderError::NotFound(format!(
            "the project lock {key} is now lock {} of {}",
            held.id, held.owner
        )));
    }
    Ok(Edit::Write(Some(encode(lock)?), ()))
}

/// `unlock`: remove the lock when its id is `id`; gone already is fine.
pub(crate) fn remove(current: Option<&str>, project: &str, id: &str) -> Result<Edit<()>> {
    let Some(current) = current else {
        return Ok(Edit::Keep(()));
    };
    let held = parse(current);
    if held.id != id {
        return Err(ProviderError::NotFound(format!(
            "the lock of project `{project}` is {} (held by {}), not {id}",
            held.id, held.owner
        )));
    }
    Ok(Edit::Write(None, ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(id: &str, expires: u64) -> LockInfo {
        LockInfo {
            id: id.into(),
            owner: "ci@runner".into(),
            pid: 7,
            command: "apply".into(),
            since: 1,
            expires,
        }
    }

    #[test]
    fn a_take_writes_a_free_or_expired_lock_and_keeps_a_live_one() {
        let mine = lock("mine", 200);
        assert!(matches!(
            take(None, &mine, 100),
            Ok(Edit::Write(
                Some(_),
                LockAttempt::Taken { taken_over: None }
            ))
        ));
        let theirs = encode(&lock("theirs", 150)).expect("json");
        assert!(matches!(
            take(Some(&theirs), &mine, 100),
            Ok(Edit::Keep(LockAttempt::Held(h))) if h.id == "theirs"
        ));
        assert!(matches!(
            take(Some(&theirs), &mine, 150),
            Ok(Edit::Write(Some(_), LockAttempt::Taken { taken_over: Some(h) })) if h.id == "theirs"
        ));
        let own = encode(&mine).expect("json");
        assert!(matches!(
            take(Some(&own), &mine, 100),
            Ok(Edit::Keep(LockAttempt::Taken { .. }))
        ));
        // Not a lock at all: nobody's, taken over.
        assert!(matches!(
            take(Some("hand-written"), &mine, 100),
            Ok(Edit::Write(
                Some(_),
                LockAttempt::Taken {
                    taken_over: Some(_)
                }
            ))
        ));
    }

    #[test]
    fn renew_and_remove_touch_only_their_own_id() {
        let mine = lock("mine", 200);
        let own = encode(&mine).expect("json");
        assert!(matches!(
            renew(Some(&own), "p", &mine),
            Ok(Edit::Write(Some(_), ()))
        ));
        assert!(matches!(
            renew(None, "p", &mine),
            Err(ProviderError::NotFound(_))
        ));
        assert!(matches!(
            renew(Some(&own), "p", &lock("other", 300)),
            Err(ProviderError::NotFound(_))
        ));
        assert!(matches!(
            remove(Some(&own), "p", "mine"),
            Ok(Edit::Write(None, ()))
        ));
        assert!(matches!(remove(None, "p", "mine"), Ok(Edit::Keep(()))));
        assert!(matches!(
            remove(Some(&own), "p", "other"),
            Err(ProviderError::NotFound(m)) if m.contains("mine")
        ));
    }
}
