//! One lifecycle that every provider whose nodes run nothing (sim, and the
//! test provider of `tests/seams.rs`) must pass, through the CLI as a user
//! runs it: plan -> apply -> plan clean -> an instance vanishes -> drift ->
//! heal -> a stale saved plan refused -> destroy.

use super::Env;

/// `provider` is the spec's provider block (a YAML flow mapping);
/// `vanish(id)` removes an instance behind motorpool's back, as someone
/// with the cloud's console would.
pub fn simulated_provider_lifecycle(
    env: &Env,
    project: &str,
    provider: &str,
    vanish: &dyn Fn(&str),
) {
    let spec = format!(
        "project: {project}\nprovider: {provider}\npools:\n  general: {{ node_type: small, min_idle: 2, max_capacity: 10 }}\n\
         clusters:\n  etl: {{ pool: general, workers: 2 }}\n  batch: {{ node_type: medium, workers: 1 }}\n"
    );
    env.spec(&spec);
    env.mp(&["validate"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(2);
    let applied = env.mp(&["apply", "--yes"]).expect_code(0);
    assert!(
        applied.stdout.contains("Apply complete: 3 created"),
        "{}",
        applied.stdout
    );
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    // 2 idle + etl's driver and 2 workers (3 drawn from the pool, refilled) + batch's 2.
    let nodes = env.nodes();
    assert_eq!(nodes.len(), 2 + 3 + 2, "{nodes:#?}");
    let role = |r: &str| nodes.iter().filter(|n| n["role"] == r).count();
    assert_eq!((role("idle"), role("driver"), role("worker")), (2, 2, 3));
    for n in &nodes {
        assert_eq!(n["state"], "running", "{n}");
    }

    // A worker vanishes: drift, named in the plan; apply heals it.
    let worker = nodes
        .iter()
        .find(|n| n["role"] == "worker" && n["resource"] == "cluster.etl")
        .expect("a worker of etl");
    let victim = worker["id"].as_str().expect("id").to_string();
    vanish(&victim);
    env.mp(&["plan", "--refresh-only", "--detailed-exitcode"])
        .expect_code(2);
    let drift = env
        .mp(&["plan", "--detailed-exitcode", "--output", "json"])
        .expect_code(2)
        .json();
    let etl = drift["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["address"] == "cluster.etl")
        .expect("cluster.etl in the plan")
        .clone();
    assert_eq!(etl["drift"], true, "{etl:#}");
    // A cloud that no longer lists a terminated instance shows it by the
    // size the last apply recorded; one that still does, by its id.
    let reasons = etl["reasons"].to_string();
    assert!(
        reasons.contains(&victim) || reasons.contains("1 worker missing"),
        "{etl:#}"
    );
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    let healed = env.nodes();
    assert_eq!(healed.len(), 2 + 3 + 2);
    assert!(healed.iter().all(|n| n["id"] != victim.as_str()));

    // A saved plan made before the world changed is refused.
    let plan_file = env.dir.path().join("saved.plan.json");
    let plan_path = plan_file.to_str().expect("utf-8 path");
    env.spec(&spec.replace("workers: 1", "workers: 2"));
    env.mp(&["plan", "--out", plan_path]).expect_code(0);
    let other = healed
        .iter()
        .find(|n| n["resource"] == "cluster.batch" && n["role"] == "worker")
        .expect("a worker of batch");
    vanish(other["id"].as_str().expect("id"));
    let stale = env.mp(&["apply", plan_path, "--yes"]).expect_code(1);
    assert!(stale.stderr.contains("stale"), "{}", stale.stderr);
    env.mp(&["apply", "--yes"]).expect_code(0);
    env.mp(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(env.nodes().len(), 2 + 3 + 3);

    env.mp(&["destroy", "--yes"]).expect_code(0);
    assert!(env.nodes().is_empty(), "{:#?}", env.nodes());
}
