//! `$MOTORPOOL_HOME` (default `~/.motorpool`): where the local and sim
//! providers keep their instances, and where each project keeps its apply
//! lock and journal.
//!
//! This module owns finding, checking and laying out that directory. It holds
//! no cloud state: observed state always comes from the providers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum HomeError {
    #[error("cannot find a home directory for motorpool: set MOTORPOOL_HOME or HOME")]
    NoHome,
    #[error("MOTORPOOL_HOME {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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
    pub fn at(root: impl Into<PathBuf>) -> Result<Home, HomeError> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(HomeError::NotADirectory { path: root }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&root).map_err(|source| HomeError::Io {
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

    /// `projects/<project>/`, created when missing.
    pub fn project_dir(&self, project: &str) -> Result<PathBuf, HomeError> {
        let dir = self.root.join("projects").join(project);
        ensure_dir(&dir)?;
        Ok(dir)
    }
}

/// Create `dir` (and parents), with an error that names the path.
pub fn ensure_dir(dir: &Path) -> Result<(), HomeError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(HomeError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(_) => fs::create_dir_all(dir).map_err(|source| HomeError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Write `bytes` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
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
    fn a_missing_home_is_created_with_project_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path().join("a/b")).expect("home");
        let p = home.project_dir("demo").expect("project dir");
        assert!(p.is_dir());
    }
}
