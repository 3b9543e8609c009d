//! Plans: desired state (the spec) against observed state (the provider),
//! turned into data.
//!
//! A [`Plan`] is a list of [`Change`]s, one per pool, cluster or stray
//! instance, each with an [`Action`], the reasons for it, whether it heals
//! drift, the changes it must wait for, and the exact provider operations
//! ([`Op`]) that apply will run. Building ([`build`]), rendering
//! ([`render`]), saving ([`file`]) and applying (`crate::apply`) are separate
//! stages, as in Terraform's core. This module never calls a provider.

pub mod build;
pub mod file;
pub mod render;

use motorpool_provider::Tags;
use serde::{Deserialize, Serialize};

pub use build::{ControllerChoices, PlanError, PlanInput, PlanMode, build};

use crate::observe::ResourceKind;
use crate::spec::ProviderBlock;
use crate::words::BootSpec;

/// The version of the plan's JSON shape (`--output json` and saved plans).
pub const FORMAT_VERSION: &str = "1";

/// A tag value apply replaces with the current Unix time when it runs the op.
pub const APPLY_TIME: &str = "@apply-time";

/// What a change does to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
    NoOp,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::NoOp => "no-op",
        }
    }
}

pub use crate::words::Role;

/// One provider operation. Ops of a change run in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Launch `count` instances, tagged at birth. `token` makes it idempotent.
    Launch {
        role: Role,
        count: u32,
        node_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
        tags: Tags,
        token: String,
        /// Stop them once launched and warm (pools with `warm: stopped`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        then_stop: bool,
        /// Pool instances: what they set up on themselves when they start.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warm: Option<BootSpec>,
    },
    /// Run the cluster's startup steps (3-7) on all its nodes; steps a node
    /// already finished with the same content are skipped.
    Bootstrap {
        spec: BootSpec,
    },
    /// Move instances between pools and clusters, or mend their tags.
    Retag {
        ids: Vec<String>,
        set: Tags,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remove: Vec<String>,
    },
    Start {
        ids: Vec<String>,
    },
    Stop {
        ids: Vec<String>,
    },
    Terminate {
        ids: Vec<String>,
    },
}

impl Op {
    /// A short human description, for progress lines.
    pub fn describe(&self) -> String {
        fn n(ids: &[String]) -> String {
            plural(ids.len() as u32, "instance")
        }
        match self {
            Op::Launch {
                role,
                count,
                node_type,
                ..
            } => format!(
                "launch {} ({node_type}, {})",
                plural(*count, "instance"),
                role.as_str()
            ),
            Op::Retag { ids, .. } => format!("retag {}", n(ids)),
            Op::Start { ids } => format!("start {}", n(ids)),
            Op::Stop { ids } => format!("stop {}", n(ids)),
            Op::Terminate { ids } => format!("terminate {}", n(ids)),
            Op::Bootstrap { spec } => {
                format!("start up (steps 3-7, {})", plural(spec.workers, "executor"))
            }
        }
    }
}

pub use crate::words::plural;

/// One resource's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// `pool.NAME`, `cluster.NAME` or `instance.ID`.
    pub address: String,
    pub kind: ResourceKind,
    pub name: String,
    pub action: Action,
    pub reasons: Vec<String>,
    /// True when (part of) the change heals drift rather than follows the spec.
    pub drift: bool,
    /// Addresses of changes that must finish first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Instances the resource will have after apply.
    pub nodes_after: u32,
    /// What those instances cost per hour, in USD (0 on the local provider).
    pub hourly_cost_after: f64,
    pub ops: Vec<Op>,
}

/// Counts of changes by action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub create: u32,
    pub update: u32,
    pub replace: u32,
    pub delete: u32,
}

/// A whole plan: what apply will do, and what it was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: String,
    pub project: String,
    /// The provider block the plan was made against (apply connects to it).
    pub provider: ProviderBlock,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_only: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub destroy: bool,
    /// Unix seconds when the plan was made.
    pub created_at: u64,
    /// The observed state's fingerprint: apply refuses a saved plan when it moved.
    pub observed_fingerprint: String,
    /// Instances the provider reported.
    pub observed_instances: u32,
    /// List calls (pages) observing took.
    #[serde(default)]
    pub observed_pages: u32,
    pub changes: Vec<Change>,
    pub summary: Summary,
}

impl Summary {
    /// Count `changes` by action.
    pub fn of(changes: &[Change]) -> Summary {
        let mut summary = Summary::default();
        for c in changes {
            match c.action {
                Action::Create => summary.create += 1,
                Action::Update => summary.update += 1,
                Action::Replace => summary.replace += 1,
                Action::Delete => summary.delete += 1,
                Action::NoOp => {}
            }
        }
        summary
    }
}

impl Plan {
    /// Keep only the changes to `addresses` and those they depend on, as
    /// `motorpool run` does to bring up just the cluster its job needs.
    pub fn retain_targets(&mut self, addresses: &[String]) {
        let mut keep: std::collections::BTreeSet<String> = addresses.iter().cloned().collect();
        let mut frontier: Vec<String> = addresses.to_vec();
        while let Some(address) = frontier.pop() {
            if let Some(c) = self.changes.iter().find(|c| c.address == address) {
                for dep in &c.depends_on {
                    if keep.insert(dep.clone()) {
                        frontier.push(dep.clone());
                    }
                }
            }
        }
        self.retain(|c| keep.contains(&c.address));
    }

    /// Keep only the changes `keep` accepts; the summary follows.
    pub fn retain(&mut self, keep: impl Fn(&Change) -> bool) {
        self.changes.retain(keep);
        self.summary = Summary::of(&self.changes);
    }

    /// Changes that do something (everything but no-ops).
    pub fn actionable(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.action != Action::NoOp)
    }

    pub fn has_changes(&self) -> bool {
        self.actionable().next().is_some()
    }

    pub fn op_count(&self) -> usize {
        self.changes.iter().map(|c| c.ops.len()).sum()
    }
}

#[cfg(test)]
mod tests;
