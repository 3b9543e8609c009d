//! `$MOTORPOOL_HOME` (default `~/.motorpool`): where the local and sim
//! providers keep their instances, and where each project keeps its apply
//! lock and journal.
//!
//! This module owns finding, checking and laying out that directory. It holds
//! no cloud state: observed state always comes from the providers. Every
//! directory it makes is private (0700) and every file written through
//! [`write_atomic`] private (0600), whatever the umask: see
//! [`motorpool_provider::private_files`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use motorpool_provider::private_files;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HomeError {
    #[error("cannot find a home directory for motorpool: set MOTORPOOL_HOME or HOME")]
    NoHome,
    #[error("MOTORPOOL_HOME {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "refusing to use the motorpool home {path}: it belongs to another user (uid {owner}) and \
         others can enter it (mode {mode:04o}); it holds project secrets and credentials. Set \
         MOTORPOOL_HOME to a directory of your own"
    )]
    NotOurs {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
}

/// The checked motorpool home directory.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$MOTORPOOL_HOME`, or `$HOME/.motorpool`; created when missing.
    pub fn from_env() -> Result<Home, HomeError> {
        let root = match std::env::var_os("MOTORPOOL_HOME") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => match std::env::var_os("HOME") {
                Some(h) if !h.is_empty() => PathBuf::from(h).join(".motorpool"),
                _ => return Err(HomeError::NoHome),
            },
        };
        Home::at(root)
    }

    /// A home at `root`, created when missing; an existing file there is an error.
    /// An existing home that the group or others can enter is narrowed to
    /// 0700 when it is this user's, and refused when it is another user's
    /// (its secrets would be theirs, or readable by them).
    pub fn at(root: impl Into<PathBuf>) -> Result<Home, HomeError> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {
                use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
                let mode = m.mode() & 0o7777;
                if mode & 0o077 != 0 {
                    // SAFETY: getuid has no preconditions and touches no memory.
                    let me = unsafe { libc::getuid() };
                    if m.uid() != me {
                        return Err(HomeError::NotOurs {
                            path: root,
                            owner: m.uid(),
                            mode,
                        });
                    }
                    fs::set_permissions(&root, fs::Permissions::from_mode(private_files::DIR_MODE))
                        .map_err(|source| HomeError::Io {
                            path: root.clone(),
                            source,
                        })?;
                }
            }
            Ok(_) => return Err(HomeError::NotADirectory { path: root }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                private_files::create_dir(&root).map_err(|source| HomeError::Io {
                    path: root.clone(),
                    source,
                })?;
            }
            Err(source) => return Err(HomeError::Io { path: root, source }),
        }
        Ok(Home { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The project's secret if it has one here (`$MOTORPOOL_PROJECT_SECRET`
    /// or `projects/<project>/secret`), creating nothing: for checking files
    /// that claim to belong to a project (a saved plan names its own).
    /// `project` must be a valid project name (it becomes a path).
    pub fn existing_project_secret(
        &self,
        project: &str,
    ) -> Result<Option<crate::auth::Credential>, HomeError> {
        if let Ok(s) = std::env::var(SECRET_ENV)
            && !s.is_empty()
        {
            return Ok(Some(crate::auth::Credential::new(s)));
        }
        if !crate::spec::is_valid_name(project) {
            return Ok(None);
        }
        let path = self.root.join("projects").join(project).join("secret");
        match fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(crate::auth::Credential::new(s.trim()))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HomeError::Io { path, source }),
        }
    }

    /// `projects/<project>/`, created when missing; it and `projects/` are
    /// private (0700), also when an older motorpool made them readable.
    pub fn project_dir(&self, project: &str) -> Result<PathBuf, HomeError> {
        let projects = self.root.join("projects");
        ensure_dir(&projects)?;
        let dir = projects.join(project);
        ensure_dir(&dir)?;
        Ok(dir)
    }
}

/// The environment variable that supplies a project's secret in CI, where
/// no home directory survives between runs.
pub const SECRET_ENV: &str = "MOTORPOOL_PROJECT_SECRET";

impl Home {
    /// The project's secret, which every credential derives from:
    /// `$MOTORPOOL_PROJECT_SECRET`, or `projects/<project>/secret` (mode 0600,
    /// 32 random bytes, created on first use).
    pub fn project_secret(&self, project: &str) -> Result<crate::auth::Credential, HomeError> {
        if let Ok(s) = std::env::var(SECRET_ENV)
            && !s.is_empty()
        {
            return Ok(crate::auth::Credential::new(s));
        }
        let path = self.project_dir(project)?.join("secret");
        let io = |source| HomeError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => return Ok(crate::auth::Credential::new(s.trim())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut bytes = [0u8; 32];
        use std::io::Read as _;
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(io)?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        {
            use std::io::Write as _;
            let mut f = private_files::open(
                &tmp,
                fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true),
            )
            .map_err(io)?;
            f.write_all(secret.as_bytes()).map_err(io)?;
        }
        // A concurrent first use may have won: keep whichever secret landed first.
        if fs::hard_link(&tmp, &path).is_err() {
            let _ = fs::remove_file(&tmp);
            let s = fs::read_to_string(&path).map_err(io)?;
            return Ok(crate::auth::Credential::new(s.trim()));
        }
        let _ = fs::remove_file(&tmp);
        Ok(crate::auth::Credential::new(secret))
    }
}

/// Create the private directory `dir` (and missing parents, 0700), with an
/// error that names the path.
pub fn ensure_dir(dir: &Path) -> Result<(), HomeError> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(HomeError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        _ => private_files::create_dir(dir).map_err(|source| HomeError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Write `bytes` to the private file `path` (0600) atomically: a temporary
/// file beside it, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    private_files::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_place_of_home_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("home");
        fs::write(&file, "x").expect("write");
        let err = Home::at(&file).expect_err("a file is not a home");
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }

    #[test]
    fn the_project_secret_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path()).expect("home");
        let a = home.project_secret("demo").expect("secret");
        let b = home.project_secret("demo").expect("secret again");
        assert_eq!(a, b);
        assert_eq!(a.expose().len(), 64);
        let mode = fs::metadata(dir.path().join("projects/demo/secret"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(a, home.project_secret("other").expect("other project"));
    }

    #[test]
    fn an_open_home_of_ours_is_narrowed_to_0700() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("home");
        fs::create_dir(&root).expect("mkdir");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
        Home::at(&root).expect("our own home is used");
        let mode = fs::metadata(&root).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn an_open_home_of_another_user_is_refused() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        // /tmp is open to everyone and belongs to root: another user's
        // unless the tests run as root, where a directory handed to
        // another uid stands in for it.
        let dir = tempfile::tempdir().expect("tempdir");
        // SAFETY: getuid has no preconditions.
        let root = if unsafe { libc::getuid() } == 0 {
            let p = dir.path().join("theirs");
            fs::create_dir(&p).expect("mkdir");
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 4242, 4242) }, 0);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o775)).expect("chmod");
            p
        } else {
            PathBuf::from("/tmp")
        };
        let before = fs::metadata(&root).expect("meta");
        let err = Home::at(&root).expect_err("another user's open home is refused");
        let text = err.to_string();
        assert!(text.contains("belongs to another user"), "{text}");
        assert!(text.contains("MOTORPOOL_HOME"), "{text}");
        let after = fs::metadata(&root).expect("meta");
        assert_eq!(before.mode(), after.mode(), "nothing was changed");
    }

    #[test]
    fn a_missing_home_is_created_with_project_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path().join("a/b")).expect("home");
        let p = home.project_dir("demo").expect("project dir");
        assert!(p.is_dir());
    }
}
