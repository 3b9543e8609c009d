//! Apply's walk, against a provider that records what it was asked.

use std::collections::BTreeMap;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use motorpool_provider::{NodeType, Page, Provider};

use super::*;
use crate::observe::Observed;
use crate::plan::{PlanInput, PlanMode, build};
use crate::spec::{Cluster, Spec};

/// Counts calls in flight; fails launches of one chosen node type.
#[derive(Default)]
struct Recorder {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    launched: StdMutex<Vec<String>>,
    fail_type: Option<String>,
}

impl Recorder {
    async fn enter(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Provider for Recorder {
    fn kind(&self) -> &str {
        "recorder"
    }
    fn catalog(&self) -> &[NodeType] {
        &[]
    }
    fn default_image(&self) -> String {
        "img".into()
    }
    fn calls_per_second(&self) -> f64 {
        100_000.0
    }
    async fn list_page(&self, _: &TagFilter, _: Option<String>) -> Result<Page, ProviderError> {
        Ok(Page::default())
    }
    async fn describe(&self, _: &[String]) -> Result<Vec<Instance>, ProviderError> {
        Ok(Vec::new())
    }
    async fn launch(&self, r: &LaunchRequest) -> Result<Vec<Instance>, ProviderError> {
        self.enter().await;
        if self.fail_type.as_deref() == Some(r.node_type.as_str()) {
            return Err(ProviderError::Capacity(format!("no {} left", r.node_type)));
        }
        let mut launched = self.launched.lock().expect("lock");
        Ok((0..r.count)
            .map(|_| {
                launched.push(r.client_token.clone());
                Instance {
                    id: format!("i-{}", launched.len()),
                    node_type: r.node_type.clone(),
                    image: "img".into(),
                    state: InstanceState::Running,
                    tags: r.tags.clone(),
                    address: None,
                    pid: None,
                    ips: Default::default(),
                    launched_at: 0,
                }
            })
            .collect())
    }
    async fn terminate(&self, _: &[String]) -> Result<(), ProviderError> {
        self.enter().await;
        Ok(())
    }
    async fn stop(&self, _: &[String]) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn start(&self, _: &[String]) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn retag(&self, _: &[String], _: &Retag) -> Result<(), ProviderError> {
        Ok(())
    }
}

fn plan_for(clusters: &[(&str, &str, u32)]) -> Plan {
    let mut spec = Spec {
        project: "p".into(),
        provider: Default::default(),
        include: vec![],
        variables: BTreeMap::new(),
        targets: BTreeMap::new(),
        pools: BTreeMap::new(),
        policies: BTreeMap::new(),
        clusters: BTreeMap::new(),
        jobs: BTreeMap::new(),
    };
    for (name, node_type, workers) in clusters {
        spec.clusters.insert(
            name.to_string(),
            Cluster {
                node_type: Some(node_type.to_string()),
                workers: Some(*workers),
                ..Cluster::default()
            },
        );
    }
    let catalog = vec![
        NodeType::new("small", 1, 1.0, 0.0),
        NodeType::new("scarce", 1, 1.0, 0.0),
    ];
    build(&PlanInput {
        spec: &spec,
        observed: &Observed::default(),
        catalog: &catalog,
        default_image: "img",
        mode: PlanMode::Normal,
        now: 0,
        minute: std::time::Duration::from_secs(60),
        base_dir: std::path::Path::new("."),
        start: &Default::default(),
        nonce: "",
        secrets: &crate::secrets::SecretKey::derive(&crate::auth::Credential::new("test"), "p"),
        choices: &Default::default(),
    })
    .expect("plan")
}

async fn run(
    plan: &Plan,
    provider: Arc<Recorder>,
    parallelism: usize,
    max_batch: u32,
) -> ApplyReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = ApplyOptions {
        parallelism,
        progress: ProgressMode::Quiet,
        max_batch,
        ..ApplyOptions::default()
    };
    apply(
        plan,
        Arc::new(ProviderClient::new(
            provider,
            motorpool_provider::Capabilities {
                node_startup: motorpool_provider::NodeStartup::Simulated,
                user_data_limit: None,
                stop_start: true,
            },
        )),
        dir.path(),
        &journal::key(&crate::auth::Credential::new("secret"), "demo"),
        &options,
        None,
    )
    .await
    .expect("apply")
}

#[tokio::test]
async fn parallelism_bounds_the_provider_calls_in_flight() {
    let plan = plan_for(&[
        ("a", "small", 2),
        ("b", "small", 2),
        ("c", "small", 2),
        ("d", "small", 2),
    ]);
    let serial = Arc::new(Recorder::default());
    let report = run(&plan, serial.clone(), 1, 100).await;
    assert!(report.succeeded());
    assert_eq!(serial.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(serial.launched.lock().expect("lock").len(), 12);

    let wide = Arc::new(Recorder::default());
    run(&plan, wide.clone(), 16, 100).await;
    // 4 clusters x (driver launch + workers launch), all independent.
    assert_eq!(wide.max_in_flight.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn big_launches_are_split_into_batches_with_their_own_tokens() {
    let plan = plan_for(&[("big", "small", 250)]);
    let provider = Arc::new(Recorder::default());
    let report = run(&plan, provider.clone(), 16, 100).await;
    assert!(report.succeeded());
    let launched = provider.launched.lock().expect("lock").clone();
    assert_eq!(launched.len(), 251);
    let mut tokens = launched.clone();
    tokens.dedup();
    // The driver's launch and three worker batches (100, 100, 50).
    assert_eq!(tokens.len(), 4, "{tokens:?}");
}

#[tokio::test]
async fn one_failed_change_does_not_stop_the_independent_ones() {
    let plan = plan_for(&[
        ("fine", "small", 1),
        ("doomed", "scarce", 1),
        ("also-fine", "small", 1),
    ]);
    let provider = Arc::new(Recorder {
        fail_type: Some("scarce".into()),
        ..Recorder::default()
    });
    let report = run(&plan, provider.clone(), 4, 100).await;
    assert!(!report.succeeded());
    let failed: Vec<&str> = report.failures().map(|r| r.address.as_str()).collect();
    assert_eq!(failed, ["cluster.doomed"]);
    let done = report
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Done)
        .count();
    assert_eq!(done, 2);
    assert!(
        report
            .summary_line()
            .starts_with("Apply failed (1 of 3 changes did not finish)"),
        "{}",
        report.summary_line()
    );
    let error = match &report.failures().next().expect("a failure").outcome {
        Outcome::Failed { error } => error.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        error.contains("insufficient capacity: no scarce left"),
        "{error}"
    );
}

#[tokio::test]
async fn a_failed_change_skips_what_depends_on_it_and_nothing_else() {
    let mut plan = plan_for(&[
        ("doomed", "scarce", 1),
        ("child", "small", 1),
        ("grandchild", "small", 1),
        ("fine", "small", 1),
        ("after-fine", "small", 1),
    ]);
    let depends = [
        ("cluster.child", "cluster.doomed"),
        ("cluster.grandchild", "cluster.child"),
        ("cluster.after-fine", "cluster.fine"),
    ];
    for (change, on) in depends {
        let c = plan
            .changes
            .iter_mut()
            .find(|c| c.address == change)
            .expect("change in the plan");
        c.depends_on.push(on.to_string());
    }
    let provider = Arc::new(Recorder {
        fail_type: Some("scarce".into()),
        ..Recorder::default()
    });
    let report = run(&plan, provider.clone(), 4, 100).await;
    let outcome = |address: &str| {
        report
            .results
            .iter()
            .find(|r| r.address == address)
            .map(|r| r.outcome.clone())
            .expect("a result for every change")
    };
    assert!(matches!(outcome("cluster.doomed"), Outcome::Failed { .. }));
    assert_eq!(
        outcome("cluster.child"),
        Outcome::Skipped {
            because: "depends on cluster.doomed, which did not finish".into()
        }
    );
    assert_eq!(
        outcome("cluster.grandchild"),
        Outcome::Skipped {
            because: "depends on cluster.child, which did not finish".into()
        }
    );
    assert_eq!(outcome("cluster.fine"), Outcome::Done);
    assert_eq!(outcome("cluster.after-fine"), Outcome::Done);
    // Only the clusters that ran launched: fine and after-fine, 1+1 each.
    assert_eq!(provider.launched.lock().expect("lock").len(), 4);
}
