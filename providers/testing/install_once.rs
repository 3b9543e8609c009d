//! A test tool made once per cargo target directory and kept there for
//! every later run, like a cache: moto's and the Cloud Storage emulator's
//! virtualenvs from PyPI, Azurite from npm. An environment variable naming
//! a ready program skips the install. Otherwise the install runs under a
//! file lock beside the tool's directory (several test processes may ask at
//! once), and a marker naming the version is written only once it worked,
//! so a half-made install is made again and a new pin replaces an old one.
//!
//! Included by path (`#[path]`) from the test crates that start these
//! tools; it uses std and libc only, and owns nothing but finding or making
//! the program.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One tool: where it lives under the target directory and how it is named.
pub struct Tool<'a> {
    /// The environment variable that may name a ready program.
    pub env_var: &'a str,
    /// Its directory under the target directory (`moto-venv`); the lock is
    /// `<dir>.lock` beside it.
    pub dir: &'a str,
    /// The program, relative to `dir`.
    pub program: &'a str,
    /// What is installed, as the registry names it (`moto[server]==5.2.5`).
    pub package: &'a str,
    /// The marker's name in `dir` after `.motorpool-` (`moto-5.2.5`; the
    /// same `scripts/test` writes when it installs the tool itself).
    pub marker: &'a str,
}

/// The cargo target directory this test binary runs from.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/<test binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The tool's program: the one `env_var` names, or the one made (once,
/// by `install` into the tool's directory) under the target directory.
pub fn find_or_install(
    tool: &Tool,
    install: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(tool.env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{} is {}, which is not a file",
                tool.env_var,
                p.display()
            ))
        };
    }
    let target = target_dir();
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let dir = target.join(tool.dir);
    let program = dir.join(tool.program);
    let lock_path = target.join(format!("{}.lock", tool.dir));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let marker = dir.join(format!(".motorpool-{}", tool.marker));
    if marker.is_file() && program.is_file() {
        return Ok(program);
    }
    eprintln!("installing {} into {} (once)", tool.package, dir.display());
    install(&dir)?;
    if !program.is_file() {
        return Err(format!(
            "{} was installed but {} is missing",
            tool.package,
            program.display()
        ));
    }
    std::fs::write(&marker, tool.package)
        .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(program)
}

/// A fresh virtualenv at `venv` with `requirement` installed from PyPI.
pub fn pip_venv(venv: &Path, requirement: &str) -> Result<(), String> {
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv))?;
    run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
    ]))
}

/// Runs `cmd` to its end; its output is the error when it fails.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
