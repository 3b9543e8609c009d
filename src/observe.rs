//! Observed state: what the provider reports now, grouped by tags into pools
//! and clusters.
//!
//! There is no state file: one paginated, tag-filtered list per provider is
//! the whole truth. This module owns that list and its grouping; it decides
//! nothing about what should change (that is the planner's job).

use std::collections::BTreeMap;

use motorpool_provider::{Instance, InstanceState, ProviderError, TagFilter, tags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::providers::ProviderClient;

/// The two kinds of resources a project's instances belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Pool,
    Cluster,
    /// An instance whose kind or name tag was removed: it belongs to nothing we can name.
    Instance,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Pool => "pool",
            ResourceKind::Cluster => "cluster",
            ResourceKind::Instance => "instance",
        }
    }

    pub fn address(self, name: &str) -> String {
        format!("{}.{name}", self.as_str())
    }
}

/// Every instance of one project, grouped by the resource it belongs to.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub project: String,
    /// (kind, name) -> its instances, sorted by id.
    pub resources: BTreeMap<(ResourceKind, String), Vec<Instance>>,
    /// Instances with the project tag but no kind or name tag.
    pub orphans: Vec<Instance>,
    /// List calls (pages) it took to observe.
    pub pages: u32,
}

impl Observed {
    /// Group a project's listed instances by their kind and name tags.
    pub fn from_instances(project: &str, mut instances: Vec<Instance>) -> Observed {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let mut observed = Observed {
            project: project.to_string(),
            ..Observed::default()
        };
        // In id order, instances of one resource mostly come in runs (one
        // launch's batch): a run goes into its resource's list at once, so
        // the map is searched, and a key made, once per run rather than once
        // per instance. Each list stays in id order.
        let mut run: Vec<Instance> = Vec::new();
        let mut run_key: Option<(ResourceKind, String)> = None;
        for inst in instances {
            let Some((kind, name)) = resource_of(&inst) else {
                observed.orphans.push(inst);
                continue;
            };
            let same = run_key
                .as_ref()
                .is_some_and(|(k, n)| *k == kind && n == name);
            if !same {
                let key = (kind, name.to_string());
                observed.add_run(run_key.replace(key), &mut run);
            }
            run.push(inst);
        }
        observed.add_run(run_key, &mut run);
        observed
    }

    /// Move `run` (instances of `key`, after any already there) into `resources`.
    fn add_run(&mut self, key: Option<(ResourceKind, String)>, run: &mut Vec<Instance>) {
        let Some(key) = key else { return };
        let members = self.resources.entry(key).or_default();
        if members.is_empty() {
            *members = std::mem::take(run);
        } else {
            members.append(run);
        }
    }

    pub fn members(&self, kind: ResourceKind, name: &str) -> &[Instance] {
        self.resources
            .get(&(kind, name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn names(&self, kind: ResourceKind) -> impl Iterator<Item = &str> {
        self.resources
            .keys()
            .filter(move |(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.resources.values().flatten().chain(self.orphans.iter())
    }

    pub fn instance_count(&self) -> usize {
        self.instances().count()
    }

    /// A hash of everything a saved plan was built on: ids, liveness, type and
    /// the tags motorpool decides by. A booting instance that becomes running,
    /// or a step tag that moves on, does not change it; anything else does.
    pub fn fingerprint(&self) -> String {
        // The hash is over one row per instance, `id|liveness|type|tags`, in
        // the order of the rows' text. Where two ids differ within the shorter
        // one, that is the order of the ids; only when one id begins the
        // other are the rows' texts needed. So: sort references, and hash each
        // row as it is made rather than holding every row's text at once.
        let mut all: Vec<&Instance> = self.instances().collect();
        all.sort_unstable_by(|a, b| {
            let common = a.id.len().min(b.id.len());
            match a.id.as_bytes()[..common].cmp(&b.id.as_bytes()[..common]) {
                std::cmp::Ordering::Equal => fingerprint_row(a).cmp(&fingerprint_row(b)),
                order => order,
            }
        });
        let mut h = Sha256::new();
        let mut row = String::new();
        for i in all {
            row.clear();
            write_fingerprint_row(&mut row, i);
            h.update(row.as_bytes());
            h.update(b"\n");
        }
        hex(&h.finalize()[..16])
    }
}

/// The resource an instance's kind and name tags say it belongs to.
fn resource_of(inst: &Instance) -> Option<(ResourceKind, &str)> {
    let kind = match inst.tag(tags::KIND) {
        Some("pool") => ResourceKind::Pool,
        Some("cluster") => ResourceKind::Cluster,
        _ => return None,
    };
    match inst.tag(tags::NAME) {
        Some(name) if !name.is_empty() => Some((kind, name)),
        _ => None,
    }
}

/// One instance's row of [`Observed::fingerprint`].
fn fingerprint_row(i: &Instance) -> String {
    let mut row = String::new();
    write_fingerprint_row(&mut row, i);
    row
}

/// `id|liveness|type|k=v,k=v` (every tag but the step), appended to `row`.
fn write_fingerprint_row(row: &mut String, i: &Instance) {
    let liveness = match i.state {
        InstanceState::Pending | InstanceState::Running => "live",
        InstanceState::Stopping | InstanceState::Stopped => "stopped",
        InstanceState::Terminated => "gone",
    };
    for part in [i.id.as_str(), "|", liveness, "|", i.node_type.as_str(), "|"] {
        row.push_str(part);
    }
    let mut first = true;
    for (k, v) in i.tags.iter().filter(|(k, _)| k.as_str() != tags::STEP) {
        if !first {
            row.push(',');
        }
        first = false;
        row.push_str(k);
        row.push('=');
        row.push_str(v);
    }
}

/// List every instance of `project` (one paginated pass) and group them.
pub async fn observe(client: &ProviderClient, project: &str) -> Result<Observed, ProviderError> {
    let mut filter = TagFilter::new();
    filter.insert(tags::PROJECT.to_string(), project.to_string());
    let before = client.stats().list_calls;
    let instances = client.list_all(&filter).await?;
    let mut observed = Observed::from_instances(project, instances);
    observed.pages = (client.stats().list_calls - before) as u32;
    Ok(observed)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_provider::Tags;

    fn inst(id: &str, kind: &str, name: &str) -> Instance {
        let mut t = Tags::new();
        t.insert(tags::PROJECT.into(), "p".into());
        if !kind.is_empty() {
            t.insert(tags::KIND.into(), kind.into());
        }
        t.insert(tags::NAME.into(), name.into());
        Instance {
            id: id.into(),
            node_type: "small".into(),
            image: "img".into(),
            state: InstanceState::Running,
            tags: t,
            address: None,
            pid: None,
            ips: Default::default(),
            launched_at: 0,
        }
    }

    #[test]
    fn instances_group_by_kind_and_name_and_untagged_ones_are_orphans() {
        let obs = Observed::from_instances(
            "p",
            vec![
                inst("b", "cluster", "etl"),
                inst("a", "cluster", "etl"),
                inst("c", "pool", "general"),
                inst("d", "", "etl"),
            ],
        );
        let etl: Vec<&str> = obs
            .members(ResourceKind::Cluster, "etl")
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(etl, ["a", "b"]);
        assert_eq!(obs.members(ResourceKind::Pool, "general").len(), 1);
        assert_eq!(obs.orphans.len(), 1);
        assert_eq!(obs.instance_count(), 4);
    }

    #[test]
    fn interleaved_resources_group_as_one_instance_at_a_time_would() {
        // Runs of one resource broken up by others, orphans, and ids out of order.
        let names = ["a", "a", "b", "a", "", "b", "b", "a", "c", "a"];
        let mut all = Vec::new();
        for (n, name) in names.iter().enumerate() {
            for k in 0..3 {
                let kind = if k == 2 { "pool" } else { "cluster" };
                all.push(inst(&format!("i-{:02}", 97 - 3 * n - k), kind, name));
            }
        }
        let obs = Observed::from_instances("p", all.clone());
        let mut expected: BTreeMap<(ResourceKind, String), Vec<Instance>> = BTreeMap::new();
        let mut orphans = Vec::new();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        for i in all {
            match resource_of(&i) {
                Some((kind, name)) => expected
                    .entry((kind, name.to_string()))
                    .or_default()
                    .push(i),
                None => orphans.push(i),
            }
        }
        assert_eq!(obs.resources, expected);
        assert_eq!(obs.orphans, orphans);
    }

    #[test]
    fn fingerprint_hashes_the_rows_in_the_order_of_their_text() {
        let ids = [
            "i-12",
            "i-1",
            "i-1|x",
            "sim-00000002",
            "i-1|",
            "sim-00000001",
            "a",
        ];
        let observed = Observed::from_instances(
            "p",
            ids.iter()
                .enumerate()
                .map(|(n, id)| inst(id, if n % 2 == 0 { "cluster" } else { "pool" }, "x"))
                .collect(),
        );
        // The definition: every row's text, sorted, hashed line by line.
        let mut rows: Vec<String> = observed.instances().map(fingerprint_row).collect();
        rows.sort();
        let mut h = Sha256::new();
        for r in rows {
            h.update(r.as_bytes());
            h.update(b"\n");
        }
        assert_eq!(observed.fingerprint(), hex(&h.finalize()[..16]));
    }

    #[test]
    fn fingerprint_ignores_boot_progress_but_not_real_changes() {
        let a = Observed::from_instances("p", vec![inst("a", "cluster", "etl")]);
        let mut booting = inst("a", "cluster", "etl");
        booting.state = InstanceState::Pending;
        booting.tags.insert(tags::STEP.into(), "allocate".into());
        let b = Observed::from_instances("p", vec![booting]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut gone = inst("a", "cluster", "etl");
        gone.state = InstanceState::Terminated;
        let c = Observed::from_instances("p", vec![gone]);
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
