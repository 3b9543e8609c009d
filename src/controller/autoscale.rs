//! Autoscaling on load: for each cluster of the spec with `autoscale: {
//! min, max }`, the worker count the controller asks the plan for, from
//! what the cluster's engine reports through its driver's agent
//! (`DriverStatus`, asked by [`super::drivers`]: tasks waiting for a slot,
//! tasks running, slots).
//!
//! The rules:
//! * **Grow** when tasks wait beyond the cluster's slots on two passes in a
//!   row (a single glimpse of a queue is a stage starting, not a backlog),
//!   and every worker asked for has registered: by as many workers as the
//!   waiting tasks fill at the slots a worker brings, up to `max`.
//! * **Shrink** to `min` once no task has run for the cluster's
//!   `idle_timeout_minutes` (default 10, in the spec's minutes).
//! * Otherwise keep the size it has. A cluster whose driver does not answer,
//!   or whose engine cannot tell its load, is left as it is.
//!
//! The plan then draws added workers from the cluster's pool first and gives
//! removed ones back to it, as any resize; the size chosen is recorded in
//! the cluster's `motorpool-size` tag, which `plan` keeps, so it is never
//! drift. What is remembered between passes (queues seen, idle since) lives
//! in this process only: a controller started again begins watching afresh,
//! which can only delay a change.
//!
//! This module owns the decision; it changes nothing itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::drivers::DriverReport;
use crate::agent::proto::DriverStatusResponse;
use crate::spec::{DEFAULT_SCALE_DOWN_MINUTES, Spec};

/// Passes in a row that must see tasks waiting before a cluster grows.
const QUEUED_PASSES_TO_GROW: u32 = 2;

/// What the controller remembers of one cluster between passes.
#[derive(Debug, Default)]
struct Watch {
    queued_passes: u32,
    idle_since: Option<Instant>,
}

/// A cluster's load as its driver told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub queued_tasks: u32,
    pub running_tasks: u32,
    pub slots: u32,
    /// Workers registered with the driver.
    pub registered: u32,
}

/// One decision, with why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resize {
    pub cluster: String,
    pub from: u32,
    pub to: u32,
    pub why: String,
}

#[derive(Debug, Default)]
pub struct Autoscaler {
    watches: BTreeMap<String, Watch>,
}

impl Autoscaler {
    /// Decide from what the drivers said: the sizes to plan with (every
    /// autoscaled cluster whose size changes).
    pub fn decide(
        &mut self,
        spec: &Spec,
        reports: &[DriverReport],
        minute: Duration,
        now: Instant,
    ) -> Vec<Resize> {
        let mut resizes = Vec::new();
        let mut seen = Vec::new();
        for report in reports {
            let Some(cluster) = spec.clusters.get(&report.cluster) else {
                continue;
            };
            let (Some(bounds), None) = (&cluster.autoscale, cluster.workers) else {
                continue;
            };
            let Some(load) = report.status.as_ref().and_then(load_of) else {
                continue;
            };
            seen.push(report.cluster.clone());
            let current = report.size.unwrap_or(bounds.min);
            let idle_for = minute
                * bounds
                    .idle_timeout_minutes
                    .unwrap_or(DEFAULT_SCALE_DOWN_MINUTES);
            let watch = self.watches.entry(report.cluster.clone()).or_default();
            if let Some(resize) = watch.next(
                &report.cluster,
                current,
                load,
                bounds.min,
                bounds.max,
                idle_for,
                now,
            ) {
                resizes.push(resize);
            }
        }
        self.watches.retain(|name, _| seen.contains(name));
        resizes
    }
}

impl Watch {
    #[allow(clippy::too_many_arguments)]
    fn next(
        &mut self,
        name: &str,
        current: u32,
        load: Load,
        min: u32,
        max: u32,
        idle_for: Duration,
        now: Instant,
    ) -> Option<Resize> {
        let resize = |to: u32, why: String| {
            (to != current).then(|| Resize {
                cluster: name.to_string(),
                from: current,
                to,
                why,
            })
        };
        if load.queued_tasks > 0 {
            self.idle_since = None;
            self.queued_passes += 1;
            let settled = load.registered >= current;
            if self.queued_passes < QUEUED_PASSES_TO_GROW || !settled || current >= max {
                return None;
            }
            self.queued_passes = 0;
            let per_worker = (load.slots / current.max(1)).max(1);
            let more = load.queued_tasks.div_ceil(per_worker);
            let to = current.saturating_add(more).min(max);
            return resize(
                to,
                format!(
                    "{} waiting beyond {}",
                    crate::plan::plural(load.queued_tasks, "task"),
                    crate::plan::plural(load.slots, "slot")
                ),
            );
        }
        self.queued_passes = 0;
        if load.running_tasks > 0 {
            self.idle_since = None;
            return None;
        }
        let since = *self.idle_since.get_or_insert(now);
        if current > min && now.duration_since(since) >= idle_for {
            self.idle_since = None;
            return resize(
                min,
                format!(
                    "no task ran for {:.0}s (idle_timeout_minutes)",
                    now.duration_since(since).as_secs_f64()
                ),
            );
        }
        None
    }
}

/// The load in a driver's answer, when its engine can tell.
fn load_of(status: &DriverStatusResponse) -> Option<Load> {
    status.load_known.then_some(Load {
        queued_tasks: status.queued_tasks,
        running_tasks: status.running_tasks,
        slots: status.slots,
        registered: status.executors.len() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: u32, running: u32, slots: u32, registered: u32) -> Load {
        Load {
            queued_tasks: queued,
            running_tasks: running,
            slots,
            registered,
        }
    }

    #[test]
    fn a_backlog_seen_twice_grows_by_the_workers_it_fills_within_max() {
        let mut w = Watch::default();
        let t = Instant::now();
        let idle = Duration::from_secs(60);
        // One worker of 2 slots, 5 tasks waiting: the first glimpse waits.
        assert_eq!(w.next("etl", 1, load(5, 2, 2, 1), 1, 4, idle, t), None);
        let grown = w
            .next("etl", 1, load(5, 2, 2, 1), 1, 4, idle, t)
            .expect("grows");
        assert_eq!((grown.from, grown.to), (1, 4)); // 1 + ceil(5 / 2), at most 4
        assert!(
            grown.why.contains("5 tasks waiting beyond 2 slots"),
            "{}",
            grown.why
        );
        // While the new workers have not registered, it does not grow again.
        assert_eq!(w.next("etl", 4, load(5, 2, 2, 1), 1, 8, idle, t), None);
        assert_eq!(w.next("etl", 4, load(5, 2, 2, 1), 1, 8, idle, t), None);
        // At max: stays.
        let mut w = Watch::default();
        assert_eq!(w.next("etl", 4, load(9, 8, 8, 4), 1, 4, idle, t), None);
        assert_eq!(w.next("etl", 4, load(9, 8, 8, 4), 1, 4, idle, t), None);
    }

    #[test]
    fn it_shrinks_to_min_only_after_idling_for_the_timeout() {
        let mut w = Watch::default();
        let t = Instant::now();
        let idle = Duration::from_secs(60);
        assert_eq!(w.next("etl", 3, load(0, 0, 6, 3), 1, 4, idle, t), None);
        assert_eq!(
            w.next(
                "etl",
                3,
                load(0, 0, 6, 3),
                1,
                4,
                idle,
                t + Duration::from_secs(59)
            ),
            None
        );
        // A task running resets the clock.
        assert_eq!(
            w.next(
                "etl",
                3,
                load(0, 1, 6, 3),
                1,
                4,
                idle,
                t + Duration::from_secs(59)
            ),
            None
        );
        let later = t + Duration::from_secs(100);
        assert_eq!(w.next("etl", 3, load(0, 0, 6, 3), 1, 4, idle, later), None);
        let shrunk = w
            .next("etl", 3, load(0, 0, 6, 3), 1, 4, idle, later + idle)
            .expect("shrinks");
        assert_eq!((shrunk.from, shrunk.to), (3, 1));
        // At min, idle: nothing to do.
        assert_eq!(
            w.next("etl", 1, load(0, 0, 2, 1), 1, 4, idle, later + idle * 3),
            None
        );
    }
}
