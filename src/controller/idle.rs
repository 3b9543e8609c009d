//! Clusters whose driver's agent stopped answering before it could
//! autoterminate: the controller stops them as that autotermination would
//! have (workers back to their pool or away, the driver marked and
//! stopped), once they idled `autotermination_minutes`.
//!
//! A driver that answers runs its own autotermination: the controller only
//! notes when it last ran a job. One that stops answering (its agent died,
//! or hangs, while its machine runs on and is paid for) is given two passes
//! of silence, then the time since it was last seen busy (or first seen at
//! all by this controller) decides. Providers whose nodes run no agent
//! (sim) are never asked.
//!
//! This module owns the decision; the plan (`ControllerChoices::stop_idle`)
//! carries it out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::drivers::DriverReport;
use crate::spec::Spec;

/// Passes in a row a driver must stay silent before its cluster may be stopped.
const SILENT_PASSES: u32 = 2;

#[derive(Debug)]
struct Seen {
    /// When its driver last reported a job running (or was first seen).
    last_busy: Instant,
    silent_passes: u32,
}

/// A cluster to stop, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleStop {
    pub cluster: String,
    pub why: String,
}

#[derive(Debug, Default)]
pub struct IdleWatch {
    clusters: BTreeMap<String, Seen>,
}

impl IdleWatch {
    /// Decide from what the drivers said (and did not): the clusters to stop.
    pub fn decide(
        &mut self,
        spec: &Spec,
        reports: &[DriverReport],
        minute: Duration,
        now: Instant,
    ) -> Vec<IdleStop> {
        let mut stops = Vec::new();
        let mut watched = Vec::new();
        for report in reports {
            let Some(minutes) = spec
                .clusters
                .get(&report.cluster)
                .and_then(|c| c.autotermination_minutes)
            else {
                continue;
            };
            watched.push(report.cluster.clone());
            let seen = self.clusters.entry(report.cluster.clone()).or_insert(Seen {
                last_busy: now,
                silent_passes: 0,
            });
            if let Some(status) = &report.status {
                seen.silent_passes = 0;
                if status.running_jobs > 0 {
                    seen.last_busy = now;
                }
                continue;
            }
            seen.silent_passes += 1;
            let idle = now.duration_since(seen.last_busy);
            if seen.silent_passes >= SILENT_PASSES && idle >= minute * minutes {
                stops.push(IdleStop {
                    cluster: report.cluster.clone(),
                    why: format!(
                        "its driver's agent has not answered for {} passes and no job ran for {:.0}s \
                         (autotermination_minutes {minutes})",
                        seen.silent_passes,
                        idle.as_secs_f64()
                    ),
                });
            }
        }
        self.clusters.retain(|name, _| watched.contains(name));
        stops
    }
}
