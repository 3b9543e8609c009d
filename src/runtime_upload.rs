//! The motorpool runtime that cloud nodes download when the spec gives no
//! `runtime_url`: this very binary, stripped, put by the provider where its
//! nodes can fetch it ([`motorpool_provider::Provider::publish_runtime`]:
//! on AWS and GCP the provider block's `runtime_bucket`, on Azure its
//! `storage_account` and `runtime_container`), handed to the nodes as a
//! time-limited URL with its SHA-256.
//!
//! This module owns choosing the binary (`MOTORPOOL_AGENT_PROGRAM`, else
//! the running executable), refusing one the nodes cannot run, and the
//! stripped copy, made once per binary under the home's
//! `cache/runtime/` and kept with its checksum. It does not know where a
//! provider puts it.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use motorpool_provider::RuntimeUpload;
use sha2::{Digest as _, Sha256};

use crate::home::Home;
use crate::providers::ProviderClient;

/// The platform cloud nodes run: every provider's default image is x86_64 Linux.
pub const NODE_PLATFORM: &str = "x86_64-linux";

/// How long the URL handed to nodes works: long enough for a launch the
/// journal replays after an interrupted apply, short enough to expire.
pub const URL_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What nodes are told: where to download the runtime and its checksum.
#[derive(Debug, Clone)]
pub struct Published {
    pub url: String,
    pub sha256: String,
}

/// The platform this binary was built for, as [`NODE_PLATFORM`] spells it.
pub fn this_platform() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Publish this motorpool for the project's nodes through its provider.
pub async fn publish(client: &ProviderClient, project: &str, home: &Home) -> Result<Published> {
    if this_platform() != NODE_PLATFORM {
        bail!(
            "this motorpool is a {} binary and cloud nodes run {NODE_PLATFORM}: give \
             `runtime_url` and `runtime_sha256` in the provider block (a motorpool build for \
             {NODE_PLATFORM})",
            this_platform()
        );
    }
    let binary = match std::env::var_os("MOTORPOOL_AGENT_PROGRAM") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().context("cannot find the motorpool binary")?,
    };
    let cache = home.root().join("cache").join("runtime");
    let stripped = tokio::task::spawn_blocking(move || stripped_copy(&binary, &cache))
        .await
        .context("the runtime's preparation stopped")??;
    let upload = RuntimeUpload {
        path: stripped.path,
        sha256: stripped.sha256.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        platform: NODE_PLATFORM.to_string(),
        project: project.to_string(),
        valid_for: URL_LIFETIME,
    };
    let url = client
        .publish_runtime(&upload)
        .await
        .context("the provider could not store the runtime")?
        .with_context(|| {
            format!(
                "the {} provider's settings name no place for the runtime: give `runtime_url` \
                 and `runtime_sha256`",
                client.kind()
            )
        })?;
    Ok(Published {
        url,
        sha256: stripped.sha256,
    })
}

/// A stripped copy of a binary and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripped {
    pub path: PathBuf,
    pub sha256: String,
}

/// The stripped copy of `binary` in `cache` (made the first time: symbols
/// and debug information are most of a build's size and nodes need
/// neither). Keyed by the binary's size and modification time; the copy's
/// checksum is kept beside it. Without `strip` on the machine, the binary
/// is used as it is.
pub fn stripped_copy(binary: &Path, cache: &Path) -> Result<Stripped> {
    let meta = std::fs::metadata(binary)
        .with_context(|| format!("cannot read the runtime binary {}", binary.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = cache.join(format!("{}-{modified}", meta.len()));
    let (path, sum) = (dir.join("motorpool"), dir.join("sha256"));
    if let (Ok(sha256), true) = (std::fs::read_to_string(&sum), path.is_file()) {
        let sha256 = sha256.trim().to_string();
        if sha256.len() == 64 {
            return Ok(Stripped { path, sha256 });
        }
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot make the runtime cache {}", dir.display()))?;
    let partial = dir.join(format!("motorpool.{}.tmp", std::process::id()));
    // `strip --strip-all IN -o OUT`, else `objcopy --strip-all IN OUT`.
    let stripped = [("strip", true), ("objcopy", false)]
        .iter()
        .any(|(tool, with_o)| {
            let mut command = std::process::Command::new(tool);
            command.arg("--strip-all").arg(binary);
            if *with_o {
                command.arg("-o");
            }
            command
                .arg(&partial)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !stripped {
        std::fs::copy(binary, &partial)
            .with_context(|| format!("cannot copy {} into the cache", binary.display()))?;
    }
    let sha256 = sha256_of(&partial)?;
    std::fs::rename(&partial, &path)
        .with_context(|| format!("cannot keep the stripped runtime at {}", path.display()))?;
    std::fs::write(&sum, format!("{sha256}\n"))
        .with_context(|| format!("cannot write {}", sum.display()))?;
    Ok(Stripped { path, sha256 })
}

/// Lower-case hex SHA-256 of a file's content.
pub fn sha256_of(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::observe::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stripped_copy_is_made_once_runs_and_is_smaller() {
        let cache = tempfile::tempdir().expect("cache");
        let binary = std::env::current_exe().expect("this test binary");
        let first = stripped_copy(&binary, cache.path()).expect("stripped");
        assert_eq!(first.sha256, sha256_of(&first.path).expect("hash"));
        let original = std::fs::metadata(&binary).expect("meta").len();
        let copy = std::fs::metadata(&first.path).expect("meta").len();
        assert!(
            copy < original,
            "{copy} bytes is not smaller than {original}"
        );
        // The second time comes from the cache: same file, same checksum.
        let modified = std::fs::metadata(&first.path)
            .expect("meta")
            .modified()
            .ok();
        let second = stripped_copy(&binary, cache.path()).expect("cached");
        assert_eq!(second, first);
        assert_eq!(
            std::fs::metadata(&second.path)
                .expect("meta")
                .modified()
                .ok(),
            modified
        );
        // A stripped test binary still runs.
        let listed = std::process::Command::new(&first.path)
            .arg("--list")
            .output()
            .expect("runs");
        assert!(listed.status.success());
    }
}
