//! Confining the paths a spec names: init scripts, requirements files,
//! includes and mount sources stay inside the project (the root spec file's
//! directory), and a mount's target inside the node's directory.
//!
//! This module owns the one rule, applied twice: by `validate` (with the
//! value's `file:line:col`) and again on the node side before a step is
//! rendered (a plan or a journal can be edited by hand). Paths are judged
//! after lexical normalisation (`.` dropped, `a/..` folded), so
//! `data/../../etc` is caught as well as `../etc`. Those rules read no file
//! system; [`resolves_inside`] then follows symlinks: a path inside the
//! project that resolves (through a symlink) out of it is refused too,
//! wherever a file of the project is read (includes, init scripts,
//! requirements, mount sources, secret files, job inputs, the job bundle).

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Why a path from a spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathProblem {
    #[error("the path is empty")]
    Empty,
    #[error("the path holds a control character ({0:?}); file names must be printable")]
    ControlCharacter(char),
    #[error("`{0}` is absolute; give a path relative to the spec file's directory")]
    Absolute(String),
    #[error("`{path}` leads out of {root} (after normalising: `{normalised}`)")]
    Escapes {
        path: String,
        normalised: String,
        root: &'static str,
    },
    #[error(
        "`{path}` is inside the project but a symlink takes it out: it resolves to {resolved}, \
         outside {root}"
    )]
    SymlinkEscapes {
        path: String,
        resolved: String,
        root: String,
    },
}

/// `path` (below `root`, e.g. `root.join(relative)` or a glob's match)
/// resolved through every symlink stays inside `root` (itself resolved).
/// A path that does not exist yet is judged by its deepest existing
/// ancestor below `root`; a missing file is for the caller to report.
pub fn resolves_inside(root: &Path, path: &Path) -> Result<(), PathProblem> {
    let Ok(real_root) = std::fs::canonicalize(root) else {
        return Ok(());
    };
    let mut probe = path.to_path_buf();
    let resolved = loop {
        match std::fs::canonicalize(&probe) {
            Ok(real) => break real,
            Err(_) => {
                if probe == root || !probe.pop() || !probe.starts_with(root) {
                    return Ok(());
                }
            }
        }
    };
    if resolved.starts_with(&real_root) {
        Ok(())
    } else {
        let shown = path.strip_prefix(root).unwrap_or(path);
        Err(PathProblem::SymlinkEscapes {
            path: shown.display().to_string(),
            resolved: resolved.display().to_string(),
            root: real_root.display().to_string(),
        })
    }
}

/// [`resolves_inside`] for a path relative to the project.
pub fn resolved_inside(root: &Path, relative: &Path) -> Result<(), PathProblem> {
    resolves_inside(root, &root.join(relative))
}

/// The first control character of `text` (newline, tab, NUL, escape, DEL...).
pub fn control_character(text: &str) -> Option<char> {
    text.chars().find(|c| c.is_control())
}

/// `path` normalised lexically below an unnamed root: `Ok` with its
/// components (no `.`, no `..`), or the normalised text when a `..` would
/// leave the root.
fn fold(path: &Path) -> Result<Vec<String>, String> {
    let mut parts: Vec<String> = Vec::new();
    let mut escaped = false;
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    escaped = true;
                }
            }
            Component::Normal(name) => parts.push(name.to_string_lossy().into_owned()),
        }
    }
    if escaped {
        let mut text = String::from("..");
        for part in &parts {
            text.push('/');
            text.push_str(part);
        }
        Err(text)
    } else {
        Ok(parts)
    }
}

/// A path relative to the project (the spec file's directory): an init
/// script, a requirements file, an include pattern, a local mount source.
/// Returns it normalised (`./scripts/../a.sh` is `a.sh`).
pub fn project_path(path: &str) -> Result<PathBuf, PathProblem> {
    if let Some(c) = control_character(path) {
        return Err(PathProblem::ControlCharacter(c));
    }
    if path.trim().is_empty() {
        return Err(PathProblem::Empty);
    }
    if Path::new(path).is_absolute() {
        return Err(PathProblem::Absolute(path.to_string()));
    }
    match fold(Path::new(path)) {
        Ok(parts) if parts.is_empty() => Ok(PathBuf::from(".")),
        Ok(parts) => Ok(parts.iter().collect()),
        Err(normalised) => Err(PathProblem::Escapes {
            path: path.to_string(),
            normalised,
            root: "the project (the spec file's directory)",
        }),
    }
}

/// A job's local path (a map's `input` file or glob, a task's `output`
/// directory): [`project_path`], and never the project itself. Returned
/// normalised; the caller leaves URLs (`s3://`...) alone.
pub fn job_path(path: &str) -> Result<PathBuf, PathProblem> {
    let normalised = project_path(path)?;
    if normalised == Path::new(".") {
        return Err(PathProblem::Escapes {
            path: path.to_string(),
            normalised: ".".into(),
            root: "the project's files (it names the project directory itself)",
        });
    }
    Ok(normalised)
}

/// A mount's target: a path inside the node's directory (`/mnt/data` is
/// `<node>/fs/mnt/data` on the local provider, `/mnt/data` on a cloud
/// node), returned normalised and starting with `/`. Refused when a `..`
/// leads above its root, or when it names the root itself.
pub fn node_target(target: &str) -> Result<String, PathProblem> {
    if let Some(c) = control_character(target) {
        return Err(PathProblem::ControlCharacter(c));
    }
    let escapes = |normalised: String| PathProblem::Escapes {
        path: target.to_string(),
        normalised,
        root: "the node's directory",
    };
    match fold(Path::new(target)) {
        Ok(parts) if parts.is_empty() => Err(PathProblem::Empty),
        Ok(parts) => Ok(format!("/{}", parts.join("/"))),
        Err(normalised) => Err(escapes(normalised)),
    }
}

/// A mount's source as a node receives it: a URL (`s3://`, `gs://`,
/// `az://`), or an absolute local path without `..` (the plan resolved it
/// inside the project).
pub fn node_source(source: &str) -> Result<(), PathProblem> {
    if let Some(c) = control_character(source) {
        return Err(PathProblem::ControlCharacter(c));
    }
    if source.contains("://") {
        return Ok(());
    }
    let path = Path::new(source);
    if source.is_empty() {
        return Err(PathProblem::Empty);
    }
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(PathProblem::Escapes {
            path: source.to_string(),
            normalised: source.to_string(),
            root: "the project (a mount's source reaches a node resolved and normalised)",
        });
    }
    Ok(())
}

/// `path` joined below `base` and normalised lexically (for plans: a mount
/// source resolved to an absolute path with no `.` or `..` in it).
pub fn resolve_below(base: &Path, relative: &Path) -> PathBuf {
    let joined = base.join(relative);
    let absolute = std::path::absolute(&joined).unwrap_or(joined);
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_normalised_and_confined() {
        assert_eq!(project_path("./scripts/../a.sh"), Ok(PathBuf::from("a.sh")));
        assert_eq!(project_path("a/b.sh"), Ok(PathBuf::from("a/b.sh")));
        for escaping in ["..", "../x", "a/../../x", "./a/./../../etc/passwd"] {
            assert!(
                matches!(project_path(escaping), Err(PathProblem::Escapes { .. })),
                "{escaping}"
            );
        }
        assert!(matches!(
            project_path("/etc/passwd"),
            Err(PathProblem::Absolute(_))
        ));
        assert_eq!(
            project_path("a\nb"),
            Err(PathProblem::ControlCharacter('\n'))
        );
        assert_eq!(project_path(""), Err(PathProblem::Empty));
    }

    #[test]
    fn node_targets_stay_below_the_node_directory() {
        assert_eq!(node_target("/mnt/data"), Ok("/mnt/data".to_string()));
        assert_eq!(node_target("mnt/./x/../y"), Ok("/mnt/y".to_string()));
        for escaping in ["/../../../../tmp/x", "..", "/mnt/../../x"] {
            assert!(
                matches!(node_target(escaping), Err(PathProblem::Escapes { .. })),
                "{escaping}"
            );
        }
        assert_eq!(node_target("/"), Err(PathProblem::Empty));
        assert_eq!(
            node_target("/a\0"),
            Err(PathProblem::ControlCharacter('\0'))
        );
    }

    #[test]
    fn node_sources_are_urls_or_resolved_paths() {
        assert!(node_source("s3://bucket/prefix").is_ok());
        assert!(node_source("/home/me/project/data").is_ok());
        assert!(node_source("/home/me/project/../../etc").is_err());
        assert!(node_source("data").is_err());
    }

    #[test]
    fn job_paths_are_normalised_and_confined() {
        assert_eq!(
            job_path("./data/../in/*.csv"),
            Ok(PathBuf::from("in/*.csv"))
        );
        for bad in [
            "..",
            "../x",
            "data/../../x",
            "/tmp/out",
            ".",
            "a/..",
            "a\nb",
            "",
        ] {
            assert!(job_path(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a spec writes as a path, what is accepted is relative,
        /// without `.` or `..`, and stays below the project when joined.
        #[test]
        fn any_accepted_spec_path_stays_in_the_project(path in "[a-z./\\\\\n]{0,24}") {
            if let Ok(p) = project_path(&path) {
                proptest::prop_assert!(p.is_relative());
                proptest::prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir)));
                let root = Path::new("/project");
                proptest::prop_assert!(resolve_below(root, &p).starts_with(root));
            }
            if let Ok(t) = node_target(&path) {
                proptest::prop_assert!(t.starts_with('/'));
                proptest::prop_assert!(!Path::new(&t).components().any(|c| c == Component::ParentDir));
            }
        }
    }

    #[test]
    fn a_symlink_out_of_the_project_is_refused() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), "x").expect("write");
        let project = tempfile::tempdir().expect("tempdir");
        let root = project.path();
        std::fs::create_dir(root.join("scripts")).expect("mkdir");
        std::fs::write(root.join("scripts/ok.sh"), "true").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("scripts/leak"))
            .expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.join("out")).expect("symlink");
        std::os::unix::fs::symlink("ok.sh", root.join("scripts/alias.sh")).expect("symlink");
        assert_eq!(resolved_inside(root, Path::new("scripts/ok.sh")), Ok(()));
        assert_eq!(resolved_inside(root, Path::new("scripts/alias.sh")), Ok(()));
        assert_eq!(
            resolved_inside(root, Path::new("scripts/missing.sh")),
            Ok(())
        );
        for escaping in ["scripts/leak", "out", "out/secret", "out/not-there-yet"] {
            let err = resolved_inside(root, Path::new(escaping)).expect_err(escaping);
            assert!(
                matches!(err, PathProblem::SymlinkEscapes { .. }),
                "{escaping}: {err}"
            );
            assert!(err.to_string().contains(escaping), "{err}");
        }
    }

    #[test]
    fn resolving_folds_dots() {
        assert_eq!(
            resolve_below(Path::new("/p/spec"), Path::new("./data/../in")),
            PathBuf::from("/p/spec/in")
        );
    }
}
