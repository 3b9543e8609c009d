//! The AWS provider's registration with the engine: its settings block
//! (`provider: { kind: aws, region, image, subnet_ids, ... }`) with the checks
//! EC2 would otherwise make at launch, its capabilities (nodes start
//! themselves from cloud-init user data of at most 16 KiB), how a node
//! reaches EC2 with its instance role, and the user-data template.

use std::collections::BTreeMap;
use std::sync::Arc;

use motorpool_provider::{
    Capabilities, ConnectEnv, NodeStartup, NodeType, Provider, ProviderPlugin, Result,
    SettingProblem, settings_from,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AwsConfig, AwsProvider, KIND, check_image, is_resource_id};

/// EC2's limit on user data, in bytes (before base64).
pub const USER_DATA_LIMIT: usize = 16 * 1024;

/// Settings of the AWS provider (EC2). Credentials always come from the
/// standard AWS chain (environment, profile, instance role), never from the spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// The region, e.g. `us-east-1`; default: `AWS_REGION` or the AWS profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An AMI id (`ami-...`) or an SSM parameter name (`/aws/service/...`,
    /// resolved by EC2 at launch); default: the latest Amazon Linux 2023 (x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Subnets to launch into: launches are spread over them, and a subnet
    /// without capacity fails over to the next. Default: the default VPC's choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// An instance profile name or ARN, for the instances' own AWS access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// An EC2 key pair for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// Launch spot instances, falling back to on-demand when spot has no capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
    /// Root volume size in GiB (gp3); default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_gb: Option<u32>,
    /// Extra tags on every instance and volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The EC2 endpoint (e.g. a local emulator); default: `AWS_ENDPOINT_URL_EC2`,
    /// `AWS_ENDPOINT_URL`, else the region's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Instances per DescribeInstances page, 5 to 1000 (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// An S3 bucket of the project's (made and tagged when missing): without
    /// `runtime_url`, `apply` uploads its own binary there once per version
    /// and nodes download it through a presigned URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_bucket: Option<String>,
    /// Address ranges (CIDR) the machine running `motorpool` connects from:
    /// when set, a cluster's driver gets a public address, and a security
    /// group of the project's opens the agent's and the driver's ports
    /// (7443-7444) to these ranges only, so `run`, `status` and `logs` reach
    /// it from outside the VPC. Pool instances (which may become drivers)
    /// get the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_driver_cidrs: Vec<String>,
}

impl AwsSettings {
    pub fn config(&self) -> AwsConfig {
        let defaults = AwsConfig::default();
        AwsConfig {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            image: self.image.clone(),
            subnet_ids: self.subnet_ids.clone(),
            security_group_ids: self.security_group_ids.clone(),
            iam_instance_profile: self.iam_instance_profile.clone(),
            key_name: self.key_name.clone(),
            spot: self.spot,
            root_volume_gb: self.root_volume_gb,
            tags: self.tags.clone(),
            page_size: self.page_size.unwrap_or(defaults.page_size),
            runtime_bucket: self.runtime_bucket.clone(),
            public_driver_cidrs: self.public_driver_cidrs.clone(),
            ..defaults
        }
    }
}

/// What a node is told about EC2: where, not who (it uses its instance role).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NodeSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
}

/// Amazon EC2: credentials and region from the standard AWS chain.
pub struct AwsPlugin;

impl ProviderPlugin for AwsPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "Amazon EC2: credentials and region from the standard AWS chain."
    }

    fn settings_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(AwsSettings)).unwrap_or(Value::Bool(true))
    }

    fn check_settings(&self, value: &Value) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        let int = |key: &str| value.get(key).and_then(Value::as_i64);
        if let Some(v) = int("page_size").filter(|v| !(5..=1000).contains(v)) {
            problems.push(SettingProblem::at(
                &["page_size"],
                format!("`page_size` of the aws provider must be between 5 and 1000, found {v}"),
            ));
        }
        if let Some(v) = int("root_volume_gb").filter(|v| !(1..=16384).contains(v)) {
            problems.push(SettingProblem::at(
                &["root_volume_gb"],
                format!("`root_volume_gb` must be between 1 and 16384, found {v}"),
            ));
        }
        if let Some(image) = value.get("image").and_then(Value::as_str)
            && let Err(problem) = check_image(image)
        {
            problems.push(SettingProblem::at(
                &["image"],
                format!("`image`: {problem}"),
            ));
        }
        for (key, prefix) in [("subnet_ids", "subnet-"), ("security_group_ids", "sg-")] {
            let Some(items) = value.get(key).and_then(Value::as_array) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                if let Some(id) = item.as_str()
                    && !is_resource_id(prefix, id)
                {
                    problems.push(SettingProblem::at(
                        &[key, &i.to_string()],
                        format!("`{id}` in `{key}` is not an id like {prefix}0123456789abcdef0"),
                    ));
                }
            }
        }
        if let Some(url) = value.get("endpoint_url").and_then(Value::as_str)
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(SettingProblem::at(
                &["endpoint_url"],
                format!("`endpoint_url` must be an http:// or https:// URL, found `{url}`"),
            ));
        }
        if let Some(bucket) = value.get("runtime_bucket").and_then(Value::as_str)
            && let Err(problem) = check_bucket_name(bucket)
        {
            problems.push(SettingProblem::at(
                &["runtime_bucket"],
                format!("`runtime_bucket`: {problem}"),
            ));
        }
        if let Some(items) = value.get("public_driver_cidrs").and_then(Value::as_array) {
            for (i, item) in items.iter().enumerate() {
                if let Some(cidr) = item.as_str()
                    && let Err(problem) = check_cidr(cidr)
                {
                    problems.push(SettingProblem::at(
                        &["public_driver_cidrs", &i.to_string()],
                        format!("`{cidr}` in `public_driver_cidrs`: {problem}"),
                    ));
                }
            }
        }
        if let Some(tags) = value.get("tags").and_then(Value::as_object) {
            for key in tags.keys() {
                if key.starts_with("motorpool-") || key.to_ascii_lowercase().starts_with("aws:") {
                    problems.push(SettingProblem::key(
                        &["tags", key],
                        format!(
                            "tag `{key}`: keys starting with `motorpool-` or `aws:` are reserved"
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
        let settings: AwsSettings = settings_from(KIND, value)?;
        Ok(Arc::new(AwsProvider::new(settings.config())?))
    }

    fn node_settings(&self, value: &Value, _env: &ConnectEnv) -> Result<Value> {
        let settings: AwsSettings = settings_from(KIND, value)?;
        serde_json::to_value(NodeSettings {
            region: settings.region,
            endpoint: settings.endpoint_url,
        })
        .map_err(|e| motorpool_provider::ProviderError::Internal(e.to_string()))
    }

    fn connect_from_node(&self, value: &Value, _env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let node: NodeSettings = if value.is_null() {
            NodeSettings::default()
        } else {
            settings_from(KIND, value)?
        };
        let config = AwsConfig {
            region: node.region,
            endpoint_url: node.endpoint,
            ..AwsConfig::default()
        };
        Ok(Arc::new(AwsProvider::new(config)?))
    }

    fn user_data_template(&self) -> Option<&'static str> {
        Some(include_str!("../templates/user-data.sh"))
    }

    fn publishes_runtime(&self, settings: &Value) -> bool {
        settings.get("runtime_bucket").is_some_and(Value::is_string)
    }

    fn public_driver(&self, settings: &Value) -> bool {
        settings
            .get("public_driver_cidrs")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    }

    fn reach_hint(&self) -> Option<&'static str> {
        Some(
            "the address is private to the instance's VPC: run motorpool from inside it, or set \
             `public_driver_cidrs` in the provider block to the address ranges this machine \
             connects from (e.g. [\"203.0.113.7/32\"]) to give drivers a public address open \
             to those only",
        )
    }
}

/// S3's bucket naming rules (3 to 63 lower-case letters, digits, dots and
/// hyphens, starting and ending with a letter or digit, not an IP address).
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !(3..=63).contains(&name.len()) || !chars_ok || !ends_ok || name.contains("..") {
        return Err(format!(
            "`{name}` is not an S3 bucket name: 3 to 63 lower-case letters, digits, dots and \
             hyphens, starting and ending with a letter or digit"
        ));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "`{name}` is an IP address, which S3 refuses as a bucket name"
        ));
    }
    Ok(())
}

/// An IPv4 or IPv6 CIDR block such as `203.0.113.0/24`.
pub fn check_cidr(cidr: &str) -> Result<(), String> {
    let Some((ip, bits)) = cidr.split_once('/') else {
        return Err("not a CIDR block like 203.0.113.7/32".into());
    };
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err(format!("`{ip}` is not an IP address")),
    };
    match bits.parse::<u8>() {
        Ok(n) if n <= max => Ok(()),
        _ => Err(format!("the prefix length must be 0 to {max}")),
    }
}
