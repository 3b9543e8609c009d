//! Test support for the GCP provider: the fake Compute API (`fake_gce.py`,
//! Python's standard library only) started on 127.0.0.1 and killed on drop,
//! also when a test fails, and readers of its `/_fake/` controls.
//!
//! Shared by the crate's own tests and by the CLI tests (`tests/gcp.rs`).
//! `gcs.rs`: the Cloud Storage emulator and a test service account key, for
//! the runtime upload.

#![allow(dead_code)]

#[path = "../../../testing/fake_process.rs"]
mod fake_process;
#[path = "gcs.rs"]
pub mod gcs;

use std::path::PathBuf;
use std::time::Duration;

use fake_process::FakeProcess;
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
    process: FakeProcess,
    pub port: u16,
}

impl std::ops::Deref for FakeGce {
    type Target = FakeProcess;

    fn deref(&self) -> &FakeProcess {
        &self.process
    }
}

impl FakeGce {
    /// Start a fresh fake (empty state), operations moving every 40 ms.
    pub fn start() -> FakeGce {
        let process = FakeProcess::start(&support_dir().join("fake_gce.py"), &["--stage-ms", "40"]);
        FakeGce {
            port: process.port,
            process,
        }
    }

    /// A handle on a fake another handle started (it stops with that one).
    pub fn attach(port: u16) -> FakeGce {
        FakeGce {
            process: FakeProcess::attach(port),
            port,
        }
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

    /// Every instance of `project` the fake holds (deleted ones are gone).
    pub fn instances(&self, project: &str) -> Vec<FakeInstance> {
        let all = self.control("/_fake/instances");
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
            .http("DELETE", &path, &[], "")
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
}
