//! What the controller shows of itself: `/metrics` in the Prometheus text
//! exposition format (version 0.0.4) and `/healthz`, over plain HTTP/1.1 on
//! the address given (loopback by default).
//!
//! This module owns the figures and the tiny server that serves them; the
//! loop ([`super`]) feeds them. The server answers `GET` and `HEAD` of two
//! paths and nothing else: a request is read up to its blank line (at most
//! [`MAX_REQUEST`] bytes, within [`REQUEST_TIMEOUT`]) and the connection is
//! closed after the answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::plan::Action;
use crate::providers::CallStats;

/// The longest request head the server reads.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Passes missed before `/healthz` says the controller is stuck.
const HEALTHY_PASSES: u32 = 3;

/// One pool as the last pass observed it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolGauge {
    pub name: String,
    /// Live idle instances (ready or warming).
    pub idle: u32,
    /// Live cluster instances drawn from it.
    pub in_use: u32,
    pub min_idle: u32,
    pub max_capacity: u32,
}

#[derive(Default)]
struct Figures {
    pools: Vec<PoolGauge>,
    /// Cluster name -> live nodes.
    clusters: Vec<(String, u32)>,
    passes: u64,
    failed_passes: u64,
    lock_busy: u64,
    last_pass_seconds: f64,
    pass_seconds_sum: f64,
    pages_last_pass: u32,
    provider: CallStats,
    /// (action, done) -> changes.
    changes: BTreeMap<(&'static str, bool), u64>,
    last_pass_end: Option<Instant>,
    last_pass_ok: bool,
    /// Job -> scheduled runs started, and slots not started.
    runs_started: BTreeMap<String, u64>,
    runs_not_started: BTreeMap<String, u64>,
}

/// The controller's figures, shared by the loop and the server.
pub struct Metrics {
    project: String,
    interval: Duration,
    started: Instant,
    figures: Mutex<Figures>,
}

impl Metrics {
    pub fn new(project: &str, interval: Duration) -> Metrics {
        Metrics {
            project: project.to_string(),
            interval,
            started: Instant::now(),
            figures: Mutex::new(Figures::default()),
        }
    }

    fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a pass observed: its pools, its clusters' sizes, its list calls.
    pub fn observed(&self, (pools, clusters): (Vec<PoolGauge>, Vec<(String, u32)>), pages: u32) {
        let mut f = self.figures();
        f.pools = pools;
        f.clusters = clusters;
        f.pages_last_pass = pages;
    }

    pub fn pass_done(&self, took: Duration, ok: bool, provider: CallStats) {
        let mut f = self.figures();
        f.passes += 1;
        if !ok {
            f.failed_passes += 1;
        }
        f.last_pass_seconds = took.as_secs_f64();
        f.pass_seconds_sum += took.as_secs_f64();
        f.provider = provider;
        f.last_pass_end = Some(Instant::now());
        f.last_pass_ok = ok;
    }

    /// Count a scheduler event; returns its log line.
    pub fn schedule_event(&self, event: &super::schedules::ScheduleEvent) -> String {
        use super::schedules::ScheduleEvent;
        let mut f = self.figures();
        let (job, line) = match event {
            ScheduleEvent::Started { job, line } => {
                *f.runs_started.entry(job.clone()).or_default() += 1;
                (job, line)
            }
            ScheduleEvent::NotStarted { job, line } => {
                *f.runs_not_started.entry(job.clone()).or_default() += 1;
                (job, line)
            }
            ScheduleEvent::Ended { job, line } => (job, line),
        };
        format!("job.{job}: {line}")
    }

    pub fn lock_busy(&self) {
        self.figures().lock_busy += 1;
    }

    pub fn change_done(&self, action: Action, done: bool) {
        *self
            .figures()
            .changes
            .entry((action.as_str(), done))
            .or_default() += 1;
    }

    /// Healthy while passes keep finishing: the last one ended within
    /// [`HEALTHY_PASSES`] intervals (or, before the first, since the start).
    pub fn health(&self) -> Result<String, String> {
        let f = self.figures();
        let limit = self.interval * HEALTHY_PASSES + Duration::from_secs(60);
        let since = f.last_pass_end.unwrap_or(self.started).elapsed();
        if since > limit {
            return Err(format!(
                "no reconcile pass finished for {:.0}s (limit {:.0}s)\n",
                since.as_secs_f64(),
                limit.as_secs_f64()
            ));
        }
        Ok(format!(
            "ok: {} passes, the last {}\n",
            f.passes,
            if f.last_pass_ok {
                "succeeded"
            } else {
                "failed"
            }
        ))
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let f = self.figures();
        let project = escape(&self.project);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let labels = if labels.is_empty() {
                    format!("project=\"{project}\"")
                } else {
                    format!("project=\"{project}\",{labels}")
                };
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let per_pool = |get: &dyn Fn(&PoolGauge) -> u32| -> Vec<(String, f64)> {
            f.pools
                .iter()
                .map(|p| (format!("pool=\"{}\"", escape(&p.name)), f64::from(get(p))))
                .collect()
        };
        family(
            "motorpool_pool_idle_instances",
            "gauge",
            "Live idle instances of a pool (ready or warming up).",
            &per_pool(&|p| p.idle),
        );
        family(
            "motorpool_pool_in_use_instances",
            "gauge",
            "Live cluster instances drawn from a pool.",
            &per_pool(&|p| p.in_use),
        );
        family(
            "motorpool_pool_min_idle",
            "gauge",
            "A pool's min_idle in the spec.",
            &per_pool(&|p| p.min_idle),
        );
        family(
            "motorpool_pool_max_capacity",
            "gauge",
            "A pool's max_capacity in the spec.",
            &per_pool(&|p| p.max_capacity),
        );
        let clusters: Vec<(String, f64)> = f
            .clusters
            .iter()
            .map(|(name, n)| (format!("cluster=\"{}\"", escape(name)), f64::from(*n)))
            .collect();
        family(
            "motorpool_cluster_nodes",
            "gauge",
            "Live nodes of a cluster (driver and workers).",
            &clusters,
        );
        let one = |v: f64| vec![(String::new(), v)];
        family(
            "motorpool_reconcile_passes_total",
            "counter",
            "Reconcile passes run.",
            &one(f.passes as f64),
        );
        family(
            "motorpool_reconcile_failures_total",
            "counter",
            "Reconcile passes that ended in an error.",
            &one(f.failed_passes as f64),
        );
        family(
            "motorpool_reconcile_lock_busy_total",
            "counter",
            "Passes that had changes to make but found the project lock held.",
            &one(f.lock_busy as f64),
        );
        family(
            "motorpool_reconcile_duration_seconds",
            "gauge",
            "How long the last reconcile pass took.",
            &one(f.last_pass_seconds),
        );
        family(
            "motorpool_reconcile_duration_seconds_sum",
            "counter",
            "Seconds spent in reconcile passes.",
            &one(f.pass_seconds_sum),
        );
        family(
            "motorpool_reconcile_list_calls",
            "gauge",
            "List calls (pages) of the last pass's first observation.",
            &one(f64::from(f.pages_last_pass)),
        );
        family(
            "motorpool_provider_calls_total",
            "counter",
            "Provider requests sent, retries included.",
            &one(f.provider.calls as f64),
        );
        family(
            "motorpool_provider_list_calls_total",
            "counter",
            "Provider list calls (pages).",
            &one(f.provider.list_calls as f64),
        );
        family(
            "motorpool_provider_retries_total",
            "counter",
            "Provider requests sent again after a retryable error.",
            &one(f.provider.retries as f64),
        );
        let changes: Vec<(String, f64)> = f
            .changes
            .iter()
            .map(|((action, done), n)| {
                (
                    format!(
                        "action=\"{action}\",outcome=\"{}\"",
                        if *done { "done" } else { "failed" }
                    ),
                    *n as f64,
                )
            })
            .collect();
        family(
            "motorpool_changes_total",
            "counter",
            "Changes the controller applied, by action and outcome.",
            &changes,
        );
        let per_job = |counts: &BTreeMap<String, u64>| -> Vec<(String, f64)> {
            counts
                .iter()
                .map(|(job, n)| (format!("job=\"{}\"", escape(job)), *n as f64))
                .collect()
        };
        family(
            "motorpool_scheduled_runs_started_total",
            "counter",
            "Runs of scheduled jobs the controller started.",
            &per_job(&f.runs_started),
        );
        family(
            "motorpool_scheduled_runs_not_started_total",
            "counter",
            "Due slots of scheduled jobs not started (at max_concurrent_runs, or missed).",
            &per_job(&f.runs_not_started),
        );
        out
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serve `/metrics` and `/healthz` on `at`: the bound address (port 0 picks
/// one) and the task, which serves until aborted.
pub async fn serve(
    at: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(at).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics)).await;
            });
        }
    });
    Ok((bound, task))
}

/// Read one request head and answer it.
async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
                true,
            )
            .await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let body_wanted = method == "GET";
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD\n",
            true,
        )
        .await;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = metrics.render();
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                body_wanted,
            )
            .await
        }
        "/healthz" => match metrics.health() {
            Ok(text) => respond(&mut stream, "200 OK", "text/plain", &text, body_wanted).await,
            Err(text) => {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    &text,
                    body_wanted,
                )
                .await
            }
        },
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "/metrics or /healthz\n",
                body_wanted,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_carries_the_project_and_labels_are_escaped() {
        let m = Metrics::new("demo", Duration::from_secs(30));
        m.observed(
            (
                vec![PoolGauge {
                    name: "gen\"eral".into(),
                    idle: 2,
                    in_use: 3,
                    min_idle: 1,
                    max_capacity: 8,
                }],
                vec![("etl".into(), 4)],
            ),
            1,
        );
        m.change_done(Action::Update, true);
        m.pass_done(Duration::from_millis(250), true, CallStats::default());
        let text = m.render();
        assert!(
            text.contains("motorpool_pool_idle_instances{project=\"demo\",pool=\"gen\\\"eral\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("motorpool_cluster_nodes{project=\"demo\",cluster=\"etl\"} 4"),
            "{text}"
        );
        assert!(
            text.contains(
                "motorpool_changes_total{project=\"demo\",action=\"update\",outcome=\"done\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("motorpool_reconcile_passes_total{project=\"demo\"} 1"),
            "{text}"
        );
        // Every family is declared before its samples.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap_or("");
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
        assert!(m.health().is_ok());
    }
}
