//! Private files: the one way motorpool writes anything under
//! `$MOTORPOOL_HOME` (or a node's directory) that can hold a credential or a
//! user's data — the project secret, the apply journal (launch user data,
//! with the agent credential and the node's TLS key), saved plans, instance
//! records, agent configs, step scripts and their logs, run records.
//!
//! Files are created 0600 and directories 0700 *whatever the umask*: the
//! mode is set on the open descriptor after creation (the umask can only
//! narrow the mode `open` asks for, and an existing file keeps its old mode
//! on `open`), so a permissive umask, or a file left by an older motorpool,
//! never leaves a credential readable by other users.
//!
//! It lives in the provider contract crate because both the engine and the
//! provider crates (local instances, the sim account) write such files, and
//! neither may import the other.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The mode of every private directory: the owner only.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every private file: the owner reads and writes, nobody else.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents, each new one with mode 0700. An
/// existing `dir` of this user that others could enter is narrowed to 0700
/// (a home laid out by an older motorpool); directories above it that
/// already existed are left as they are (they may be the user's own).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return narrow_dir(dir, &meta),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        create_dir(parent)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        // Made by a concurrent process meanwhile: narrow it like any other.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

fn narrow_dir(dir: &Path, meta: &fs::Metadata) -> io::Result<()> {
    // SAFETY: getuid has no preconditions and touches no memory.
    let mine = meta.uid() == unsafe { libc::getuid() };
    if mine && meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Opens (creating when `options` says so) a private file: mode 0600 on
/// creation, and set to 0600 on the open file whatever it was before.
pub fn open(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.mode(FILE_MODE).open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Creates a new private file; fails when `path` exists.
pub fn create_new(path: &Path) -> io::Result<File> {
    open(path, OpenOptions::new().write(true).create_new(true))
}

/// Writes `bytes` to the private file `path` atomically: a new 0600
/// temporary sibling, then a rename over `path`. A reader sees the old
/// content or the new one, never a part, and never a readable mode.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let written = create_new(&tmp).and_then(|mut file| file.write_all(bytes));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_and_files_are_private_and_old_ones_are_narrowed() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("a/b/c");
        create_dir(&deep).expect("create");
        for dir in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&root.path().join(dir)), DIR_MODE, "{dir}");
        }
        let file = deep.join("secret");
        write(&file, b"one").expect("write");
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(fs::read(&file).expect("read"), b"one");

        let old = root.path().join("old");
        fs::create_dir(&old).expect("mkdir");
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).expect("chmod");
        let old_file = old.join("journal");
        fs::write(&old_file, "x").expect("write");
        fs::set_permissions(&old_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        create_dir(&old).expect("narrow");
        assert_eq!(mode(&old), DIR_MODE);
        let f = open(&old_file, OpenOptions::new().append(true)).expect("open");
        drop(f);
        assert_eq!(mode(&old_file), FILE_MODE);
    }

    #[test]
    fn a_file_in_place_of_a_directory_is_an_error() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = root.path().join("f");
        fs::write(&file, "x").expect("write");
        assert!(create_dir(&file).is_err());
    }
}
