//! Code bundles: a job's directory as one content-addressed archive.
//!
//! The archive is a plain, deterministic list of files (sorted paths, the
//! executable bit, the bytes; no times, no owners), so the same directory
//! always gives the same id: the sha256 of the archive, in hex. The driver
//! keeps each bundle once; executors fetch it once per id and cache it
//! unpacked.
//!
//! Left out: hidden entries (`.git`, `.venv`, ...), `__pycache__`, and
//! whatever the caller excludes (map inputs, which travel separately, and
//! task outputs).
//!
//! A symlink is followed only to a file inside the bundled directory (the
//! project): one that leads out of it is refused, named, rather than left
//! out. Leaving it out would ship a job that fails on the cluster for a
//! file it cannot find, far from the cause; following it would upload a
//! file from anywhere on the machine (a credentials file, say) to the
//! cluster. The message says how to go on: copy the file into the project,
//! or exclude the link.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"MPBUNDLE1\n";

/// The largest bundle the client builds: code, not data.
pub const MAX_BUNDLE_BYTES: u64 = 256 << 20;

/// An archive of a directory's files.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The sha256 of `bytes`, hex.
    pub id: String,
    pub bytes: Vec<u8>,
    /// Relative paths of the files inside, sorted.
    pub files: Vec<String>,
}

/// The sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` looks like a bundle id (64 hex digits).
pub fn is_bundle_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a bundle leaves out, besides hidden entries and `__pycache__`
/// (all relative to the bundled directory).
#[derive(Debug, Clone, Default)]
pub struct Exclude {
    /// These files.
    pub files: HashSet<PathBuf>,
    /// Everything under these directories.
    pub dirs: Vec<PathBuf>,
    /// Files and directories whose relative path matches (`*` stays within one
    /// path component; `data`, `data/*.csv`, `**/*.parquet`).
    pub patterns: Vec<glob::Pattern>,
}

impl Exclude {
    fn skips(&self, rel: &Path, is_dir: bool) -> bool {
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        (!is_dir && self.files.contains(rel))
            || self.dirs.iter().any(|d| rel.starts_with(d))
            || self
                .patterns
                .iter()
                .any(|p| p.matches_path_with(rel, options))
    }
}

/// Archives the files under `dir`, leaving out hidden entries, `__pycache__`
/// and what `exclude` names.
pub fn build(dir: &Path, exclude: &Exclude) -> anyhow::Result<Bundle> {
    let mut files = Vec::new();
    walk(dir, Path::new(""), exclude, &mut files)?;
    files.sort();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(files.len() as u64).to_le_bytes());
    let mut names = Vec::with_capacity(files.len());
    for rel in &files {
        let path = dir.join(rel);
        let data =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o644);
        let name = rel
            .to_str()
            .with_context(|| format!("{} is not a UTF-8 path", path.display()))?
            .to_string();
        bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(u8::from(mode & 0o111 != 0));
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&data);
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            bail!(
                "the job's code bundle would be over {} MiB (at {}): keep data out of the job directory, name it as a map `input`, or exclude it",
                MAX_BUNDLE_BYTES >> 20,
                path.display()
            );
        }
        names.push(name);
    }
    Ok(Bundle {
        id: sha256_hex(&bytes),
        bytes,
        files: names,
    })
}

fn walk(root: &Path, rel: &Path, exclude: &Exclude, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let entries =
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if name_str.starts_with('.') || name_str == "__pycache__" {
            continue;
        }
        let child = rel.join(&name);
        let file_type = entry
            .file_type()
            .with_context(|| format!("cannot read {}", entry.path().display()))?;
        if file_type.is_dir() {
            if exclude.skips(&child, true) {
                continue;
            }
            walk(root, &child, exclude, out)?;
        } else {
            // Files, and symlinks to files (a symlink to a directory is left out:
            // it could loop).
            let Ok(meta) = std::fs::metadata(entry.path()) else {
                continue;
            };
            if !meta.is_file() || exclude.skips(&child, false) {
                continue;
            }
            if file_type.is_symlink()
                && let Err(problem) = crate::confine::resolves_inside(root, &entry.path())
            {
                bail!(
                    "the job's directory holds a symlink that leads out of the project: {problem}. \
                     Nothing was uploaded; copy the file into the project, or remove the link"
                );
            }
            out.push(child);
        }
    }
    Ok(())
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> anyhow::Result<&'a [u8]> {
    if bytes.len() < n {
        bail!("the bundle is truncated (in {what})");
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_u64(bytes: &mut &[u8], what: &str) -> anyhow::Result<u64> {
    let b = take(bytes, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

fn take_u32(bytes: &mut &[u8], what: &str) -> anyhow::Result<u32> {
    let b = take(bytes, 4, what)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    Ok(u32::from_le_bytes(a))
}

/// Unpacks an archive made by [`build`] into `dest` (created; must not hold
/// the same files). Refuses paths that would leave `dest`.
pub fn unpack(bytes: &[u8], dest: &Path) -> anyhow::Result<usize> {
    let mut rest = bytes;
    if take(&mut rest, MAGIC.len(), "the header")? != MAGIC {
        bail!("not a motorpool bundle");
    }
    let count = take_u64(&mut rest, "the file count")?;
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for _ in 0..count {
        let len = take_u32(&mut rest, "a path length")? as usize;
        let name = std::str::from_utf8(take(&mut rest, len, "a path")?)
            .context("the bundle holds a path that is not UTF-8")?;
        let rel = super::safe_relative(name)?;
        let exec = take(&mut rest, 1, "a mode")?[0] != 0;
        let size = take_u64(&mut rest, "a file size")?;
        let size = usize::try_from(size).context("a file in the bundle is too large")?;
        let data = take(&mut rest, size, name)?;
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mode = if exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    }
    if !rest.is_empty() {
        bail!("the bundle has {} stray bytes at its end", rest.len());
    }
    Ok(count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_never_follows_a_symlink_out_of_the_project() {
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("credentials"), "aws_secret=x").expect("write");
        let src = tempfile::tempdir().expect("tmp");
        std::fs::write(src.path().join("job.py"), "print(1)\n").expect("write");
        std::os::unix::fs::symlink("job.py", src.path().join("alias.py")).expect("symlink");
        let inside = build(src.path(), &Exclude::default()).expect("links inside are followed");
        assert_eq!(inside.files, vec!["alias.py", "job.py"]);
        std::os::unix::fs::symlink(outside.path().join("credentials"), src.path().join("creds"))
            .expect("symlink");
        let err = build(src.path(), &Exclude::default())
            .expect_err("a link out is refused")
            .to_string();
        assert!(err.contains("`creds`"), "{err}");
        assert!(err.contains("leads out of the project"), "{err}");
        assert!(!err.contains("aws_secret"), "{err}");
        // Excluded, it is no longer the bundle's business.
        let exclude = Exclude {
            files: [PathBuf::from("creds")].into(),
            ..Exclude::default()
        };
        assert!(build(src.path(), &exclude).is_ok());
    }

    #[test]
    fn bundles_are_deterministic_and_round_trip() {
        let src = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(src.path().join("lib")).expect("mkdir");
        std::fs::create_dir_all(src.path().join(".git")).expect("mkdir");
        std::fs::create_dir_all(src.path().join("out")).expect("mkdir");
        std::fs::write(src.path().join("wc.py"), "print(1)\n").expect("write");
        std::fs::write(src.path().join("lib/x.txt"), "x").expect("write");
        std::fs::write(src.path().join("data.txt"), "big").expect("write");
        std::fs::write(src.path().join("out/part-00000"), "old").expect("write");
        std::fs::write(src.path().join(".git/HEAD"), "ref").expect("write");
        std::fs::set_permissions(
            src.path().join("wc.py"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        let exclude = Exclude {
            files: [PathBuf::from("data.txt")].into(),
            dirs: vec![PathBuf::from("out")],
            patterns: Vec::new(),
        };
        let a = build(src.path(), &exclude).expect("build");
        let b = build(src.path(), &exclude).expect("build");
        assert_eq!(a.id, b.id);
        assert_eq!(a.files, vec!["lib/x.txt", "wc.py"]);
        let by_pattern = Exclude {
            patterns: vec![
                glob::Pattern::new("*.txt").expect("glob"),
                glob::Pattern::new("out").expect("glob"),
            ],
            ..Exclude::default()
        };
        // `*.txt` is data.txt at the top, not lib/x.txt.
        let c = build(src.path(), &by_pattern).expect("build");
        assert_eq!(c.files, vec!["lib/x.txt", "wc.py"]);
        let dest = tempfile::tempdir().expect("tmp");
        assert_eq!(unpack(&a.bytes, dest.path()).expect("unpack"), 2);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("lib/x.txt")).expect("read"),
            "x"
        );
        let mode = std::fs::metadata(dest.path().join("wc.py"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        // Changing a byte changes the id.
        std::fs::write(src.path().join("lib/x.txt"), "y").expect("write");
        assert_ne!(build(src.path(), &exclude).expect("build").id, a.id);
    }

    #[test]
    fn hostile_archives_are_refused() {
        let mut evil = MAGIC.to_vec();
        evil.extend_from_slice(&1u64.to_le_bytes());
        let name = b"../escape";
        evil.extend_from_slice(&(name.len() as u32).to_le_bytes());
        evil.extend_from_slice(name);
        evil.push(0);
        evil.extend_from_slice(&1u64.to_le_bytes());
        evil.push(b'x');
        let dest = tempfile::tempdir().expect("tmp");
        assert!(unpack(&evil, dest.path()).is_err());
        assert!(unpack(b"garbage", dest.path()).is_err());
        let mut short = MAGIC.to_vec();
        short.extend_from_slice(&5u64.to_le_bytes());
        assert!(unpack(&short, dest.path()).is_err());
    }
}
