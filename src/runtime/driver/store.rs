//! The driver's run history on disk: `runs/<run-id>/{job.json, summary.json, logs/}`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::runtime::{RunSummary, proto};
use crate::spec::Job;

/// What was submitted, kept as `runs/<run-id>/job.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub run_id: String,
    pub name: String,
    pub bundle_id: String,
    pub submitted_at_unix_ms: u64,
    pub env: BTreeMap<String, String>,
    pub job: Job,
}

/// Write `value` as JSON, atomically, readable by the driver's user only:
/// a run's record holds the job's `env`, which may hold secrets.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let bytes = serde_json::to_vec_pretty(value)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub(crate) fn read_job(run_dir: &Path) -> anyhow::Result<JobRecord> {
    let path = run_dir.join("job.json");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

pub(crate) fn read_summary(run_dir: &Path) -> Option<RunSummary> {
    let bytes = std::fs::read(run_dir.join("summary.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The log directory of a task.
pub(crate) fn task_log_dir(run_dir: &Path, task: &str) -> PathBuf {
    run_dir.join("logs").join(task)
}

/// Every run under `runs_dir`, newest first, optionally only those of job `name`.
pub(crate) fn list_runs(runs_dir: &Path, name: &str, limit: usize) -> Vec<proto::RunInfo> {
    let mut ids: Vec<String> = std::fs::read_dir(runs_dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with("run-"))
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = Vec::new();
    for id in ids {
        let dir = runs_dir.join(&id);
        let Ok(job) = read_job(&dir) else { continue };
        if !name.is_empty() && job.name != name {
            continue;
        }
        let info = match read_summary(&dir) {
            Some(s) => proto::RunInfo {
                run_id: id,
                name: job.name,
                state: if s.ok { "succeeded" } else { "failed" }.to_string(),
                started_at_unix_ms: s.started_at_unix_ms,
                duration_ms: s.duration_ms,
                error: s.error.unwrap_or_default(),
            },
            None => proto::RunInfo {
                run_id: id,
                name: job.name,
                state: "running".to_string(),
                started_at_unix_ms: job.submitted_at_unix_ms,
                duration_ms: 0,
                error: String::new(),
            },
        };
        out.push(info);
        if limit > 0 && out.len() >= limit {
            break;
        }
    }
    out
}

/// The tail of every log file of a run (of one task, when `task` is set).
pub(crate) fn read_logs(
    run_dir: &Path,
    task: &str,
    max: usize,
) -> anyhow::Result<Vec<proto::LogFile>> {
    let logs = run_dir.join("logs");
    let mut tasks: Vec<String> = match std::fs::read_dir(&logs) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", logs.display())),
    };
    tasks.sort();
    let mut out = Vec::new();
    for t in tasks {
        if !task.is_empty() && t != task {
            continue;
        }
        let dir = logs.join(&t);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let path = dir.join(&n);
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let truncated = len > max as u64;
            if truncated {
                f.seek(SeekFrom::Start(len - max as u64))?;
            }
            let mut bytes = Vec::new();
            f.take(max as u64).read_to_end(&mut bytes)?;
            out.push(proto::LogFile {
                task: t.clone(),
                name: n,
                text: String::from_utf8_lossy(&bytes).into_owned(),
                truncated,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn run_records_are_private_to_the_driver_user() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("job.json");
        super::write_json(&path, &serde_json::json!({ "env": { "TOKEN": "s3cret" } }))
            .expect("written");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert!(
            std::fs::read_to_string(&path)
                .expect("read")
                .contains("s3cret")
        );
    }
}
