//! Test support for the Azure provider: the fake Resource Manager
//! (`fake_arm.py`, Python's standard library only) started on 127.0.0.1 and
//! killed on drop, also when a test fails, and readers of its `/_fake/`
//! controls.
//!
//! Shared by the crate's own tests and by the CLI tests (`tests/azure.rs`).

#![allow(dead_code)]

#[path = "../../../testing/fake_process.rs"]
mod fake_process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fake_process::FakeProcess;
use motorpool_azure::{AzureConfig, AzureProvider};

pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
pub const GROUP: &str = "motorpool-test-rg";
pub const LOCATION: &str = "westeurope";
pub const SUBNET: &str = "/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default";

/// Where the fake lives, from the workspace root or the crate's directory.
pub fn support_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        root.join("providers/azure/tests/support"),
        root.join("tests/support"),
    ] {
        if dir.join("fake_arm.py").is_file() {
            return dir;
        }
    }
    panic!("fake_arm.py not found under {}", root.display());
}

/// One VM as the fake holds it (`GET /_fake/vms`).
#[derive(Debug, Clone)]
pub struct FakeVm {
    pub name: String,
    pub resource_group: String,
    pub size: String,
    pub priority: String,
    pub provisioning_state: String,
    pub power_state: String,
    pub tags: BTreeMap<String, String>,
    pub custom_data: String,
    pub nic_ids: Vec<String>,
}

impl FakeVm {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// The fake Resource Manager, on a loopback port of its own choosing.
pub struct FakeArm {
    process: FakeProcess,
    pub port: u16,
}

impl std::ops::Deref for FakeArm {
    type Target = FakeProcess;

    fn deref(&self) -> &FakeProcess {
        &self.process
    }
}

impl FakeArm {
    /// Start a fresh fake (empty state), operations moving every 40 ms and
    /// `Retry-After: 0`, so polls do not sleep a second each.
    pub fn start() -> FakeArm {
        let process = FakeProcess::start(&support_dir().join("fake_arm.py"), &["--stage-ms", "40"]);
        process.configure(r#"{"retry_after": 0}"#);
        FakeArm {
            port: process.port,
            process,
        }
    }

    /// A handle on a fake another handle started (it stops with that one).
    pub fn attach(port: u16) -> FakeArm {
        FakeArm {
            process: FakeProcess::attach(port),
            port,
        }
    }

    /// A provider for [`GROUP`] in [`LOCATION`] talking to this fake.
    pub fn provider(&self, adjust: impl FnOnce(&mut AzureConfig)) -> AzureProvider {
        let mut config = AzureConfig::new(SUBSCRIPTION, GROUP, LOCATION);
        config.subnet_id = SUBNET.to_string();
        config.endpoint_url = Some(self.url());
        config.operation_timeout = Duration::from_secs(30);
        adjust(&mut config);
        AzureProvider::new(config).expect("a valid Azure config")
    }

    /// Every VM the fake holds (deleted ones are gone).
    pub fn vms(&self) -> Vec<FakeVm> {
        let all = self.control("/_fake/vms");
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        all["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| FakeVm {
                name: text(&v["name"]),
                resource_group: text(&v["resourceGroup"]),
                size: text(&v["vmSize"]),
                priority: text(&v["priority"]),
                provisioning_state: text(&v["provisioningState"]),
                power_state: text(&v["powerState"]),
                tags: v["tags"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                    .unwrap_or_default(),
                custom_data: text(&v["customData"]),
                nic_ids: v["nicIds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect(),
            })
            .collect()
    }

    /// VMs tagged with motorpool project `project`.
    pub fn project_vms(&self, project: &str) -> Vec<FakeVm> {
        self.vms()
            .into_iter()
            .filter(|v| v.tag("motorpool-project") == Some(project))
            .collect()
    }

    /// How many network interfaces the fake holds.
    pub fn nic_count(&self) -> usize {
        self.control("/_fake/nics")["nics"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Delete a VM behind motorpool's back, as someone in the portal would.
    pub fn delete(&self, name: &str) {
        let path = format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Compute/virtualMachines/{name}?api-version=2024-07-01"
        );
        let (status, body) = self
            .http("DELETE", &path, &[("Authorization", "Bearer portal")], "")
            .expect("delete through the API");
        assert!(status == 202 || status == 200, "{status} {body}");
        for _ in 0..200 {
            if !self.vms().iter().any(|v| v.name == name) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("VM {name} was not deleted");
    }
}
