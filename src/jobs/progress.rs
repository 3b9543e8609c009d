//! How `motorpool run` shows a run: a bar per stage on a terminal
//! (indicatif, on stderr), plain lines otherwise (at most one a second, and
//! one when a stage ends), what running tasks print (live, on stderr, each
//! line under its task's name), and the report at the end.
//!
//! This module only renders; it decides nothing about the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::RunReport;
use crate::apply::ProgressMode;
use crate::runtime::{Progress, TaskOutcome};

/// Live progress of one run.
pub struct RunProgress {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    bars: BTreeMap<(String, String), ProgressBar>,
    /// Per stage: what the last plain line said (done count).
    said: BTreeMap<(String, String), u64>,
    last_line: Option<Instant>,
    /// Per task: output received after its last newline.
    partial: BTreeMap<String, String>,
}

impl RunProgress {
    pub fn new(mode: ProgressMode) -> RunProgress {
        RunProgress {
            mode,
            multi: (mode == ProgressMode::Bars)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: BTreeMap::new(),
            said: BTreeMap::new(),
            last_line: None,
            partial: BTreeMap::new(),
        }
    }

    pub fn update(&mut self, progress: &Progress) {
        if let Some((task, text)) = &progress.output {
            self.print_output(task, text);
            return;
        }
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Bars => self.draw_bars(progress),
            ProgressMode::Lines => self.print_lines(progress),
        }
    }

    fn draw_bars(&mut self, progress: &Progress) {
        let Some(multi) = &self.multi else { return };
        for s in &progress.stages {
            let key = (s.task.clone(), s.stage.clone());
            let bar = self.bars.entry(key).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(s.total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>24} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_prefix(format!("{} {}", s.task, s.stage));
                bar
            });
            bar.set_length(s.total);
            bar.set_position(s.done);
            let mut msg = format!("{} running", s.running);
            if s.failed_attempts > 0 {
                let _ = write!(msg, ", {} failed attempts", s.failed_attempts);
            }
            bar.set_message(msg);
            if s.total > 0 && s.done == s.total {
                bar.finish_with_message("done");
            }
        }
    }

    /// A running task's output, live on stderr, each line under its task's
    /// name (the report on stdout repeats it whole at the end).
    fn print_output(&mut self, task: &str, text: &str) {
        if self.mode == ProgressMode::Quiet {
            return;
        }
        let partial = self.partial.entry(task.to_string()).or_default();
        partial.push_str(text);
        let Some(end) = partial.rfind('\n') else {
            return;
        };
        let complete: String = partial.drain(..=end).collect();
        let lines: Vec<String> = complete.lines().map(|l| format!("[{task}] {l}")).collect();
        match &self.multi {
            Some(multi) => multi.suspend(|| lines.iter().for_each(|l| eprintln!("{l}"))),
            None => lines.iter().for_each(|l| eprintln!("{l}")),
        }
    }

    fn print_lines(&mut self, progress: &Progress) {
        let due = self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let mut lines = Vec::new();
        for s in &progress.stages {
            let key = (s.task.clone(), s.stage.clone());
            let before = self.said.get(&key).copied();
            let finished = s.total > 0 && s.done == s.total;
            let changed = before != Some(s.done);
            if changed && (due || (finished && before.is_some_and(|b| b < s.total))) {
                let mut line = format!(
                    "{} {}: {}/{} tasks done, {} running",
                    s.task, s.stage, s.done, s.total, s.running
                );
                if s.failed_attempts > 0 {
                    let _ = write!(line, ", {} failed attempts", s.failed_attempts);
                }
                lines.push(line);
                self.said.insert(key, s.done);
            }
        }
        if !lines.is_empty() {
            for l in lines {
                eprintln!("{l}");
            }
            self.last_line = Some(Instant::now());
        }
    }

    pub fn finish(&mut self) {
        for bar in self.bars.values() {
            bar.finish();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The text report of a run: the outcome, a line per task, then what the
/// job's command tasks printed (a job's result is often there).
pub fn render_report(report: &RunReport) -> String {
    let s = &report.summary;
    let mut out = format!(
        "job `{}` {} in {:.2}s on {} `{}` (run {})\n",
        s.job,
        if s.ok { "succeeded" } else { "FAILED" },
        s.duration_ms as f64 / 1000.0,
        if report.job_cluster {
            "job cluster"
        } else {
            "cluster"
        },
        report.cluster,
        s.run_id
    );
    if let Some(e) = &s.error {
        let _ = writeln!(out, "error: {e}");
    }
    for t in &s.tasks {
        let outcome = match t.outcome {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed => "FAILED",
            TaskOutcome::Cancelled => "cancelled",
            TaskOutcome::Skipped => "skipped",
        };
        let mut line = format!(
            "  {:<16} {:<10} {:<9} {:>6.2}s  {} attempt{}",
            t.name,
            t.kind,
            outcome,
            t.duration_ms as f64 / 1000.0,
            t.attempts,
            if t.attempts == 1 { "" } else { "s" }
        );
        if t.map_partitions > 0 {
            let _ = write!(
                line,
                ", {} map / {} reduce partitions, read {}, shuffled {}",
                t.map_partitions,
                t.reduce_partitions,
                bytes(t.input_bytes),
                bytes(t.shuffle_bytes)
            );
        }
        if let Some(o) = &t.output {
            let _ = write!(line, ", wrote {} file(s) to {o}", t.output_files);
        }
        let _ = writeln!(out, "{line}");
        if let Some(e) = &t.error {
            let _ = writeln!(out, "    error: {e}");
        }
        if let Some(tail) = &t.stderr_tail {
            let _ = writeln!(out, "    stderr (end):");
            for l in tail.lines() {
                let _ = writeln!(out, "      {l}");
            }
        }
    }
    for t in s
        .tasks
        .iter()
        .filter(|t| t.kind == "command" || t.kind == "spark")
    {
        if let Some(text) = report.command_output(&t.name).filter(|t| !t.is_empty()) {
            let _ = writeln!(out, "\noutput of task `{}`:", t.name);
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    let _ = writeln!(
        out,
        "\n`motorpool logs {}` shows every task's output (kept in {}).",
        s.job,
        report.record.display()
    );
    out
}
