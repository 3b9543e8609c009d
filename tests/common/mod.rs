//! Shared by the CLI tests: a temporary `$MOTORPOOL_HOME` and spec directory,
//! the binary run as a user runs it, and a guard that kills every process
//! started under that home when the test ends, also when it fails.

#![allow(dead_code)]

pub mod cloud_init;
pub mod controller;
pub mod lifecycle;
pub mod lock_scenarios;
pub mod machines;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Env {
    pub home: tempfile::TempDir,
    pub dir: tempfile::TempDir,
    /// Extra environment for every command (e.g. `MOTORPOOL_TLS=always`).
    pub vars: Vec<(String, String)>,
    /// The program run as `motorpool` (default: the crate's binary).
    pub program: PathBuf,
}

/// A finished command's exit code and text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// Panic with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_motorpool")
}

impl Env {
    pub fn new() -> Env {
        Env {
            home: tempfile::Builder::new()
                .prefix("mp-home-")
                .tempdir()
                .expect("temp home"),
            dir: tempfile::Builder::new()
                .prefix("mp-spec-")
                .tempdir()
                .expect("temp spec dir"),
            vars: Vec::new(),
            program: PathBuf::from(binary()),
        }
    }

    /// Run `program` as motorpool (a test binary embedding the CLI).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Env {
        self.program = program.into();
        self
    }

    /// Every command of this environment runs with `name=value`.
    pub fn with_var(mut self, name: &str, value: &str) -> Env {
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Write `motorpool.yaml` in the spec directory; returns the directory.
    pub fn spec(&self, yaml: &str) -> PathBuf {
        std::fs::write(self.dir.path().join("motorpool.yaml"), yaml).expect("write spec");
        self.dir.path().to_path_buf()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        c.args(args)
            .current_dir(self.dir.path())
            .env("MOTORPOOL_HOME", self.home())
            .env_remove("MOTORPOOL_AGENT_PROGRAM")
            .env_remove("MOTORPOOL_TLS")
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Run motorpool to the end, with no terminal.
    pub fn mp(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("run motorpool"))
    }

    /// [`Env::mp`], with the command's environment adjusted by `prepare`
    /// first (a cloud's test endpoint and credentials).
    pub fn mp_with(&self, args: &[&str], prepare: impl FnOnce(&mut Command)) -> Run {
        let mut cmd = self.command(args);
        prepare(&mut cmd);
        Run::from(cmd.output().expect("run motorpool"))
    }

    /// Start motorpool in the background; the returned guard kills it on drop.
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn motorpool");
        ChildGuard(Some(child))
    }

    /// `status --output json` nodes.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let run = self.mp(&["status", "--output", "json"]).expect_code(0);
        run.json()["nodes"].as_array().cloned().unwrap_or_default()
    }

    /// Pids of live processes whose command line mentions this home, or
    /// that run inside it (a job's task processes, started by an agent).
    pub fn processes(&self) -> Vec<i32> {
        let home = self.home().display().to_string();
        let mut pids = processes_mentioning(&home);
        for pid in processes_mentioning("") {
            let inside = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd.starts_with(self.home()));
            if inside && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// `destroy --yes`, then no process of this home is left (by pid).
    pub fn destroy_leaving_nothing(&self) {
        self.mp(&["destroy", "--yes"]).expect_code(0);
        let left = self.processes();
        assert!(left.is_empty(), "left running: {left:?}");
    }

    pub fn project_file(&self, project: &str, file: &str) -> PathBuf {
        self.home().join("projects").join(project).join(file)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.processes() {
            // SAFETY: sending a signal to a pid; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A background motorpool, killed on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn wait(mut self) -> Run {
        let child = self.0.take().expect("child present");
        Run::from(child.wait_with_output().expect("wait for motorpool"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Live (not zombie) processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && is_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// True while `pid` runs (a zombie counts as dead).
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Poll `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// `word<TAB>count` lines of every `part-*` file under `dir` (a job's
/// output); a word in two partitions, or no part file at all, is an error.
pub fn read_part_files(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("no output at {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no part files in {}", dir.display());
    for p in names {
        let text = std::fs::read_to_string(&p).expect("read part");
        for line in text.lines() {
            let (w, c) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("not key<TAB>value: {line:?}"));
            let c: u64 = c
                .parse()
                .unwrap_or_else(|_| panic!("not a count: {line:?}"));
            assert!(out.insert(w.to_string(), c).is_none(), "{w} appears twice");
        }
    }
    out
}

/// Panic unless `sh -n` accepts `script` (it parses; nothing is run).
pub fn assert_shell_parses(script: &str) {
    let file = tempfile::Builder::new()
        .prefix("mp-script-")
        .suffix(".sh")
        .tempfile()
        .expect("a temp file for the script");
    std::fs::write(file.path(), script).expect("write the script");
    let out = Command::new("sh")
        .arg("-n")
        .arg(file.path())
        .output()
        .expect("run sh -n");
    assert!(
        out.status.success(),
        "sh -n refuses the script:\n{}\n--- script\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}
