//! Apply's progress: bars on a terminal (indicatif), plain lines elsewhere
//! (CI logs, pipes), nothing when asked to be quiet.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How apply shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bars,
    Lines,
    Quiet,
}

pub struct Progress {
    mode: ProgressMode,
    bars: Option<(MultiProgress, ProgressBar)>,
}

impl Progress {
    pub fn new(mode: ProgressMode, total_ops: usize) -> Progress {
        let bars = (mode == ProgressMode::Bars).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(total_ops as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} operations {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            (multi, bar)
        });
        Progress { mode, bars }
    }

    /// A line of news, above the bar on a terminal.
    pub fn line(&self, text: &str) {
        match (&self.mode, &self.bars) {
            (ProgressMode::Quiet, _) => {}
            (_, Some((multi, _))) => {
                let _ = multi.println(text);
            }
            _ => eprintln!("{text}"),
        }
    }

    pub fn op_done(&self, address: &str, what: &str, took: Duration) {
        if let Some((_, bar)) = &self.bars {
            bar.inc(1);
            bar.set_message(address.to_string());
        }
        if self.mode == ProgressMode::Lines {
            eprintln!("{address}: {what} ({:.1}s)", took.as_secs_f64());
        }
    }

    pub fn finish(&self) {
        if let Some((_, bar)) = &self.bars {
            bar.finish_and_clear();
        }
    }
}
