//! Command tasks: `sh -c COMMAND` (or an engine's command line, such as a
//! `spark:` task's `spark-submit`) on the driver node, in the run's job
//! directory, in a process group of its own, stdout and stderr kept as
//! `logs/<task>/attempt-N.{stdout,stderr}`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::runtime::{KillGroup, STDERR_TAIL};

/// How one attempt of a command ended.
#[derive(Debug, Clone)]
pub(crate) struct CommandResult {
    pub exit_code: Option<i32>,
    pub stderr_tail: String,
    /// The command could not run at all, or was killed.
    pub error: Option<String>,
    pub duration: Duration,
}

impl CommandResult {
    pub(crate) fn ok(&self) -> bool {
        self.error.is_none() && self.exit_code == Some(0)
    }
}

/// What a command attempt runs.
#[derive(Debug, Clone)]
pub(crate) enum Program {
    /// `sh -c COMMAND`.
    Shell(String),
    /// A program and its arguments, with no shell in between.
    Argv(Vec<String>),
}

impl Program {
    fn describe(&self) -> String {
        match self {
            Program::Shell(c) => format!("sh -c {c}"),
            Program::Argv(argv) => argv.first().cloned().unwrap_or_default(),
        }
    }
}

/// What a command attempt needs.
pub(crate) struct CommandRun {
    pub program: Program,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub log_dir: PathBuf,
    pub attempt: u32,
}

fn tail_of(path: &Path, max: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut prefix = "";
    if len > max as u64 {
        let _ = f.seek(SeekFrom::Start(len - max as u64));
        prefix = "...";
    }
    let mut bytes = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut bytes);
    format!("{prefix}{}", String::from_utf8_lossy(&bytes))
}

/// Runs one attempt; a message on `cancel` kills it.
pub(crate) async fn run(spec: CommandRun, cancel: oneshot::Receiver<()>) -> CommandResult {
    let started = Instant::now();
    let fail = |error: String| CommandResult {
        exit_code: None,
        stderr_tail: String::new(),
        error: Some(error),
        duration: started.elapsed(),
    };
    if let Err(e) = std::fs::create_dir_all(&spec.log_dir) {
        return fail(format!("cannot create {}: {e}", spec.log_dir.display()));
    }
    let out_path = spec
        .log_dir
        .join(format!("attempt-{}.stdout", spec.attempt));
    let err_path = spec
        .log_dir
        .join(format!("attempt-{}.stderr", spec.attempt));
    let (out, err) = match (
        std::fs::File::create(&out_path),
        std::fs::File::create(&err_path),
    ) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return fail(format!("cannot create the task's log files: {e}"));
        }
    };
    let mut cmd = match &spec.program {
        Program::Shell(command) => {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c").arg(command);
            cmd
        }
        Program::Argv(argv) => {
            let Some((program, args)) = argv.split_first() else {
                return fail("an empty command line".to_string());
            };
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            cmd
        }
    };
    cmd.current_dir(&spec.cwd)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start `{}`: {e}", spec.program.describe())),
    };
    let mut group = KillGroup::new(child.id());
    let (exit_code, error) = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => (Some(c), None),
                    (None, Some(sig)) => (None, Some(format!("killed by signal {sig}"))),
                    (None, None) => (None, Some("ended without an exit code".to_string())),
                }
            }
            Err(e) => (None, Some(format!("cannot wait for the command: {e}"))),
        },
        _ = cancel => {
            group.kill();
            let _ = child.wait().await;
            (None, Some("cancelled".to_string()))
        }
    };
    // Whatever the command left running in its group goes with it.
    group.kill();
    let stderr_tail = tail_of(&err_path, STDERR_TAIL);
    for p in [&out_path, &err_path] {
        if std::fs::metadata(p).map(|m| m.len() == 0).unwrap_or(false) {
            let _ = std::fs::remove_file(p);
        }
    }
    CommandResult {
        exit_code,
        stderr_tail,
        error,
        duration: started.elapsed(),
    }
}
