//! The planner's rules, on synthetic observed states.

use std::collections::BTreeMap;

use motorpool_provider::{Instance, InstanceState, NodeType, Tags, tags};

use super::*;
use crate::observe::{Observed, ResourceKind};
use crate::spec::{Autoscale, Cluster, Pool, Spec};

fn catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 2, 4.0, 0.05),
        NodeType::new("medium", 4, 16.0, 0.2),
    ]
}

fn spec() -> Spec {
    Spec {
        project: "p".into(),
        provider: Default::default(),
        include: vec![],
        variables: BTreeMap::new(),
        targets: BTreeMap::new(),
        pools: BTreeMap::new(),
        policies: BTreeMap::new(),
        clusters: BTreeMap::new(),
        jobs: BTreeMap::new(),
    }
}

fn pool(min_idle: u32, max_capacity: u32) -> Pool {
    Pool {
        node_type: Some("small".into()),
        resources: None,
        min_idle,
        max_capacity,
        idle_timeout_minutes: 15,
        warm: Default::default(),
        startup_timeout_minutes: None,
        preload: None,
    }
}

fn cluster_on(node_type: &str, workers: u32) -> Cluster {
    Cluster {
        node_type: Some(node_type.into()),
        workers: Some(workers),
        ..Cluster::default()
    }
}

fn cluster_from_pool(pool: &str, workers: u32) -> Cluster {
    Cluster {
        pool: Some(pool.into()),
        workers: Some(workers),
        ..Cluster::default()
    }
}

fn plan(spec: &Spec, observed: Vec<Instance>, mode: PlanMode) -> Plan {
    plan_at(spec, observed, mode, 1_000_000)
}

fn plan_at(spec: &Spec, observed: Vec<Instance>, mode: PlanMode, now: u64) -> Plan {
    plan_with(spec, observed, mode, now, MINUTE, &Default::default())
}

const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

/// A plan as the controller makes it: with a minute of its own and its choices.
fn plan_with(
    spec: &Spec,
    observed: Vec<Instance>,
    mode: PlanMode,
    now: u64,
    minute: std::time::Duration,
    choices: &ControllerChoices,
) -> Plan {
    let observed = Observed::from_instances(&spec.project, observed);
    let catalog = catalog();
    build(&PlanInput {
        spec,
        observed: &observed,
        catalog: &catalog,
        default_image: "img-1",
        mode,
        now,
        minute,
        base_dir: std::path::Path::new("."),
        start: &Default::default(),
        nonce: "",
        secrets: &crate::secrets::SecretKey::derive(&crate::auth::Credential::new("test"), "p"),
        choices,
    })
    .expect("plan builds")
}

fn change<'a>(plan: &'a Plan, address: &str) -> &'a Change {
    plan.changes
        .iter()
        .find(|c| c.address == address)
        .unwrap_or_else(|| panic!("no change for {address} in {plan:#?}"))
}

/// Pretend apply ran: turn a plan's ops into the instances they leave.
fn simulate(plan: &Plan, mut world: Vec<Instance>, now: u64) -> Vec<Instance> {
    let mut next = world.len();
    for c in &plan.changes {
        for op in &c.ops {
            match op {
                Op::Bootstrap { spec } => {
                    for i in world.iter_mut().filter(|i| {
                        i.tag(tags::NAME) == Some(c.name.as_str())
                            && i.tag(tags::KIND) == Some("cluster")
                    }) {
                        i.tags.insert(tags::STEP.into(), "ready".into());
                        i.tags.insert(tags::BOOT.into(), spec.hash());
                    }
                }
                Op::Launch {
                    count,
                    node_type,
                    tags: t,
                    then_stop,
                    warm,
                    ..
                } => {
                    let mut t = t.clone();
                    if warm.is_some() {
                        // Pool instances warm themselves once they start.
                        t.insert(tags::STEP.into(), "runtime".into());
                    }
                    let t = &t;
                    for _ in 0..*count {
                        next += 1;
                        world.push(Instance {
                            id: format!("i-{next:04}"),
                            node_type: node_type.clone(),
                            image: "img-1".into(),
                            state: if *then_stop {
                                InstanceState::Stopped
                            } else {
                                InstanceState::Running
                            },
                            tags: stamp(t, now),
                            address: None,
                            pid: None,
                            ips: Default::default(),
                            launched_at: now,
                        });
                    }
                }
                Op::Retag { ids, set, remove } => {
                    for i in world.iter_mut().filter(|i| ids.contains(&i.id)) {
                        i.tags.extend(stamp(set, now));
                        for k in remove {
                            i.tags.remove(k);
                        }
                    }
                }
                Op::Terminate { ids } => world.retain(|i| !ids.contains(&i.id)),
                Op::Start { ids } => {
                    for i in world.iter_mut().filter(|i| ids.contains(&i.id)) {
                        i.state = InstanceState::Running;
                    }
                }
                Op::Stop { ids } => {
                    for i in world.iter_mut().filter(|i| ids.contains(&i.id)) {
                        i.state = InstanceState::Stopped;
                    }
                }
            }
        }
    }
    world
}

fn stamp(t: &Tags, now: u64) -> Tags {
    t.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if v == APPLY_TIME {
                    now.to_string()
                } else {
                    v.clone()
                },
            )
        })
        .collect()
}

fn count(world: &[Instance], kind: &str, name: &str, role: &str) -> usize {
    world
        .iter()
        .filter(|i| {
            i.tag(tags::KIND) == Some(kind)
                && i.tag(tags::NAME) == Some(name)
                && i.tag(tags::ROLE) == Some(role)
        })
        .count()
}

/// What `motorpool run` does once its job cluster is up: mark the cluster's
/// instances as the run of `job`, outlived at `expires`.
fn mark_as_run(world: &mut [Instance], cluster: &str, job: &str, expires: u64) {
    for i in world
        .iter_mut()
        .filter(|i| i.tag(tags::NAME) == Some(cluster))
    {
        i.tags.insert(tags::JOB.into(), job.into());
        i.tags.insert(tags::EXPIRES.into(), expires.to_string());
    }
}

/// Apply plans until nothing changes; panics if that takes more than 3 rounds.
fn converge(spec: &Spec, mut world: Vec<Instance>, now: u64) -> Vec<Instance> {
    for _ in 0..3 {
        let p = plan_at(spec, world.clone(), PlanMode::Normal, now);
        if !p.has_changes() {
            return world;
        }
        world = simulate(&p, world, now);
    }
    let p = plan_at(spec, world.clone(), PlanMode::Normal, now);
    assert!(!p.has_changes(), "did not converge: {}", render::text(&p));
    world
}

#[test]
fn a_new_cluster_launches_a_driver_and_its_workers_and_then_nothing_changes() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 3));
    let p = plan(&s, vec![], PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Create);
    assert_eq!(c.reasons, ["new in spec"]);
    assert_eq!(p.summary.create, 1);
    let world = simulate(&p, vec![], 1);
    assert_eq!(count(&world, "cluster", "etl", "driver"), 1);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 3);
    assert!(world.iter().all(|i| i.tag(tags::PROJECT) == Some("p")));
    assert!(!plan(&s, world, PlanMode::Normal).has_changes());
}

#[test]
fn a_pool_fills_to_min_idle_and_clusters_take_from_it_before_launching() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(2, 10));
    let world = converge(&s, vec![], 10);
    assert_eq!(count(&world, "pool", "general", "idle"), 2);

    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 3));
    let p = plan_at(&s, world.clone(), PlanMode::Normal, 20);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Create);
    // Two idle instances are re-tagged, two more are launched (1 driver + 3 workers = 4).
    let retagged: usize = c
        .ops
        .iter()
        .map(|o| {
            if let Op::Retag { ids, .. } = o {
                ids.len()
            } else {
                0
            }
        })
        .sum();
    let launched: u32 = c
        .ops
        .iter()
        .map(|o| {
            if let Op::Launch { count, .. } = o {
                *count
            } else {
                0
            }
        })
        .sum();
    assert_eq!((retagged, launched), (2, 2));
    // The pool refills to min_idle.
    let pool_change = change(&p, "pool.general");
    assert_eq!(pool_change.action, Action::Update);
    let world = simulate(&p, world, 20);
    assert_eq!(count(&world, "pool", "general", "idle"), 2);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 3);
    assert!(!plan_at(&s, world, PlanMode::Normal, 20).has_changes());
}

#[test]
fn a_pool_never_exceeds_max_capacity() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(3, 5));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 3));
    let world = converge(&s, vec![], 10);
    // 4 in use, so only 1 may idle although min_idle is 3.
    assert_eq!(count(&world, "pool", "general", "idle"), 1);
    assert_eq!(world.len(), 5);

    s.clusters
        .insert("more".into(), cluster_from_pool("general", 4));
    let observed = Observed::from_instances("p", world);
    let catalog = catalog();
    let err = build(&PlanInput {
        spec: &s,
        observed: &observed,
        catalog: &catalog,
        default_image: "img-1",
        mode: PlanMode::Normal,
        now: 10,
        minute: std::time::Duration::from_secs(60),
        base_dir: std::path::Path::new("."),
        start: &Default::default(),
        nonce: "",
        secrets: &crate::secrets::SecretKey::derive(&crate::auth::Credential::new("test"), "p"),
        choices: &Default::default(),
    })
    .expect_err("over capacity");
    assert!(err.to_string().contains("max_capacity 5"), "{err}");
}

#[test]
fn a_deleted_cluster_gives_its_instances_back_to_its_pool() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 2));
    let t0 = 1_000;
    let world = converge(&s, vec![], t0);
    s.clusters.clear();
    let p = plan_at(&s, world.clone(), PlanMode::Normal, t0);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Delete);
    assert!(
        c.reasons
            .iter()
            .any(|r| r.contains("returns 3 instances to pool `general`")),
        "{:?}",
        c.reasons
    );
    let world = simulate(&p, world, t0);
    assert_eq!(count(&world, "pool", "general", "idle"), 4);
    // Not yet timed out: kept warm.
    let kept = plan_at(&s, world.clone(), PlanMode::Normal, t0 + 14 * 60);
    assert!(!kept.has_changes(), "{}", render::text(&kept));
    // After idle_timeout_minutes, trimmed back to min_idle.
    let later = plan_at(&s, world.clone(), PlanMode::Normal, t0 + 15 * 60);
    let pc = change(&later, "pool.general");
    assert!(
        pc.reasons
            .iter()
            .any(|r| r.contains("3 instances above min_idle idle longer than 15 minutes")),
        "{:?}",
        pc.reasons
    );
    let world = simulate(&later, world, t0 + 15 * 60);
    assert_eq!(count(&world, "pool", "general", "idle"), 1);
}

#[test]
fn a_job_cluster_is_left_to_its_run_until_it_expires_and_then_goes_back_to_its_pool() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("wordcount-run-1".into(), cluster_from_pool("general", 2));
    let t0 = 1_000;
    let mut world = converge(&s, vec![], t0);
    mark_as_run(&mut world, "wordcount-run-1", "wordcount", t0 + 600);
    s.clusters.clear();

    // While the run may go on, plan leaves the job cluster alone (no drift, no delete).
    let p = plan_at(&s, world.clone(), PlanMode::Normal, t0 + 60);
    let c = change(&p, "cluster.wordcount-run-1");
    assert_eq!(c.action, Action::NoOp, "{}", render::text(&p));
    assert!(
        c.reasons[0].contains("job cluster of a run of `wordcount`"),
        "{:?}",
        c.reasons
    );
    assert!(c.reasons[0].contains("9 minutes"), "{:?}", c.reasons);
    assert!(!p.has_changes(), "{}", render::text(&p));

    // Destroy removes it at once; after it expires, plan removes it too,
    // and its instances go back to the pool without the run's tags.
    let d = plan_at(&s, world.clone(), PlanMode::Destroy, t0 + 60);
    assert_eq!(change(&d, "cluster.wordcount-run-1").action, Action::Delete);
    let p = plan_at(&s, world.clone(), PlanMode::Normal, t0 + 601);
    assert_eq!(change(&p, "cluster.wordcount-run-1").action, Action::Delete);
    let world = simulate(&p, world, t0 + 601);
    assert_eq!(count(&world, "pool", "general", "idle"), 4);
    assert!(
        world
            .iter()
            .all(|i| i.tag(tags::JOB).is_none() && i.tag(tags::EXPIRES).is_none())
    );
}

#[test]
fn a_plan_narrowed_to_one_cluster_keeps_the_pool_it_draws_from() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 2));
    s.clusters.insert("other".into(), cluster_on("small", 1));
    let mut p = plan(&s, vec![], PlanMode::Normal);
    assert_eq!(p.summary.create, 3);
    p.retain_targets(&["cluster.etl".to_string()]);
    let addresses: Vec<&str> = p.changes.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(addresses.len(), 2, "{addresses:?}");
    assert!(addresses.contains(&"cluster.etl") && addresses.contains(&"pool.general"));
    assert_eq!(p.summary.create, 2);
}

#[test]
fn changing_a_node_type_replaces_the_cluster_and_names_the_field() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 2));
    let world = converge(&s, vec![], 1);
    s.clusters.insert("etl".into(), cluster_on("medium", 2));
    let p = plan(&s, world.clone(), PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Replace);
    assert!(
        c.reasons
            .iter()
            .any(|r| r == "node_type changed (small -> medium) and forces replace"),
        "{:?}",
        c.reasons
    );
    let world = simulate(&p, world, 2);
    assert!(world.iter().all(|i| i.node_type == "medium"));
    assert_eq!(world.len(), 3);
}

#[test]
fn scaling_workers_is_an_update_in_place() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 2));
    let world = converge(&s, vec![], 1);
    s.clusters.insert("etl".into(), cluster_on("small", 5));
    let p = plan(&s, world.clone(), PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Update);
    assert!(!c.drift);
    assert!(
        c.reasons.contains(&"workers 2 -> 5".to_string()),
        "{:?}",
        c.reasons
    );
    let world = simulate(&p, world, 2);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 5);
    s.clusters.insert("etl".into(), cluster_on("small", 1));
    let world = converge(&s, world, 3);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 1);
}

#[test]
fn a_dead_worker_is_drift_and_is_replaced_one_for_one() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 3));
    let mut world = converge(&s, vec![], 1);
    let victim = world
        .iter_mut()
        .find(|i| i.tag(tags::ROLE) == Some("worker"))
        .expect("a worker");
    victim.state = InstanceState::Terminated;
    let victim_id = victim.id.clone();
    let p = plan(&s, world.clone(), PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert_eq!(c.action, Action::Update);
    assert!(c.drift);
    assert!(
        c.reasons
            .iter()
            .any(|r| r == &format!("drift: worker {victim_id} gone (terminated)")),
        "{:?}",
        c.reasons
    );
    // Refresh-only sees the same drift.
    let r = plan(&s, world.clone(), PlanMode::RefreshOnly);
    assert!(change(&r, "cluster.etl").drift);
    let world = simulate(&p, world, 2);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 3);
    assert!(world.iter().all(|i| i.state == InstanceState::Running));
}

#[test]
fn a_vanished_worker_is_drift_by_the_size_tag() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 3));
    let mut world = converge(&s, vec![], 1);
    let pos = world
        .iter()
        .position(|i| i.tag(tags::ROLE) == Some("worker"))
        .expect("worker");
    world.remove(pos);
    let p = plan(&s, world, PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert!(c.drift);
    assert!(
        c.reasons.iter().any(|r| r == "drift: 1 worker missing"),
        "{:?}",
        c.reasons
    );
}

#[test]
fn refresh_only_ignores_spec_changes() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 2));
    let world = converge(&s, vec![], 1);
    s.clusters.insert("etl".into(), cluster_on("medium", 4));
    s.clusters.insert("new".into(), cluster_on("small", 1));
    let p = plan(&s, world, PlanMode::RefreshOnly);
    assert!(!p.has_changes(), "{}", render::text(&p));
}

#[test]
fn retyped_and_stopped_instances_are_drift() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 2));
    let mut world = converge(&s, vec![], 1);
    world[1].node_type = "medium".into();
    world[2].state = InstanceState::Stopped;
    let p = plan(&s, world.clone(), PlanMode::Normal);
    let c = change(&p, "cluster.etl");
    assert!(c.drift);
    assert!(
        c.reasons
            .iter()
            .any(|r| r.contains("retyped (small -> medium)")),
        "{:?}",
        c.reasons
    );
    assert!(
        c.reasons.iter().any(|r| r.contains("stopped")),
        "{:?}",
        c.reasons
    );
    let world = converge(&s, simulate(&p, world, 2), 2);
    assert_eq!(world.len(), 3);
    assert!(
        world
            .iter()
            .all(|i| i.node_type == "small" && i.state == InstanceState::Running)
    );
}

#[test]
fn an_instance_whose_kind_tag_was_removed_is_deleted_as_drift() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 1));
    let mut world = converge(&s, vec![], 1);
    world[0].tags.remove(tags::KIND);
    let p = plan(&s, world, PlanMode::Normal);
    let orphan = p
        .changes
        .iter()
        .find(|c| c.kind == ResourceKind::Instance)
        .expect("orphan change");
    assert_eq!(orphan.action, Action::Delete);
    assert!(orphan.drift);
    assert!(
        orphan.reasons[0].contains("motorpool-kind removed"),
        "{:?}",
        orphan.reasons
    );
}

#[test]
fn destroy_deletes_clusters_before_their_pools() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 2));
    let world = converge(&s, vec![], 1);
    let p = plan(&s, world.clone(), PlanMode::Destroy);
    assert_eq!(p.summary.delete, 2);
    assert_eq!(change(&p, "pool.general").depends_on, ["cluster.etl"]);
    let world = simulate(&p, world, 2);
    assert!(world.is_empty(), "{world:#?}");
}

#[test]
fn new_pools_come_before_the_clusters_that_draw_from_them() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 2));
    let p = plan(&s, vec![], PlanMode::Normal);
    assert_eq!(change(&p, "cluster.etl").depends_on, ["pool.general"]);
}

#[test]
fn client_tokens_are_the_same_for_the_same_plan_and_differ_between_ops() {
    let mut s = spec();
    s.clusters.insert("a".into(), cluster_on("small", 2));
    s.clusters.insert("b".into(), cluster_on("small", 2));
    let tokens = |p: &Plan| -> Vec<String> {
        p.changes
            .iter()
            .flat_map(|c| &c.ops)
            .filter_map(|o| {
                if let Op::Launch { token, .. } = o {
                    Some(token.clone())
                } else {
                    None
                }
            })
            .collect()
    };
    let first = tokens(&plan(&s, vec![], PlanMode::Normal));
    let second = tokens(&plan(&s, vec![], PlanMode::Normal));
    assert_eq!(first, second);
    let mut unique = first.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), first.len());
    assert!(first.iter().all(|t| t.len() <= 64));
}

#[test]
fn autoscale_starts_at_its_minimum_and_keeps_a_size_within_bounds() {
    let mut s = spec();
    s.clusters.insert(
        "etl".into(),
        Cluster {
            node_type: Some("small".into()),
            autoscale: Some(Autoscale {
                min: 2,
                max: 8,
                idle_timeout_minutes: None,
            }),
            ..Cluster::default()
        },
    );
    let world = converge(&s, vec![], 1);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 2);
}

#[test]
fn json_output_has_the_documented_shape() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 1));
    let p = plan(&s, vec![], PlanMode::Normal);
    let v: serde_json::Value = serde_json::from_str(&render::json(&p)).expect("json");
    assert_eq!(v["format_version"], "1");
    assert_eq!(v["project"], "p");
    assert_eq!(v["changes"][0]["address"], "cluster.etl");
    assert_eq!(v["changes"][0]["kind"], "cluster");
    assert_eq!(v["changes"][0]["name"], "etl");
    assert_eq!(v["changes"][0]["action"], "create");
    assert_eq!(v["changes"][0]["drift"], false);
    assert_eq!(v["summary"]["create"], 1);
    let text = render::text(&p);
    assert!(text.contains("+ cluster.etl (create)"), "{text}");
    assert!(
        text.contains("Plan: 1 to create, 0 to update, 0 to replace, 0 to delete."),
        "{text}"
    );
    let md = render::markdown(&p);
    assert!(md.contains("| `+` | `cluster.etl` | create |"), "{md}");
}

#[test]
fn plans_over_a_thousand_clusters_stay_linear() {
    // A correctness check at scale (timing lives in bench/): 1,000 clusters converge.
    let mut s = spec();
    for i in 0..1000 {
        s.clusters
            .insert(format!("c{i:04}"), cluster_on("small", 9));
    }
    let world = converge(&s, vec![], 1);
    assert_eq!(world.len(), 10_000);
}

const MAINTAIN: PlanMode = PlanMode::Maintain { heal: false };

#[test]
fn maintain_refills_a_drawn_pool_and_trims_it_after_the_timeout_but_leaves_spec_changes_to_apply() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(2, 10));
    s.clusters
        .insert("etl".into(), cluster_from_pool("general", 2));
    let t0 = 1_000;
    let world = converge(&s, vec![], t0);
    assert_eq!(count(&world, "pool", "general", "idle"), 2);

    // A cluster new in the spec, a pool new in the spec and a pool whose
    // node type changed are apply's: the controller's plan leaves them.
    let mut changed = s.clone();
    changed
        .clusters
        .insert("fresh".into(), cluster_on("small", 1));
    changed.pools.insert("spare".into(), pool(1, 2));
    let p = plan_at(&changed, world.clone(), MAINTAIN, t0);
    assert!(!p.has_changes(), "{}", render::text(&p));
    let mut retyped = s.clone();
    if let Some(p) = retyped.pools.get_mut("general") {
        p.node_type = Some("medium".into());
    }
    let p = plan_at(&retyped, world.clone(), MAINTAIN, t0);
    assert!(!p.has_changes(), "{}", render::text(&p));

    // An idle instance taken away (by a job cluster, or reclaimed): refilled.
    let mut drawn = world.clone();
    let taken = drawn
        .iter()
        .position(|i| i.tag(tags::KIND) == Some("pool"))
        .expect("an idle instance");
    drawn.remove(taken);
    let p = plan_at(&s, drawn.clone(), MAINTAIN, t0 + 10);
    let pc = change(&p, "pool.general");
    assert!(
        pc.reasons.iter().any(|r| r.contains("idle 1 -> 2")),
        "{}",
        render::text(&p)
    );
    assert_eq!(
        p.changes
            .iter()
            .filter(|c| c.action != Action::NoOp)
            .count(),
        1
    );
    let refilled = simulate(&p, drawn, t0 + 10);
    assert_eq!(count(&refilled, "pool", "general", "idle"), 2);

    // At min_idle, with the cluster as the spec says: nothing to do.
    let p = plan_at(&s, world, MAINTAIN, t0);
    assert!(!p.has_changes(), "{}", render::text(&p));
}

#[test]
fn maintain_trims_with_the_spec_minute_and_removes_only_outlived_job_clusters() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(1, 10));
    s.clusters
        .insert("wordcount-run-1".into(), cluster_from_pool("general", 2));
    s.clusters
        .insert("kept".into(), cluster_from_pool("general", 1));
    let t0 = 1_000;
    let mut world = converge(&s, vec![], t0);
    mark_as_run(&mut world, "wordcount-run-1", "wordcount", t0 + 600);
    s.clusters.remove("wordcount-run-1");
    s.clusters.remove("kept");

    // `kept` left the spec: deleting it is apply's. The job cluster's run may go on.
    let p = plan_at(&s, world.clone(), MAINTAIN, t0 + 60);
    assert!(!p.has_changes(), "{}", render::text(&p));

    // Outlived: removed, its instances back in the pool.
    let p = plan_at(&s, world.clone(), MAINTAIN, t0 + 601);
    let c = change(&p, "cluster.wordcount-run-1");
    assert_eq!(c.action, Action::Delete, "{}", render::text(&p));
    assert!(
        c.reasons.iter().any(|r| r.contains("outlived its run")),
        "{:?}",
        c.reasons
    );
    assert_eq!(change(&p, "cluster.kept").action, Action::NoOp);
    let world = simulate(&p, world, t0 + 601);
    assert_eq!(count(&world, "pool", "general", "idle"), 4);

    // With a minute of one second, the 15-minute idle timeout is 15 s.
    let at = |now: u64| {
        plan_with(
            &s,
            world.clone(),
            MAINTAIN,
            now,
            std::time::Duration::from_secs(1),
            &Default::default(),
        )
    };
    // The instance idle since t0 timed out long ago; the three given back at
    // t0 + 601 time out 15 s later.
    let early = at(t0 + 601 + 14);
    assert!(
        change(&early, "pool.general")
            .reasons
            .iter()
            .any(|r| r.contains("1 instance above min_idle idle longer than 15 minutes")),
        "{}",
        render::text(&early)
    );
    let p = at(t0 + 601 + 15);
    let pc = change(&p, "pool.general");
    assert!(
        pc.reasons
            .iter()
            .any(|r| r.contains("3 instances above min_idle idle longer than 15 minutes")),
        "{}",
        render::text(&p)
    );
}

#[test]
fn maintain_heals_drift_only_when_asked() {
    let mut s = spec();
    s.clusters.insert("etl".into(), cluster_on("small", 2));
    let t0 = 1_000;
    let mut world = converge(&s, vec![], t0);
    let worker = world
        .iter()
        .position(|i| i.tag(tags::ROLE) == Some("worker"))
        .expect("a worker");
    world[worker].state = InstanceState::Terminated;
    let p = plan_at(&s, world.clone(), MAINTAIN, t0);
    assert!(!p.has_changes(), "{}", render::text(&p));
    let p = plan_at(&s, world.clone(), PlanMode::Maintain { heal: true }, t0);
    let c = change(&p, "cluster.etl");
    assert!(c.drift, "{}", render::text(&p));
    let world = simulate(&p, world, t0);
    assert_eq!(count(&world, "cluster", "etl", "worker"), 2);
}

#[test]
fn a_silent_idle_cluster_the_controller_chose_stops_as_autotermination_would() {
    let mut s = spec();
    s.pools.insert("general".into(), pool(0, 10));
    s.clusters.insert(
        "etl".into(),
        Cluster {
            pool: Some("general".into()),
            workers: Some(2),
            autotermination_minutes: Some(30),
            ..Cluster::default()
        },
    );
    let t0 = 1_000;
    let world = converge(&s, vec![], t0);
    let choices = ControllerChoices {
        stop_idle: ["etl".to_string()].into(),
        ..ControllerChoices::default()
    };
    let p = plan_with(
        &s,
        world.clone(),
        PlanMode::Maintain { heal: false },
        t0,
        MINUTE,
        &choices,
    );
    let c = change(&p, "cluster.etl");
    assert!(
        c.reasons
            .iter()
            .any(|r| r.contains("its driver's agent stopped answering")),
        "{}",
        render::text(&p)
    );
    let world = simulate(&p, world, t0);
    // The workers went back to the pool; the driver is stopped and marked.
    assert_eq!(count(&world, "pool", "general", "idle"), 2);
    let driver = world
        .iter()
        .find(|i| i.tag(tags::ROLE) == Some("driver"))
        .expect("the driver stays");
    assert_eq!(driver.state, InstanceState::Stopped);
    assert!(driver.tag(tags::AUTOTERMINATED).is_some());
    // From then on plan sees a cluster that stopped itself: not drift.
    let p = plan_at(&s, world, PlanMode::Normal, t0 + 1);
    assert!(!p.has_changes(), "{}", render::text(&p));
    assert!(
        change(&p, "cluster.etl").reasons[0].contains("stopped itself"),
        "{}",
        render::text(&p)
    );
}
