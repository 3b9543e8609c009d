//! What a run reports: progress while it runs, a summary when it ends.
//! Both serialize to JSON (`motorpool run --output json`).

use serde::{Deserialize, Serialize};

use super::proto;

/// How one task of the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    /// Stopped because the job failed, timed out or was cancelled.
    Cancelled,
    /// Never started: a task it depends on did not succeed.
    Skipped,
}

/// One task of the job, after the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub name: String,
    /// `command`, `map` or `map_reduce`.
    pub kind: String,
    pub outcome: TaskOutcome,
    /// Attempts started, over all partitions (a command: its attempts).
    pub attempts: u32,
    /// Attempts that failed (each counts toward `retries`).
    pub failed_attempts: u32,
    /// Attempts that ran again because their executor was lost or their map
    /// output could not be read (these do not count toward `retries`).
    pub rerun_attempts: u32,
    /// retries + 1: the most attempts one partition (or the command) gets.
    pub max_attempts: u32,
    pub map_partitions: u32,
    pub reduce_partitions: u32,
    /// From the task's start to its end.
    pub duration_ms: u64,
    /// The sum of its attempts' run times.
    pub task_time_ms: u64,
    pub input_bytes: u64,
    /// Map output read by reducers.
    pub shuffle_bytes: u64,
    pub output_bytes: u64,
    pub records_in: u64,
    pub records_out: u64,
    /// A command task's last exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The task's `output`, relative to the job directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub output_files: u32,
    /// The failing attempt's stderr (its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// Why the task failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A whole run, after it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    /// The job's name.
    pub job: String,
    pub ok: bool,
    /// Why the run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at_unix_ms: u64,
    pub duration_ms: u64,
    /// Every task, in an order that respects `depends_on`.
    pub tasks: Vec<TaskSummary>,
}

impl RunSummary {
    pub fn task(&self, name: &str) -> Option<&TaskSummary> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// One stage's counts while a run goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    pub task: String,
    /// `command`, `map` or `reduce`.
    pub stage: String,
    pub total: u64,
    pub done: u64,
    pub running: u64,
    pub failed_attempts: u64,
}

/// A run's progress: every stage's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub run_id: String,
    pub elapsed_ms: u64,
    pub stages: Vec<StageProgress>,
    /// What a running command-like task just printed on stdout (its task
    /// and text), as it runs; None in a progress update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<(String, String)>,
}

impl Progress {
    /// Tasks done and total over all stages.
    pub fn totals(&self) -> (u64, u64) {
        self.stages
            .iter()
            .fold((0, 0), |(d, t), s| (d + s.done, t + s.total))
    }
}

impl From<proto::Progress> for Progress {
    fn from(p: proto::Progress) -> Progress {
        Progress {
            run_id: p.run_id,
            elapsed_ms: p.elapsed_ms,
            stages: p
                .stages
                .into_iter()
                .map(|s| StageProgress {
                    task: s.task,
                    stage: s.stage,
                    total: s.total,
                    done: s.done,
                    running: s.running,
                    failed_attempts: s.failed_attempts,
                })
                .collect(),
            output: None,
        }
    }
}

impl Progress {
    /// What a task printed, as a progress event of its run.
    pub fn output(run_id: &str, task: String, text: String) -> Progress {
        Progress {
            run_id: run_id.to_string(),
            elapsed_ms: 0,
            stages: Vec::new(),
            output: Some((task, text)),
        }
    }
}

impl From<&Progress> for proto::Progress {
    fn from(p: &Progress) -> proto::Progress {
        proto::Progress {
            run_id: p.run_id.clone(),
            elapsed_ms: p.elapsed_ms,
            stages: p
                .stages
                .iter()
                .map(|s| proto::StageProgress {
                    task: s.task.clone(),
                    stage: s.stage.clone(),
                    total: s.total,
                    done: s.done,
                    running: s.running,
                    failed_attempts: s.failed_attempts,
                })
                .collect(),
        }
    }
}
