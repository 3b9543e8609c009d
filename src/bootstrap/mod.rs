//! Cluster startup: the seven ordered steps of DESIGN.md, one code path for
//! every provider.
//!
//! 1. request — the plan's action for the cluster (recorded by apply)
//! 2. allocate — idle pool instances re-tagged, or new ones launched (apply's ops)
//! 3. os & runtime setup — the node's virtualenv and the motorpool runtime;
//!    pool instances do it ahead of time, which is why pools are fast
//! 4. formation — the driver starts on the driver node; executors register
//! 5. libraries — cluster libraries and init scripts, in order, on every node
//! 6. security & access — mounts (the cluster credential guards the driver
//!    and executors since formation)
//! 7. ready — the driver reports every executor registered
//!
//! This module owns what a cluster needs to start ([`BootSpec`], carried by
//! the plan), how each step becomes a script ([`steps`], from `templates/`),
//! and running the steps over the nodes' agents ([`run`]). It never decides
//! *whether* a cluster needs starting: the planner does.

pub mod cloud;
pub mod run;
pub mod steps;
pub mod template;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The seven steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Request,
    Allocate,
    Runtime,
    Formation,
    Libraries,
    Security,
    Ready,
}

pub const STEPS: [Step; 7] = [
    Step::Request,
    Step::Allocate,
    Step::Runtime,
    Step::Formation,
    Step::Libraries,
    Step::Security,
    Step::Ready,
];

impl Step {
    /// The name in tags (`motorpool-step`) and state files.
    pub fn name(self) -> &'static str {
        match self {
            Step::Request => "request",
            Step::Allocate => "allocate",
            Step::Runtime => "runtime",
            Step::Formation => "formation",
            Step::Libraries => "libraries",
            Step::Security => "security",
            Step::Ready => "ready",
        }
    }

    /// How status shows it.
    pub fn title(self) -> &'static str {
        match self {
            Step::Request => "request",
            Step::Allocate => "allocate",
            Step::Runtime => "os & runtime setup",
            Step::Formation => "formation",
            Step::Libraries => "libraries",
            Step::Security => "security & access",
            Step::Ready => "ready",
        }
    }

    pub fn parse(name: &str) -> Option<Step> {
        STEPS.into_iter().find(|s| s.name() == name)
    }
}

/// A file shipped to nodes with a step (an init script, a requirements file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedFile {
    pub name: String,
    pub content: String,
}

/// A mount, with its source resolved (an absolute local path, or a URL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Everything a pool's or a cluster's nodes need to start: plan data, so a
/// saved plan starts exactly what was reviewed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootSpec {
    pub runtime: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pip: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<NamedFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_scripts: Vec<NamedFile>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Clusters: stop after this many minutes without a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autotermination_minutes: Option<u32>,
    /// Clusters: how many executors must register before the cluster is ready.
    #[serde(default)]
    pub workers: u32,
    /// Most minutes one step may take on a node (None: the engine's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_minutes: Option<u32>,
}

impl BootSpec {
    /// A hash of what the nodes run (not how many there are): stored in the
    /// `motorpool-boot` tag, so a change of libraries, scripts, env or mounts
    /// shows in the plan.
    pub fn hash(&self) -> String {
        let mut copy = self.clone();
        copy.workers = 0;
        copy.autotermination_minutes = None;
        copy.startup_timeout_minutes = None;
        let text = serde_json::to_string(&copy).unwrap_or_default();
        steps::short_hash(&[&text])
    }
}
