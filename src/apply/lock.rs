//! The project lock: one apply (or destroy) per project at a time, across
//! processes. An advisory `flock` on `projects/<project>/apply.lock`, released
//! by the kernel when the holder exits, even by SIGKILL, so it never goes stale.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "another motorpool apply is running for project `{project}` ({holder}); wait for it to finish, or stop it, then try again"
    )]
    Held { project: String, holder: String },
    #[error("cannot open the project lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while it lives.
pub struct ProjectLock {
    _file: File,
}

impl ProjectLock {
    /// Take the lock or fail at once, naming who holds it.
    pub fn acquire(project_dir: &Path, project: &str) -> Result<ProjectLock, LockError> {
        let path = project_dir.join("apply.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = motorpool_provider::private_files::open(
            &path,
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
            return Err(LockError::Held {
                project: project.to_string(),
                holder: if holder.is_empty() {
                    "holder unknown".to_string()
                } else {
                    holder.to_string()
                },
            });
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(
            file,
            "pid {}, started at unix time {now}",
            std::process::id()
        )
        .map_err(io)?;
        Ok(ProjectLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_holders_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ProjectLock::acquire(dir.path(), "demo").expect("first lock");
        let err = match ProjectLock::acquire(dir.path(), "demo") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("second lock must be refused"),
        };
        assert!(err.contains("another motorpool apply is running"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        ProjectLock::acquire(dir.path(), "demo").expect("free again after drop");
    }
}
