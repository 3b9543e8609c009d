//! The GCP provider's registration with the engine: its settings block
//! (`provider: { kind: gcp, project, zone | zones, network, image, ... }`)
//! with the checks the Compute API would otherwise make at launch, its
//! capabilities (nodes start themselves from a `startup-script` of at most
//! 256 KiB), how a node reaches the API with its own service account, and
//! the startup-script template.

use std::collections::BTreeMap;
use std::sync::Arc;

use motorpool_provider::{
    Capabilities, ConnectEnv, NodeStartup, NodeType, Provider, ProviderError, ProviderPlugin,
    Result, SettingProblem, settings_from,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::labels::{is_label_key, is_label_value};
use crate::{GcpConfig, GcpProvider, KIND, check_image};

/// The Compute API's limit on one metadata value (the startup script), in bytes.
pub const USER_DATA_LIMIT: usize = 256 * 1024;

/// Boot disk types a zonal instance can have.
const DISK_TYPES: &[&str] = &[
    "pd-balanced",
    "pd-ssd",
    "pd-standard",
    "pd-extreme",
    "hyperdisk-balanced",
    "hyperdisk-extreme",
    "hyperdisk-throughput",
];

/// Settings of the GCP provider (Compute Engine). Credentials always come
/// from Application Default Credentials, never from the spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GcpSettings {
    /// The GCP project id, e.g. `my-project`.
    pub project: String,
    /// The zone to launch in, e.g. `us-central1-a` (or `zones`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Zones to spread launches over; a zone out of capacity fails over to the next.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// The VPC network (name or URL); default: the project's `default` network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The subnetwork (name or URL), for custom-mode networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnetwork: Option<String>,
    /// The boot image, as a URL: `projects/P/global/images/NAME` or
    /// `projects/P/global/images/family/FAMILY`; default: Debian 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The service account email the instances run as (their own access to
    /// Google Cloud, with the cloud-platform scope); default: the project's
    /// Compute Engine default service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Launch Spot VMs, falling back to standard VMs when no zone has spot capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
    /// Boot disk size in GB (10 to 65536); default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_gb: Option<u32>,
    /// Boot disk type: pd-balanced (default), pd-ssd, pd-standard, hyperdisk-balanced, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_type: Option<String>,
    /// Network tags, which firewall rules select instances by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_tags: Vec<String>,
    /// Extra labels on every instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Give instances an ephemeral public address (default true; set false
    /// on networks with Cloud NAT or Private Google Access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_ip: Option<bool>,
    /// Another Compute API root (e.g. a local stand-in): paths `/compute/v1/...` below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Instances per aggregatedList page, 1 to 500 (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// A Cloud Storage bucket of the project's (made and labelled when
    /// missing): without `runtime_url`, `apply` uploads its own binary there
    /// once per version and nodes download it through a signed URL (the
    /// credentials must be able to sign: a service account key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_bucket: Option<String>,
}

impl GcpSettings {
    /// The zones, in order of preference.
    pub fn zones(&self) -> Vec<String> {
        match &self.zone {
            Some(zone) => std::iter::once(zone.clone())
                .chain(self.zones.iter().filter(|z| *z != zone).cloned())
                .collect(),
            None => self.zones.clone(),
        }
    }

    pub fn config(&self) -> GcpConfig {
        let mut config = GcpConfig::new(&self.project, self.zones());
        config.network = self.network.clone();
        config.subnetwork = self.subnetwork.clone();
        config.image = self.image.clone();
        config.service_account = self.service_account.clone();
        config.spot = self.spot;
        config.disk_size_gb = self.disk_size_gb;
        config.disk_type = self.disk_type.clone();
        config.network_tags = self.network_tags.clone();
        config.labels = self.labels.clone();
        config.external_ip = self.external_ip.unwrap_or(true);
        config.endpoint_url = self.endpoint_url.clone();
        if let Some(size) = self.page_size {
            config.page_size = size;
        }
        config.runtime_bucket = self.runtime_bucket.clone();
        config
    }
}

/// What a node is told about the Compute API: where, not who (it uses its
/// service account, through the metadata server).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NodeSettings {
    project: String,
    zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
}

/// `[a-z][a-z0-9-]{4,28}[a-z0-9]`: a project id as GCP allows it.
pub fn is_project_id(id: &str) -> bool {
    (6..=30).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `REGION-LETTER`, e.g. `us-central1-a`, `europe-west4-b`.
pub fn is_zone(zone: &str) -> bool {
    let Some((region, letter)) = zone.rsplit_once('-') else {
        return false;
    };
    let Some((area, place)) = region.split_once('-') else {
        return false;
    };
    letter.len() == 1
        && letter.chars().all(|c| c.is_ascii_lowercase())
        && !area.is_empty()
        && area.chars().all(|c| c.is_ascii_lowercase())
        && place.ends_with(|c: char| c.is_ascii_digit())
        && place
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn is_network_tag(tag: &str) -> bool {
    (1..=63).contains(&tag.len())
        && tag.starts_with(|c: char| c.is_ascii_lowercase())
        && !tag.ends_with('-')
        && tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Why `name` is no Cloud Storage bucket name, if it is not: 3 to 63
/// lowercase letters, digits, `-`, `_` and `.` (dotted names are domain
/// names, which need a verified domain: refused), starting and ending with a
/// letter or digit, not starting with `goog` nor containing `google`.
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.starts_with("goog")
        && !name.contains("google");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a Cloud Storage bucket name (3 to 63 lowercase letters, digits, \
             `-` and `_`, starting and ending with a letter or digit, without `goog` at the \
             start or `google` in it)"
        ))
    }
}

/// Google Compute Engine: credentials from Application Default Credentials.
pub struct GcpPlugin;

impl ProviderPlugin for GcpPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "Google Compute Engine: credentials from Application Default Credentials."
    }

    fn settings_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(GcpSettings)).unwrap_or(Value::Bool(true))
    }

    fn check_settings(&self, value: &Value) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        let int = |key: &str| value.get(key).and_then(Value::as_i64);
        if let Some(project) = text("project")
            && !is_project_id(project)
        {
            problems.push(SettingProblem::at(
                &["project"],
                format!(
                    "`{project}` is not a GCP project id (6 to 30 lowercase letters, digits \
                     and hyphens, starting with a letter)"
                ),
            ));
        }
        let zones = value.get("zones").and_then(Value::as_array);
        match (text("zone"), zones) {
            (Some(_), Some(list)) if !list.is_empty() => problems.push(SettingProblem::at(
                &["zones"],
                "set `zone` or `zones`, not both",
            )),
            (None, None) => problems.push(SettingProblem::at(
                &[],
                "the gcp provider needs a `zone` (or `zones`) to launch in",
            )),
            (None, Some(list)) if list.is_empty() => problems.push(SettingProblem::at(
                &["zones"],
                "`zones` must name at least one zone",
            )),
            _ => {}
        }
        if let Some(zone) = text("zone")
            && !is_zone(zone)
        {
            problems.push(SettingProblem::at(
                &["zone"],
                format!("`{zone}` is not a zone like us-central1-a"),
            ));
        }
        for (i, zone) in zones.into_iter().flatten().enumerate() {
            if let Some(zone) = zone.as_str()
                && !is_zone(zone)
            {
                problems.push(SettingProblem::at(
                    &["zones", &i.to_string()],
                    format!("`{zone}` is not a zone like us-central1-a"),
                ));
            }
        }
        if let Some(v) = int("page_size").filter(|v| !(1..=500).contains(v)) {
            problems.push(SettingProblem::at(
                &["page_size"],
                format!("`page_size` of the gcp provider must be between 1 and 500, found {v}"),
            ));
        }
        if let Some(v) = int("disk_size_gb").filter(|v| !(10..=65536).contains(v)) {
            problems.push(SettingProblem::at(
                &["disk_size_gb"],
                format!("`disk_size_gb` must be between 10 and 65536, found {v}"),
            ));
        }
        if let Some(disk_type) = text("disk_type")
            && !DISK_TYPES.contains(&disk_type)
        {
            problems.push(SettingProblem::at(
                &["disk_type"],
                format!(
                    "`{disk_type}` is not a boot disk type; one of {}",
                    DISK_TYPES.join(", ")
                ),
            ));
        }
        if let Some(image) = text("image")
            && let Err(problem) = check_image(image)
        {
            problems.push(SettingProblem::at(
                &["image"],
                format!("`image`: {problem}"),
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
        if let Some(bucket) = text("runtime_bucket")
            && let Err(problem) = check_bucket_name(bucket)
        {
            problems.push(SettingProblem::at(
                &["runtime_bucket"],
                format!("`runtime_bucket`: {problem}"),
            ));
        }
        if let Some(email) = text("service_account")
            && !email
                .split_once('@')
                .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'))
        {
            problems.push(SettingProblem::at(
                &["service_account"],
                format!("`{email}` is not a service account email"),
            ));
        }
        for (i, tag) in value
            .get("network_tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(tag) = tag.as_str()
                && !is_network_tag(tag)
            {
                problems.push(SettingProblem::at(
                    &["network_tags", &i.to_string()],
                    format!(
                        "`{tag}` is not a network tag (lowercase letters, digits and \
                         hyphens, at most 63, starting with a letter)"
                    ),
                ));
            }
        }
        if let Some(labels) = value.get("labels").and_then(Value::as_object) {
            for (key, v) in labels {
                if key.starts_with("motorpool-") || key.starts_with("goog-") {
                    problems.push(SettingProblem::key(
                        &["labels", key],
                        format!(
                            "label `{key}`: keys starting with `motorpool-` or `goog-` are reserved"
                        ),
                    ));
                } else if !is_label_key(key) {
                    problems.push(SettingProblem::key(
                        &["labels", key],
                        format!(
                            "`{key}` is not a GCP label key (lowercase letters, digits, `_` \
                             and `-`, at most 63, starting with a letter)"
                        ),
                    ));
                }
                if let Some(v) = v.as_str()
                    && !is_label_value(v)
                {
                    problems.push(SettingProblem::at(
                        &["labels", key],
                        format!(
                            "`{v}` is not a GCP label value (lowercase letters, digits, `_` \
                             and `-`, at most 63)"
                        ),
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
        let settings: GcpSettings = settings_from(KIND, value)?;
        Ok(Arc::new(GcpProvider::new(settings.config())?))
    }

    fn node_settings(&self, value: &Value, _env: &ConnectEnv) -> Result<Value> {
        let settings: GcpSettings = settings_from(KIND, value)?;
        serde_json::to_value(NodeSettings {
            zones: settings.zones(),
            project: settings.project,
            endpoint: settings.endpoint_url,
        })
        .map_err(|e| ProviderError::Internal(e.to_string()))
    }

    fn connect_from_node(&self, value: &Value, _env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let node: NodeSettings = settings_from(KIND, value)?;
        let mut config = GcpConfig::new(&node.project, node.zones);
        config.endpoint_url = node.endpoint;
        Ok(Arc::new(GcpProvider::new(config)?))
    }

    fn user_data_template(&self) -> Option<&'static str> {
        Some(include_str!("../templates/startup-script.sh"))
    }

    fn publishes_runtime(&self, settings: &Value) -> bool {
        settings.get("runtime_bucket").is_some_and(Value::is_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(value: Value) -> Vec<String> {
        GcpPlugin
            .check_settings(&value)
            .into_iter()
            .map(|p| format!("{}: {}", p.path.join("."), p.message))
            .collect()
    }

    #[test]
    fn a_plain_block_passes() {
        assert_eq!(
            problems(json!({"project": "my-project", "zone": "us-central1-a"})),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_setting_is_checked_where_it_is() {
        let found = problems(json!({
            "project": "My_Project",
            "zone": "uscentral",
            "page_size": 900,
            "disk_size_gb": 5,
            "disk_type": "ssd",
            "image": "debian",
            "network_tags": ["Web"],
            "labels": {"motorpool-x": "a", "Team": "b", "ok": "Bad Value"},
            "service_account": "nobody",
            "runtime_bucket": "Bad_Bucket",
        }));
        for needle in [
            "project: `My_Project` is not a GCP project id",
            "zone: `uscentral` is not a zone",
            "page_size: `page_size` of the gcp provider must be between 1 and 500",
            "disk_size_gb: ",
            "disk_type: `ssd` is not a boot disk type",
            "image: `image`",
            "network_tags.0: `Web`",
            "labels.motorpool-x: label `motorpool-x`",
            "labels.Team: `Team` is not a GCP label key",
            "labels.ok: `Bad Value` is not a GCP label value",
            "service_account: `nobody`",
            "runtime_bucket: `runtime_bucket`: `Bad_Bucket` is not a Cloud Storage bucket name",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(needle)),
                "{needle} in {found:#?}"
            );
        }
    }

    #[test]
    fn zone_and_zones_are_one_or_the_other() {
        assert!(problems(json!({"project": "my-project"}))[0].contains("needs a `zone`"));
        assert!(
            problems(json!({"project": "my-project", "zone": "us-central1-a", "zones": ["us-central1-b"]}))[0]
                .contains("not both")
        );
        let settings = GcpSettings {
            project: "my-project".into(),
            zones: vec!["us-central1-b".into(), "us-central1-c".into()],
            ..GcpSettings::default()
        };
        assert_eq!(settings.zones(), ["us-central1-b", "us-central1-c"]);
    }

    #[test]
    fn a_node_learns_where_the_api_is_not_who_it_is() {
        let env = ConnectEnv {
            home: "/nonexistent".into(),
            agent_program: "motorpool".into(),
        };
        let value = json!({"project": "my-project", "zone": "us-central1-a",
                           "endpoint_url": "http://127.0.0.1:9"});
        let node = GcpPlugin
            .node_settings(&value, &env)
            .expect("node settings");
        assert_eq!(
            node,
            json!({"project": "my-project", "zones": ["us-central1-a"], "endpoint": "http://127.0.0.1:9"})
        );
        let provider = GcpPlugin
            .connect_from_node(&node, &env)
            .expect("connects lazily");
        assert_eq!(provider.kind(), "gcp");
    }
}
