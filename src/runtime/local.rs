//! Input files read where they lie instead of being copied through the
//! driver: a file's identity ([`proto::LocalFile`]: path, device, inode,
//! size, mtime) as one process saw it, and opening that very file again in
//! another process on the same machine.
//!
//! Owns only the identity check; what to do when it fails (upload the file,
//! call ReadInput) is the caller's. It must not read file contents.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::proto;

/// The identity of the regular file at `path` (absolute), following symlinks.
pub(crate) fn identify(path: &Path) -> std::io::Result<proto::LocalFile> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(proto::LocalFile {
        path: path.to_string_lossy().into_owned(),
        ..of(&meta)
    })
}

fn of(meta: &std::fs::Metadata) -> proto::LocalFile {
    proto::LocalFile {
        path: String::new(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
    }
}

/// Opens the file `want` names when it is still that very file (same device,
/// inode, size and mtime); `None` when it is not there, not readable, or a
/// different file now.
pub(crate) fn open_same(want: &proto::LocalFile) -> Option<File> {
    let path = Path::new(&want.path);
    if want.path.is_empty() || !path.is_absolute() {
        return None;
    }
    let f = File::open(path).ok()?;
    let meta = f.metadata().ok()?;
    let have = of(&meta);
    (meta.is_file()
        && have.dev == want.dev
        && have.ino == want.ino
        && have.size == want.size
        && have.mtime_ns == want.mtime_ns)
        .then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_opens_and_a_changed_one_does_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "one\n").expect("write");
        let id = identify(&path).expect("identify");
        assert_eq!(id.size, 4);
        assert!(open_same(&id).is_some());
        // Another file at the same path is not the same file.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, "two\n").expect("write");
        let mut stale = id.clone();
        stale.ino = stale.ino.wrapping_add(1);
        assert!(open_same(&stale).is_none());
        // A relative path or a directory is never opened.
        let mut relative = identify(&path).expect("identify");
        relative.path = "a.txt".into();
        assert!(open_same(&relative).is_none());
        assert!(identify(dir.path()).is_err());
    }
}
