//! The project lock: one apply, destroy or run per project at a time.
//!
//! Two layers. On this machine, an advisory `flock` on
//! `projects/<project>/apply.lock`, released by the kernel when the holder
//! exits, even by SIGKILL, so it never goes stale. Where the project lives in
//! a cloud, also a lock held in that cloud ([`CloudLease`], through the
//! provider's `try_lock`/`renew_lock`/`unlock`), so two machines (CI runners)
//! are kept apart too. The cloud lock is a lease: taken with an expiry, renewed
//! while the holder works, released at the end; one whose holder died is taken
//! over once its lease ran out, or removed sooner by `motorpool force-unlock
//! ID` ([`force_unlock`]). Providers without a cloud lock (local, sim) answer
//! `NoCloudLock` and the file lock is all there is.
//!
//! This module decides when the lease is renewed and what the refusals say;
//! it must not know how a cloud stores the lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use motorpool_provider::{LockAttempt, LockInfo, ProviderError};
use thiserror::Error;

use crate::providers::ProviderClient;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "another motorpool is changing project `{project}` ({holder}); wait for it to finish, or stop it, then try again"
    )]
    Held { project: String, holder: String },
    #[error("cannot open the project lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The lock in the cloud is someone else's, and its lease runs.
    #[error(
        "project `{project}` is locked in the {provider} cloud by {holder}; wait for it to finish, \
         or, if that process is gone, run `motorpool force-unlock {id}` (a lock whose holder died \
         is also taken over by itself when its lease runs out, at {expires})"
    )]
    CloudHeld {
        project: String,
        provider: String,
        holder: String,
        id: String,
        expires: String,
    },
    #[error("cannot take the project lock in the {provider} cloud: {source}")]
    Cloud {
        provider: String,
        #[source]
        source: ProviderError,
    },
    /// A bad `MOTORPOOL_LOCK_LEASE_SECONDS`.
    #[error("{0}")]
    Setting(String),
    /// The lock was lost while held (its lease ran out and it was taken over).
    #[error("{0}")]
    Lost(String),
    /// `force-unlock` would not remove it (none held, another id, holder alive).
    #[error("{0}")]
    Refused(String),
}

/// Held while it lives.
pub struct ProjectLock {
    _file: File,
}

impl ProjectLock {
    /// Take the lock for `command` or fail at once, naming who holds it.
    pub fn acquire(
        project_dir: &Path,
        project: &str,
        command: &str,
    ) -> Result<ProjectLock, LockError> {
        match flock_file(&project_dir.join("apply.lock"), command)? {
            Ok(file) => Ok(ProjectLock { _file: file }),
            Err(holder) => Err(LockError::Held {
                project: project.to_string(),
                holder,
            }),
        }
    }
}

/// Whether a refusal to lock names a holder that is `motorpool controller`:
/// its passes are short, so commands wait for it rather than fail.
pub fn held_by_controller(error: &LockError) -> bool {
    let holder = match error {
        LockError::Held { holder, .. } | LockError::CloudHeld { holder, .. } => holder,
        _ => return false,
    };
    holder.contains(&format!("motorpool {CONTROLLER_COMMAND}`"))
}

/// The name of the cloud lock a project's controller holds while it runs (so
/// one controller per project acts): beside the project's own lock, and no
/// project's name (those have no `_`).
pub fn controller_lock_name(project: &str) -> String {
    format!("{project}_controller")
}

/// The command name the controller's locks carry.
pub const CONTROLLER_COMMAND: &str = "controller";

/// An exclusive, non-blocking `flock` on `path` (made private when
/// missing), whose content then says who holds it: `Ok(Ok(file))` while
/// held (released when the file is dropped or the process exits), or
/// `Ok(Err(holder))` with what the holder wrote.
pub fn flock_file(path: &Path, command: &str) -> Result<Result<File, String>, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = motorpool_provider::private_files::open(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
    .map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        return Ok(Err(if holder.is_empty() {
            "holder unknown".to_string()
        } else {
            holder.to_string()
        }));
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    write!(
        file,
        "pid {}, `motorpool {command}`, since {}",
        std::process::id(),
        utc_text(unix_now())
    )
    .map_err(io)?;
    Ok(Ok(file))
}

/// How long a cloud lock's lease lasts unless `MOTORPOOL_LOCK_LEASE_SECONDS`
/// says otherwise; the holder renews it every third of that.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

/// In this home's project directory: the id of the cloud lock taken from it.
const HELD_FILE: &str = "cloud-lock.id";

/// The lease length in force (`MOTORPOOL_LOCK_LEASE_SECONDS`, 2 to 86400).
pub fn lease() -> Result<Duration, LockError> {
    match std::env::var("MOTORPOOL_LOCK_LEASE_SECONDS") {
        Err(_) => Ok(DEFAULT_LEASE),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(s) if (2..=86_400).contains(&s) => Ok(Duration::from_secs(s)),
            _ => Err(LockError::Setting(format!(
                "MOTORPOOL_LOCK_LEASE_SECONDS must be a whole number of seconds from 2 to 86400, not {text:?}"
            ))),
        },
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` of unix seconds (days to civil date: Hinnant's algorithm).
pub fn utc_text(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `user@host` of this process, for the lock's owner.
pub fn this_owner() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        // SAFETY: getuid has no preconditions.
        .unwrap_or_else(|| format!("uid{}", unsafe { libc::getuid() }));
    format!("{user}@{}", this_host())
}

/// This machine's host name (`unknown-host` when it cannot be read).
pub fn this_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let host = String::from_utf8_lossy(&buf[..end]).into_owned();
    if host.is_empty() {
        "unknown-host".to_string()
    } else {
        host
    }
}

/// A lock as a person reads it: who, which process, what, since when.
pub fn describe_holder(info: &LockInfo) -> String {
    format!(
        "{} (pid {}, `motorpool {}`, since {}; lock id {})",
        info.owner,
        info.pid,
        info.command,
        utc_text(info.since),
        info.id
    )
}

/// The project lock held in the cloud, renewed while it lives. Release it
/// with [`CloudLease::release`]; dropped unreleased, it stops renewing and
/// runs out after its lease.
pub struct CloudLease {
    project: String,
    /// `cloud-lock.id` in this home's project directory, removed on release.
    record: PathBuf,
    client: Arc<ProviderClient>,
    info: Arc<Mutex<LockInfo>>,
    renewer: tokio::task::JoinHandle<()>,
    /// Set when a renewal found the lock gone (taken over or force-unlocked).
    lost: Arc<Mutex<Option<String>>>,
    released: bool,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CloudLease {
    /// Take the project's cloud lock for `command`. `Ok(None)`: the provider
    /// keeps no cloud lock. A lock held by someone else is
    /// [`LockError::CloudHeld`], naming the holder; one whose lease ran out
    /// is taken over (and `on_note` told so).
    ///
    /// `project_dir` is this home's project directory, whose local lock the
    /// caller holds. The id of the cloud lock taken from this home is kept
    /// there (`cloud-lock.id`) while held; a holder killed before it could
    /// release leaves it behind. As nobody else of this home can hold the
    /// local lock now, a cloud lock with that id is a dead predecessor's, and
    /// is taken over at once: a killed apply's re-run on the same machine is
    /// never refused by its own lock.
    pub async fn take(
        client: Arc<ProviderClient>,
        project: &str,
        project_dir: &Path,
        command: &str,
        on_note: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<CloudLease>, LockError> {
        let record = project_dir.join(HELD_FILE);
        CloudLease::take_as(client, project, &record, command, on_note).await
    }

    /// [`CloudLease::take`] of the lock named `project` in the cloud, whose
    /// id this home keeps in `record` while held (the controller's own
    /// lock, [`controller_lock_name`], is one besides the project's).
    pub async fn take_as(
        client: Arc<ProviderClient>,
        project: &str,
        record: &Path,
        command: &str,
        on_note: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<CloudLease>, LockError> {
        let record = record.to_path_buf();
        let lease = lease()?;
        let now = unix_now();
        let info = LockInfo {
            id: format!("{:016x}", fastrand::u64(..)),
            owner: this_owner(),
            pid: std::process::id(),
            command: command.to_string(),
            since: now,
            expires: now + lease.as_secs(),
        };
        let provider = client.kind().to_string();
        let cloud = |source| LockError::Cloud {
            provider: provider.clone(),
            source,
        };
        let left_here = std::fs::read_to_string(&record)
            .ok()
            .map(|id| id.trim().to_string())
            .filter(|id| !id.is_empty());
        let mut attempt = client.try_lock(project, &info).await.map_err(cloud)?;
        if let LockAttempt::Held(holder) = &attempt
            && left_here.as_deref() == Some(holder.id.as_str())
        {
            on_note(&format!(
                "Took over the project lock left by a killed motorpool of this machine: {}.",
                describe_holder(holder)
            ));
            match client.unlock(project, &holder.id).await {
                // Changed hands meanwhile: the next try says to whom.
                Ok(()) | Err(ProviderError::NotFound(_)) => {}
                Err(e) => return Err(cloud(e)),
            }
            attempt = client.try_lock(project, &info).await.map_err(cloud)?;
        }
        if !matches!(attempt, LockAttempt::Held(_)) {
            let _ = std::fs::remove_file(&record);
        }
        match attempt {
            LockAttempt::NoCloudLock => Ok(None),
            LockAttempt::Held(holder) => Err(LockError::CloudHeld {
                project: project.to_string(),
                provider,
                holder: describe_holder(&holder),
                id: holder.id.clone(),
                expires: utc_text(holder.expires),
            }),
            LockAttempt::Taken { taken_over } => {
                if let Some(old) = taken_over {
                    on_note(&format!(
                        "Took over the project lock of {}: its lease ran out at {}.",
                        describe_holder(&old),
                        utc_text(old.expires)
                    ));
                }
                let remember =
                    motorpool_provider::private_files::write(&record, info.id.as_bytes());
                if let Err(e) = remember {
                    let _ = client.unlock(project, &info.id).await;
                    return Err(LockError::Io {
                        path: record,
                        source: e,
                    });
                }
                let info = Arc::new(Mutex::new(info));
                let lost = Arc::new(Mutex::new(None));
                let renewer = tokio::spawn(renew(
                    client.clone(),
                    project.to_string(),
                    info.clone(),
                    lost.clone(),
                    lease,
                ));
                Ok(Some(CloudLease {
                    project: project.to_string(),
                    record,
                    client,
                    info,
                    renewer,
                    lost,
                    released: false,
                }))
            }
        }
    }

    /// The lock's id (what `force-unlock` would take).
    pub fn id(&self) -> String {
        locked(&self.info).id.clone()
    }

    /// Why the lock is no longer held, when a renewal found it gone (its
    /// lease ran out and someone took it over, or it was force-unlocked).
    pub fn lost(&self) -> Option<String> {
        locked(&self.lost).clone()
    }

    /// Stop renewing and remove the lock. An error when the lock was lost
    /// while held (its lease ran out and someone took it over, or it was
    /// force-unlocked): the work done under it may have raced another.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.renewer.abort();
        self.released = true;
        let id = self.id();
        let provider = self.client.kind().to_string();
        if let Some(why) = locked(&self.lost).take() {
            return Err(LockError::Lost(format!(
                "the project lock {id} was lost while held ({why}): another motorpool may have changed project `{}` at the same time; run `motorpool plan` to see where it stands",
                self.project
            )));
        }
        self.client
            .unlock(&self.project, &id)
            .await
            .map_err(|source| LockError::Cloud { provider, source })?;
        let _ = std::fs::remove_file(&self.record);
        Ok(())
    }
}

impl Drop for CloudLease {
    /// Released on every way out of a command (an error, `?`): blocking
    /// here is fine on the CLI's multi-threaded runtime. Elsewhere, or when
    /// the cloud does not answer, the lease runs out by itself.
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released {
            return;
        }
        let id = self.id();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return;
        }
        let (client, project) = (self.client.clone(), self.project.clone());
        let released = tokio::task::block_in_place(|| {
            handle.block_on(tokio::time::timeout(
                Duration::from_secs(20),
                client.unlock(&project, &id),
            ))
        });
        let why = match released {
            Ok(Ok(())) => {
                let _ = std::fs::remove_file(&self.record);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the cloud did not answer".to_string(),
        };
        eprintln!(
            "warning: cannot release the project lock {id} of `{project}` ({why}); it runs out \
             at {}, or run `motorpool force-unlock {id}`",
            utc_text(locked(&self.info).expires)
        );
    }
}

/// Renew every third of the lease until aborted; a lock found gone is lost.
async fn renew(
    client: Arc<ProviderClient>,
    project: String,
    info: Arc<Mutex<LockInfo>>,
    lost: Arc<Mutex<Option<String>>>,
    lease: Duration,
) {
    let every = (lease / 3).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(every).await;
        let mut next = locked(&info).clone();
        next.expires = unix_now() + lease.as_secs();
        match client.renew_lock(&project, &next).await {
            Ok(()) => *locked(&info) = next,
            Err(ProviderError::NotFound(why)) => {
                eprintln!(
                    "warning: the project lock {} of `{project}` is no longer held ({why}); \
                     another motorpool may take it",
                    next.id
                );
                *locked(&lost) = Some(why);
                return;
            }
            // Transient: the next round tries again, well before the lease runs out.
            Err(e) => eprintln!("warning: cannot renew the project lock {}: {e}", next.id),
        }
    }
}

/// Whether `pid` runs here as a motorpool process (what force-unlock can tell
/// about a holder on this machine).
fn motorpool_runs_as(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'));
    !zombie
        && cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|prog| String::from_utf8_lossy(prog).contains("motorpool"))
}

/// Remove the project's cloud lock `id` whose holder died; returns what it said. Refused when the
/// provider keeps no cloud lock, when no lock or another one is held, and
/// while the holder still runs where that can be told (on this machine).
pub async fn force_unlock(
    client: &ProviderClient,
    project: &str,
    id: &str,
) -> Result<LockInfo, LockError> {
    let provider = client.kind().to_string();
    let cloud = |source| LockError::Cloud {
        provider: provider.clone(),
        source,
    };
    let refuse = |text: String| Err(LockError::Refused(text));
    let Some(held) = client.read_lock(project).await.map_err(cloud)? else {
        return refuse(format!(
            "project `{project}` holds no lock in the {provider} cloud: nothing to unlock (where a \
             provider keeps no cloud lock, only the local file lock exists, and the kernel \
             releases it when its holder exits)"
        ));
    };
    if held.id != id {
        return refuse(format!(
            "the lock of project `{project}` is {}, not {id:?}: nothing was unlocked (held by {})",
            held.id,
            describe_holder(&held)
        ));
    }
    if held.host() == this_host() && motorpool_runs_as(held.pid) {
        return refuse(format!(
            "the holder of lock {id} still runs on this machine ({}): stop it first (it releases the lock as it ends); nothing was unlocked",
            describe_holder(&held)
        ));
    }
    client.unlock(project, id).await.map_err(cloud)?;
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_is_the_civil_date() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_text(1_796_179_845), "2026-12-02 02:50:45 UTC");
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_holders_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ProjectLock::acquire(dir.path(), "demo", "apply").expect("first lock");
        let err = match ProjectLock::acquire(dir.path(), "demo", "apply") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("second lock must be refused"),
        };
        assert!(err.contains("`motorpool apply`"), "{err}");
        assert!(
            err.contains("another motorpool is changing project `demo`"),
            "{err}"
        );
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        ProjectLock::acquire(dir.path(), "demo", "apply").expect("free again after drop");
    }
}
