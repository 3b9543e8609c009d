//! Scheduled jobs: the controller starts a run of each job whose
//! `schedule` came due, as `motorpool run` would (it is one: a child
//! process of the same binary, so the run takes the lock, makes and removes
//! its job cluster and records itself for `motorpool logs` exactly as a run
//! started by hand).
//!
//! At most once per slot: before a run starts, the slot is written to
//! `projects/<project>/schedules/<job>.json`, so neither a second pass nor a
//! controller started again after a kill starts it twice (a controller
//! killed between the write and the start misses that slot instead). A
//! controller that was down over several slots starts only the latest (and
//! says how many it skipped); a job seen for the first time, or whose
//! schedule changed, counts from now, never from the past.
//! `max_concurrent_runs` (1 when unset, as for a scheduler's runs anywhere)
//! counts the runs this controller started that are still going; a slot
//! that finds the job at its limit is skipped with a line in the log.
//!
//! This module owns the slot records and the child processes; when a
//! schedule is due is [`crate::schedule`]'s, and what a run does is `run`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::schedule::Cron;
use crate::spec::{Job, LoadOptions, LoadedSpec};

/// What this home remembers of a job's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SlotRecord {
    cron: String,
    timezone: String,
    /// Unix seconds of the last slot taken (started, or skipped at the limit).
    last_slot: i64,
}

/// A run this controller started that has not ended yet.
struct Started {
    slot: i64,
    child: Child,
}

/// Something a tick did, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleEvent {
    Started { job: String, line: String },
    NotStarted { job: String, line: String },
    Ended { job: String, line: String },
}

/// The scheduled jobs of one project.
pub struct Scheduler {
    /// `projects/<project>/schedules`.
    dir: PathBuf,
    /// How `motorpool run` is started: the program, the spec, target and vars.
    program: PathBuf,
    spec_path: PathBuf,
    load: LoadOptions,
    going: BTreeMap<String, Vec<Started>>,
}

impl Scheduler {
    pub fn new(project_dir: &Path, spec_path: &Path, load: &LoadOptions) -> Result<Scheduler> {
        Ok(Scheduler {
            dir: project_dir.join("schedules"),
            program: std::env::current_exe().context("cannot find the motorpool binary")?,
            spec_path: spec_path.to_path_buf(),
            load: load.clone(),
            going: BTreeMap::new(),
        })
    }

    /// Runs still going that this controller started.
    pub fn going(&self) -> usize {
        self.going.values().map(Vec::len).sum()
    }

    /// Reap ended runs, then start the runs that came due by `now` (unix seconds).
    pub fn tick(&mut self, loaded: &LoadedSpec, now: i64) -> Vec<ScheduleEvent> {
        let mut events = self.reap();
        for (name, job) in &loaded.spec.jobs {
            let Some(schedule) = &job.schedule else {
                continue;
            };
            // `validate` refused a bad expression or zone when the spec loaded.
            let (Ok(cron), Ok(zone)) = (
                Cron::parse(&schedule.cron),
                crate::schedule::zone(schedule.timezone()),
            ) else {
                continue;
            };
            let fresh = SlotRecord {
                cron: schedule.cron.clone(),
                timezone: schedule.timezone().to_string(),
                last_slot: now,
            };
            let record = match self.read(name) {
                Some(r) if r.cron == fresh.cron && r.timezone == fresh.timezone => r,
                _ => {
                    // New, or changed: count from now.
                    if let Err(e) = self.write(name, &fresh) {
                        events.push(not_started(name, format!("{e:#}")));
                    }
                    continue;
                }
            };
            let Some(mut slot) = cron
                .next_after(record.last_slot, &zone)
                .filter(|s| *s <= now)
            else {
                continue;
            };
            let mut missed = 0u32;
            while let Some(later) = cron.next_after(slot, &zone).filter(|s| *s <= now) {
                slot = later;
                missed += 1;
            }
            let taken = SlotRecord {
                last_slot: slot,
                ..record
            };
            if let Err(e) = self.write(name, &taken) {
                events.push(not_started(name, format!("{e:#}")));
                continue;
            }
            let slot_text = crate::apply::lock::utc_text(slot.max(0) as u64);
            if missed > 0 {
                events.push(not_started(
                    name,
                    format!(
                        "skipped {} missed while no controller ran",
                        crate::plan::plural(missed, "slot")
                    ),
                ));
            }
            events.push(self.start(name, job, slot, &slot_text));
        }
        events
    }

    fn start(&mut self, name: &str, job: &Job, slot: i64, slot_text: &str) -> ScheduleEvent {
        let limit = job.max_concurrent_runs.unwrap_or(1) as usize;
        let going = self.going.get(name).map_or(0, Vec::len);
        if going >= limit {
            return not_started(
                name,
                format!(
                    "the run due at {slot_text} was not started: {going} going (max_concurrent_runs {limit})"
                ),
            );
        }
        match self.spawn(name, slot) {
            Ok((child, log)) => {
                let line = format!(
                    "run due at {slot_text} started (pid {}, its output in {})",
                    child.id(),
                    log.display()
                );
                self.going
                    .entry(name.to_string())
                    .or_default()
                    .push(Started { slot, child });
                ScheduleEvent::Started {
                    job: name.to_string(),
                    line,
                }
            }
            Err(e) => not_started(
                name,
                format!("the run due at {slot_text} did not start: {e:#}"),
            ),
        }
    }

    /// `motorpool run PATH JOB` with the controller's target and vars, its
    /// output in `schedules/<job>/<slot>.log`.
    fn spawn(&self, name: &str, slot: i64) -> Result<(Child, PathBuf)> {
        let dir = self.dir.join(name);
        crate::home::ensure_dir(&dir)?;
        let log = dir.join(format!("{slot}.log"));
        let out = motorpool_provider::private_files::open(
            &log,
            std::fs::OpenOptions::new().create(true).append(true),
        )
        .with_context(|| format!("cannot write {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot write {}", log.display()))?;
        let mut command = Command::new(&self.program);
        command.arg("run").arg(&self.spec_path).arg(name);
        if let Some(target) = &self.load.target {
            command.arg("--target").arg(target);
        }
        for (k, v) in &self.load.vars {
            command.arg("--var").arg(format!("{k}={v}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        Ok((child, log))
    }

    fn reap(&mut self) -> Vec<ScheduleEvent> {
        let mut events = Vec::new();
        for (name, runs) in self.going.iter_mut() {
            runs.retain_mut(|run| match run.child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    events.push(ScheduleEvent::Ended {
                        job: name.clone(),
                        line: format!(
                            "run due at {} ended: {}",
                            crate::apply::lock::utc_text(run.slot.max(0) as u64),
                            if status.success() {
                                "succeeded".to_string()
                            } else {
                                format!("failed ({status}); `motorpool logs {name}` shows it")
                            }
                        ),
                    });
                    false
                }
                Err(_) => false,
            });
        }
        events
    }

    fn path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.json"))
    }

    fn read(&self, job: &str) -> Option<SlotRecord> {
        let bytes = std::fs::read(self.path(job)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, job: &str, record: &SlotRecord) -> Result<()> {
        crate::home::ensure_dir(&self.dir)?;
        let path = self.path(job);
        crate::home::write_atomic(&path, &serde_json::to_vec_pretty(record)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn not_started(job: &str, line: String) -> ScheduleEvent {
    ScheduleEvent::NotStarted {
        job: job.to_string(),
        line,
    }
}
