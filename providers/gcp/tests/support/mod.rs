//! Test support for the GCP provider: the fake Compute API (`fake_gce.py`,
//! Python's standard library only) started on 127.0.0.1 and killed on drop,
//! also when a test fails, and a plain HTTP client for its `/_fake/` controls.
//!
//! Shared by the crate's own tests and by the CLI tests (`tests/gcp.rs`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use motorpool_gcp::{GcpConfig, GcpProvider};

/// The project every test uses.
pub const PROJECT: &str = "motorpool-test";
/// The zones the fake knows that tests launch in (one region).
pub const ZONES: [&str; 3] = ["us-central1-a", "us-central1-b", "us-central1-c"];

/// Where the fake lives, from the workspace root or the crate's directory.
pub fn support_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        root.join("providers/gcp/tests/support"),
        root.join("tests/support"),
    ] {
        if dir.join("fake_gce.py").is_file() {
            return dir;
        }
    }
    panic!("fake_gce.py not found under {}", root.display());
}

/// One instance as the fake holds it (`GET /_fake/instances`).
#[derive(Debug, Clone)]
pub struct FakeInstance {
    pub zone: String,
    pub name: String,
    pub status: String,
    pub machine_type: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl FakeInstance {
    /// The provider's id of the instance.
    pub fn id(&self) -> String {
        format!("{}/{}", self.zone, self.name)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// The fake Compute API, on a loopback port of its own choosing.
pub struct FakeGce {
    child: Option<Child>,
    pub port: u16,
    log: Option<tempfile::NamedTempFile>,
}

impl FakeGce {
    /// Start a fresh fake (empty state), operations moving every 40 ms.
    pub fn start() -> FakeGce {
        let log = tempfile::Builder::new()
            .prefix("fake-gce-")
            .suffix(".log")
            .tempfile()
            .expect("a log file for the fake");
        let mut child = Command::new("python3")
            .arg(support_dir().join("fake_gce.py"))
            .args(["--host", "127.0.0.1", "--port", "0", "--stage-ms", "40"])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("fake log"))
            .spawn()
            .expect("start python3 fake_gce.py");
        let stdout = child.stdout.take().expect("the fake's stdout");
        let mut fake = FakeGce {
            child: Some(child),
            port: 0,
            log: Some(log),
        };
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        fake.port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the fake did not say where it listens ({line:?}):\n{}",
                    fake.log_text()
                )
            });
        fake
    }

    /// A handle on a fake another handle started (it stops with that one).
    pub fn attach(port: u16) -> FakeGce {
        FakeGce {
            child: None,
            port,
            log: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log.path()).ok())
            .unwrap_or_default()
    }

    /// A provider for [`PROJECT`] over [`ZONES`] talking to this fake.
    pub fn provider(&self, adjust: impl FnOnce(&mut GcpConfig)) -> GcpProvider {
        let mut config = GcpConfig::new(PROJECT, ZONES.iter().map(|z| z.to_string()).collect());
        config.endpoint_url = Some(self.url());
        config.settle_timeout = Duration::from_secs(30);
        config.operation_timeout = Duration::from_secs(30);
        adjust(&mut config);
        GcpProvider::new(config).expect("a valid GCP config")
    }

    /// `POST /_fake/config` with `json` (a partial update).
    pub fn configure(&self, json: &str) {
        let (status, body) = self
            .http("POST", "/_fake/config", json)
            .expect("configure the fake");
        assert_eq!(status, 200, "{body}");
    }

    /// `GET /_fake/requests`: request counts by `METHOD template`.
    pub fn requests(&self) -> serde_json::Value {
        let (_, body) = self
            .http("GET", "/_fake/requests", "")
            .expect("read the fake's counts");
        serde_json::from_str(&body).expect("counts are JSON")
    }

    /// How many requests of `key` (e.g. `GET aggregated/instances`) the fake answered.
    pub fn count(&self, key: &str) -> u64 {
        self.requests()[key].as_u64().unwrap_or(0)
    }

    /// Every instance of `project` the fake holds (deleted ones are gone).
    pub fn instances(&self, project: &str) -> Vec<FakeInstance> {
        let (_, body) = self
            .http("GET", "/_fake/instances", "")
            .expect("read the fake's instances");
        let all: serde_json::Value = serde_json::from_str(&body).expect("instances are JSON");
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let map = |v: &serde_json::Value| {
            v.as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                .unwrap_or_default()
        };
        all["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["project"] == project)
            .map(|i| FakeInstance {
                zone: text(&i["zone"]),
                name: text(&i["name"]),
                status: text(&i["status"]),
                machine_type: text(&i["machineType"]),
                labels: map(&i["labels"]),
                metadata: map(&i["metadata"]),
            })
            .collect()
    }

    /// Instances of `project` labelled with it (what motorpool made).
    pub fn project_instances(&self, project: &str, motorpool_project: &str) -> Vec<FakeInstance> {
        self.instances(project)
            .into_iter()
            .filter(|i| i.label("motorpool-project") == Some(motorpool_project))
            .collect()
    }

    /// Delete an instance behind motorpool's back, as someone in the console would.
    pub fn delete(&self, project: &str, zone: &str, name: &str) {
        let path = format!("/compute/v1/projects/{project}/zones/{zone}/instances/{name}");
        let (status, body) = self
            .http("DELETE", &path, "")
            .expect("delete through the API");
        assert_eq!(status, 200, "{body}");
        // The delete takes effect when its operation is done.
        for _ in 0..200 {
            if !self.instances(project).iter().any(|i| i.name == name) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("{zone}/{name} was not deleted");
    }

    /// One request to the fake: its status and body.
    pub fn http(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for FakeGce {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
