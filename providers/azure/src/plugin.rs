//! The Azure provider's registration with the engine: its settings block
//! (`provider: { kind: azure, subscription_id, resource_group, location,
//! subnet_id, ... }`) with the checks Resource Manager would otherwise make at
//! launch (and the Blob service's naming rules for `storage_account` and
//! `runtime_container`), its capabilities (nodes start themselves from custom data of at
//! most 64 KiB), how a node reaches Resource Manager with its managed
//! identity, and the custom-data template.

use std::collections::BTreeMap;
use std::sync::Arc;

use motorpool_provider::{
    Capabilities, ConnectEnv, NodeStartup, NodeType, Provider, ProviderError, ProviderPlugin,
    Result, SettingProblem, settings_from,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AzureConfig, AzureProvider, ImageRef, KIND, StorageConfig};

/// Azure's limit on custom data: 64 KiB before base64.
pub const USER_DATA_LIMIT: usize = 64 * 1024;

const DISK_TYPES: &[&str] = &[
    "Premium_LRS",
    "PremiumV2_LRS",
    "StandardSSD_LRS",
    "Standard_LRS",
    "Premium_ZRS",
    "StandardSSD_ZRS",
];

/// Settings of the Azure provider (virtual machines through Resource
/// Manager). Credentials always come from the standard Azure chain, never
/// from the spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// The subscription id (a GUID).
    pub subscription_id: String,
    /// The resource group VMs live in; created (tagged with the project) if missing.
    pub resource_group: String,
    /// The region, e.g. `westeurope`.
    pub location: String,
    /// The subnet VMs get their network interface in: a full resource id,
    /// `/subscriptions/.../resourceGroups/.../providers/Microsoft.Network/virtualNetworks/VNET/subnets/SUBNET`.
    pub subnet_id: String,
    /// `publisher:offer:sku:version`; default: Ubuntu 24.04 LTS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An OpenSSH public key for the `motorpool` admin user; default: none
    /// usable (the VMs need no login).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<String>,
    /// Launch Spot VMs, falling back to regular VMs when Spot has no capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
    /// What happens to an evicted Spot VM: `Delete` (default) or `Deallocate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_policy: Option<String>,
    /// OS disk size in GiB; default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_disk_gb: Option<u32>,
    /// OS disk type: Premium_LRS, StandardSSD_LRS, Standard_LRS, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_disk_type: Option<String>,
    /// Extra tags on every VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Another Resource Manager root (e.g. a local stand-in); default: Azure's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// A storage account for motorpool's own objects, with
    /// `runtime_container`. Without `runtime_url`, `apply` uploads its own
    /// binary there once per version and nodes download it through a
    /// read-only SAS URL (signed with the account key from
    /// `AZURE_STORAGE_ACCOUNT_KEY`); and the project lock is kept there too
    /// (a blob per project), so two machines applying one project are kept
    /// apart. Without it, the project lock is the local file only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_account: Option<String>,
    /// The container in `storage_account` (made, private, when missing)
    /// holding the runtime (`motorpool/runtime/...`) and the project lock
    /// (`motorpool/locks/<project>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_container: Option<String>,
    /// Another blob service root for `storage_account` (e.g. Azurite's
    /// `http://127.0.0.1:10000/devstoreaccount1`); default:
    /// `https://ACCOUNT.blob.core.windows.net`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_endpoint: Option<String>,
}

impl AzureSettings {
    pub fn config(&self) -> AzureConfig {
        let mut config =
            AzureConfig::new(&self.subscription_id, &self.resource_group, &self.location);
        config.subnet_id = self.subnet_id.clone();
        config.image = self.image.clone();
        config.ssh_public_key = self.ssh_public_key.clone();
        config.spot = self.spot;
        if let Some(policy) = &self.eviction_policy {
            config.eviction_policy = policy.clone();
        }
        config.os_disk_gb = self.os_disk_gb;
        config.os_disk_type = self.os_disk_type.clone();
        config.tags = self.tags.clone();
        config.endpoint_url = self.endpoint_url.clone();
        if let (Some(account), Some(container)) = (&self.storage_account, &self.runtime_container) {
            config.storage = Some(StorageConfig {
                account: account.clone(),
                container: container.clone(),
                blob_endpoint: self.blob_endpoint.clone(),
                account_key: None,
            });
        }
        config
    }
}

/// What a node is told about Resource Manager: where, not who (it uses its
/// managed identity).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NodeSettings {
    subscription_id: String,
    resource_group: String,
    location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
}

/// `8-4-4-4-12` hex digits.
pub fn is_guid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A resource group name as Azure allows it: 1 to 90 letters, digits,
/// `_`, `-`, `.`, `(`, `)`, not ending with `.`.
pub fn is_resource_group(name: &str) -> bool {
    (1..=90).contains(&name.chars().count())
        && !name.ends_with('.')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || "_-.()".contains(c))
}

/// A storage account name: 3 to 24 lower-case letters and digits.
pub fn is_storage_account(name: &str) -> bool {
    (3..=24).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// A blob container name: 3 to 63 lower-case letters, digits and `-`,
/// starting and ending with a letter or digit, no `--`.
pub fn is_container(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// `/subscriptions/S/resourceGroups/G/providers/Microsoft.Network/virtualNetworks/V/subnets/N`.
pub fn is_subnet_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 11
        && parts[0].is_empty()
        && parts[1].eq_ignore_ascii_case("subscriptions")
        && parts[3].eq_ignore_ascii_case("resourceGroups")
        && parts[5].eq_ignore_ascii_case("providers")
        && parts[6].eq_ignore_ascii_case("Microsoft.Network")
        && parts[7].eq_ignore_ascii_case("virtualNetworks")
        && parts[9].eq_ignore_ascii_case("subnets")
        && [2, 4, 8, 10].iter().all(|&i| !parts[i].is_empty())
}

/// Azure Virtual Machines: credentials from the standard Azure chain.
pub struct AzurePlugin;

impl ProviderPlugin for AzurePlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "Azure Virtual Machines: credentials from the standard Azure chain."
    }

    fn settings_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(AzureSettings)).unwrap_or(Value::Bool(true))
    }

    fn check_settings(&self, value: &Value) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        if let Some(id) = text("subscription_id")
            && !is_guid(id)
        {
            problems.push(SettingProblem::at(
                &["subscription_id"],
                format!("`{id}` is not a subscription id (a GUID like 00000000-0000-0000-0000-000000000000)"),
            ));
        }
        if let Some(group) = text("resource_group")
            && !is_resource_group(group)
        {
            problems.push(SettingProblem::at(
                &["resource_group"],
                format!(
                    "`{group}` is not a resource group name (1 to 90 letters, digits, `_`, `-`, \
                     `.`, `(`, `)`, not ending with `.`)"
                ),
            ));
        }
        if let Some(location) = text("location")
            && (location.is_empty()
                || !location
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            problems.push(SettingProblem::at(
                &["location"],
                format!("`{location}` is not a location like westeurope"),
            ));
        }
        if let Some(id) = text("subnet_id")
            && !is_subnet_id(id)
        {
            problems.push(SettingProblem::at(
                &["subnet_id"],
                format!(
                    "`{id}` is not a subnet id like /subscriptions/S/resourceGroups/G/providers/\
                     Microsoft.Network/virtualNetworks/VNET/subnets/SUBNET"
                ),
            ));
        }
        if let Some(image) = text("image")
            && let Err(problem) = ImageRef::parse(image)
        {
            problems.push(SettingProblem::at(
                &["image"],
                format!("`image`: {problem}"),
            ));
        }
        if let Some(policy) = text("eviction_policy")
            && !["Delete", "Deallocate"].contains(&policy)
        {
            problems.push(SettingProblem::at(
                &["eviction_policy"],
                format!("`eviction_policy` is Delete or Deallocate, found `{policy}`"),
            ));
        }
        if let Some(kind) = text("os_disk_type")
            && !DISK_TYPES.contains(&kind)
        {
            problems.push(SettingProblem::at(
                &["os_disk_type"],
                format!(
                    "`{kind}` is not a disk type; one of {}",
                    DISK_TYPES.join(", ")
                ),
            ));
        }
        if let Some(v) = value
            .get("os_disk_gb")
            .and_then(Value::as_i64)
            .filter(|v| !(30..=4095).contains(v))
        {
            problems.push(SettingProblem::at(
                &["os_disk_gb"],
                format!("`os_disk_gb` must be between 30 and 4095, found {v}"),
            ));
        }
        if let Some(key) = text("ssh_public_key")
            && !["ssh-rsa ", "ssh-ed25519 ", "ecdsa-sha2-"]
                .iter()
                .any(|p| key.starts_with(p))
        {
            problems.push(SettingProblem::at(
                &["ssh_public_key"],
                "`ssh_public_key` must be an OpenSSH public key (ssh-rsa, ssh-ed25519 or ecdsa-sha2-...)",
            ));
        }
        if let Some(url) = text("endpoint_url")
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(SettingProblem::at(
                &["endpoint_url"],
                format!("`endpoint_url` must be an http:// or https:// URL, found `{url}`"),
            ));
        }
        if let Some(account) = text("storage_account")
            && !is_storage_account(account)
        {
            problems.push(SettingProblem::at(
                &["storage_account"],
                format!(
                    "`{account}` is not a storage account name (3 to 24 lower-case letters and \
                     digits)"
                ),
            ));
        }
        if let Some(container) = text("runtime_container")
            && !is_container(container)
        {
            problems.push(SettingProblem::at(
                &["runtime_container"],
                format!(
                    "`{container}` is not a blob container name (3 to 63 lower-case letters, \
                     digits and `-`, starting and ending with a letter or digit, no `--`)"
                ),
            ));
        }
        match (text("storage_account"), text("runtime_container")) {
            (Some(_), None) => problems.push(SettingProblem::at(
                &["storage_account"],
                "`storage_account` needs `runtime_container`: the container motorpool keeps the \
                 runtime and the project lock in",
            )),
            (None, Some(_)) => problems.push(SettingProblem::at(
                &["runtime_container"],
                "`runtime_container` needs `storage_account`: the account it is in",
            )),
            _ => {}
        }
        if let Some(url) = text("blob_endpoint") {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(SettingProblem::at(
                    &["blob_endpoint"],
                    format!("`blob_endpoint` must be an http:// or https:// URL, found `{url}`"),
                ));
            } else if text("storage_account").is_none() {
                problems.push(SettingProblem::at(
                    &["blob_endpoint"],
                    "`blob_endpoint` is the blob service of `storage_account`, which is not set",
                ));
            }
        }
        if let Some(tags) = value.get("tags").and_then(Value::as_object) {
            for (key, v) in tags {
                if key.starts_with("motorpool-") {
                    problems.push(SettingProblem::key(
                        &["tags", key],
                        format!("tag `{key}`: names starting with `motorpool-` are reserved"),
                    ));
                } else if key.contains(['<', '>', '%', '&', '\\', '?', '/']) {
                    problems.push(SettingProblem::key(
                        &["tags", key],
                        format!("tag `{key}`: Azure tag names cannot contain < > % & \\ ? /"),
                    ));
                }
                if v.as_str().is_some_and(|v| v.chars().count() > 256) {
                    problems.push(SettingProblem::at(
                        &["tags", key],
                        "Azure tag values are at most 256 characters",
                    ));
                }
            }
        }
        problems
    }

    fn catalog(&self) -> Vec<NodeType> {
        crate::catalog()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            node_startup: NodeStartup::SelfStarting,
            user_data_limit: Some(USER_DATA_LIMIT),
            stop_start: true,
        }
    }

    fn connect(&self, value: &Value, _env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let settings: AzureSettings = settings_from(KIND, value)?;
        Ok(Arc::new(AzureProvider::new(settings.config())?))
    }

    fn node_settings(&self, value: &Value, _env: &ConnectEnv) -> Result<Value> {
        let settings: AzureSettings = settings_from(KIND, value)?;
        serde_json::to_value(NodeSettings {
            subscription_id: settings.subscription_id,
            resource_group: settings.resource_group,
            location: settings.location,
            endpoint: settings.endpoint_url,
        })
        .map_err(|e| ProviderError::Internal(e.to_string()))
    }

    fn connect_from_node(&self, value: &Value, _env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let node: NodeSettings = settings_from(KIND, value)?;
        let mut config =
            AzureConfig::new(&node.subscription_id, &node.resource_group, &node.location);
        config.endpoint_url = node.endpoint;
        Ok(Arc::new(AzureProvider::new(config)?))
    }

    fn user_data_template(&self) -> Option<&'static str> {
        Some(include_str!("../templates/custom-data.sh"))
    }

    fn publishes_runtime(&self, settings: &Value) -> bool {
        ["storage_account", "runtime_container"]
            .iter()
            .all(|key| settings.get(key).is_some_and(Value::is_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SUBNET: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default";

    fn problems(value: Value) -> Vec<String> {
        AzurePlugin
            .check_settings(&value)
            .into_iter()
            .map(|p| format!("{}: {}", p.path.join("."), p.message))
            .collect()
    }

    #[test]
    fn a_plain_block_passes() {
        assert_eq!(
            problems(json!({
                "subscription_id": "00000000-0000-0000-0000-000000000000",
                "resource_group": "data-rg", "location": "westeurope", "subnet_id": SUBNET,
            })),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_setting_is_checked_where_it_is() {
        let found = problems(json!({
            "subscription_id": "abc", "resource_group": "bad/rg.", "location": "West Europe",
            "subnet_id": "/subscriptions/x/subnets/y", "image": "ubuntu",
            "eviction_policy": "Stop", "os_disk_type": "SSD", "os_disk_gb": 5,
            "ssh_public_key": "AAAA", "tags": {"motorpool-x": "v", "a/b": "c"},
            "storage_account": "My-Account", "runtime_container": "a--b",
            "blob_endpoint": "127.0.0.1:10000",
        }));
        for needle in [
            "subscription_id: `abc`",
            "resource_group: `bad/rg.`",
            "location: `West Europe`",
            "subnet_id: `/subscriptions/x/subnets/y`",
            "image: `image`",
            "eviction_policy: ",
            "os_disk_type: `SSD`",
            "os_disk_gb: ",
            "ssh_public_key: ",
            "tags.motorpool-x: tag `motorpool-x`",
            "tags.a/b: tag `a/b`",
            "storage_account: `My-Account` is not a storage account name",
            "runtime_container: `a--b` is not a blob container name",
            "blob_endpoint: `blob_endpoint` must be an http",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(needle)),
                "{needle} in {found:#?}"
            );
        }
    }

    #[test]
    fn storage_is_an_account_and_a_container_together() {
        let base = json!({
            "subscription_id": "00000000-0000-0000-0000-000000000000",
            "resource_group": "data-rg", "location": "westeurope", "subnet_id": SUBNET,
        });
        let with = |extra: Value| {
            let mut v = base.clone();
            if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                v.extend(extra.clone());
            }
            v
        };
        let both = with(json!({"storage_account": "mpdata01", "runtime_container": "motorpool"}));
        assert_eq!(problems(both.clone()), Vec::<String>::new());
        assert!(AzurePlugin.publishes_runtime(&both));
        assert!(!AzurePlugin.publishes_runtime(&base));
        let settings: AzureSettings = serde_json::from_value(both).expect("settings");
        assert_eq!(
            settings.config().storage.map(|s| s.container),
            Some("motorpool".to_string())
        );
        let alone = problems(with(json!({"storage_account": "mpdata01"})));
        assert!(
            alone
                .iter()
                .any(|p| p.contains("needs `runtime_container`")),
            "{alone:?}"
        );
        let endpoint = problems(with(json!({"blob_endpoint": "http://127.0.0.1:10000/x"})));
        assert!(
            endpoint.iter().any(|p| p.contains("which is not set")),
            "{endpoint:?}"
        );
    }

    #[test]
    fn a_node_learns_where_resource_manager_is_not_who_it_is() {
        let env = ConnectEnv {
            home: "/nonexistent".into(),
            agent_program: "motorpool".into(),
        };
        let value = json!({
            "subscription_id": "00000000-0000-0000-0000-000000000000",
            "resource_group": "data-rg", "location": "westeurope", "subnet_id": SUBNET,
            "endpoint_url": "http://127.0.0.1:9",
        });
        let node = AzurePlugin
            .node_settings(&value, &env)
            .expect("node settings");
        assert_eq!(node["resource_group"], "data-rg");
        assert!(node.get("subnet_id").is_none());
        let provider = AzurePlugin
            .connect_from_node(&node, &env)
            .expect("connects lazily");
        assert_eq!(provider.kind(), "azure");
    }
}
