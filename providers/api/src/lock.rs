//! The project lock as a provider holds it: the types of the cloud-side lock
//! ([`crate::Provider::try_lock`] and its siblings).
//!
//! A cloud lock is a lease: one uniquely named resource per project, created
//! atomically (a second create of the same name fails in the cloud), that
//! says who holds it ([`LockInfo`]) and until when. Its holder renews the
//! expiry while it works; a lock whose expiry passed may be taken over, and
//! `motorpool force-unlock ID` removes one whose holder died. This module
//! owns the data only: how a cloud stores it is each provider's business,
//! and when to take, renew and release it is the engine's.

use serde::{Deserialize, Serialize};

/// Who holds a project lock, since when and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Unique per taking of the lock: what `motorpool force-unlock` names.
    pub id: String,
    /// `user@host` of the holder.
    pub owner: String,
    /// The holder's process id on its host.
    pub pid: u32,
    /// The command that holds it (`apply`, `destroy`, `run`).
    pub command: String,
    /// Unix seconds when it was taken.
    pub since: u64,
    /// Unix seconds after which it may be taken over (the holder renews it).
    pub expires: u64,
}

impl LockInfo {
    /// The host part of [`LockInfo::owner`].
    pub fn host(&self) -> &str {
        self.owner
            .rsplit_once('@')
            .map(|(_, host)| host)
            .unwrap_or("")
    }

    /// Whether its lease ran out at unix time `now`.
    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires
    }
}

/// What [`crate::Provider::try_lock`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// This caller holds the lock now (`taken_over`: it replaced one whose
    /// lease had run out).
    Taken { taken_over: Option<LockInfo> },
    /// Someone else holds it, and its lease has not run out.
    Held(LockInfo),
    /// The provider keeps no lock of its own: the local file lock is all there is.
    NoCloudLock,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_after_the_last_at_and_expiry_is_inclusive() {
        let info = LockInfo {
            id: "abc".into(),
            owner: "ci@runner@7".into(),
            pid: 1,
            command: "apply".into(),
            since: 10,
            expires: 20,
        };
        assert_eq!(info.host(), "7");
        assert!(!info.expired(19));
        assert!(info.expired(20));
    }
}
