//! The AWS provider: EC2 instances through `aws-sdk-ec2`, found by their tags.
//!
//! Credentials and region come from the standard AWS chain (environment,
//! profile files, web identity, ECS, instance metadata), unless the spec sets
//! `region`; the endpoint from `endpoint_url` in the spec, else
//! `AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL`, else the region's EC2
//! endpoint. The SDK client is built on the first call, so a spec that is only
//! validated never touches the network.
//!
//! How each call maps to EC2:
//!
//! - **list_page**: one `DescribeInstances` per page, filtered by `tag:KEY` for
//!   every filter pair and by `instance-state-name` in pending, running,
//!   stopping, stopped. Shutting-down and terminated instances are left out:
//!   EC2 keeps reporting them for about an hour, and the engine treats them
//!   as gone anyway; a vanished instance is drift through the `motorpool-size`
//!   tag of its pool or cluster. `MaxResults` is the configured page size
//!   (5 to 1000); the page token is EC2's `NextToken`.
//! - **launch**: one `RunInstances` with `MinCount = MaxCount = count`, so a
//!   batch is all or nothing (no partial fulfilment to reconcile), tagged at
//!   birth (instance and volume `TagSpecifications`), with `ClientToken` = the
//!   request's token (hashed when it is longer than EC2's 64 ASCII
//!   characters) and base64 `UserData`. Launches are spread over
//!   `subnet_ids` (the first subnet tried is chosen by the token), and an
//!   `InsufficientInstanceCapacity` fails over to the next subnet; with
//!   `spot: true` every subnet is tried as spot first, then as on-demand.
//!   Each fail-over attempt has its own token derived from the request's, and
//!   every instance carries the request's token in the `motorpool-launch` tag:
//!   before launching, instances with that tag are looked up and returned
//!   when they exist. So a repeated launch returns the first one's instances
//!   even when it had failed over, and also on EC2 emulators that ignore
//!   `ClientToken` (moto). The lookup is one `DescribeInstances` per launch.
//! - **terminate**: `TerminateInstances`, at most 1000 ids per call. Ids that
//!   do not exist are skipped (after an `InvalidInstanceID.NotFound`, the
//!   existing ones are looked up and terminated).
//! - **stop / start**: `StopInstances` / `StartInstances`, 1000 ids per call.
//!   An instance that is still pending (stop) or stopping (start) is waited
//!   for, up to [`AwsConfig::settle_timeout`]; unknown or terminated ids are
//!   [`ProviderError::NotFound`].
//! - **retag**: `CreateTags` and `DeleteTags`, 1000 ids per call.
//! - **put/get/delete_cluster_boot**: a launch template per cluster
//!   ([`boot_template_name`]) whose user data is the cluster's startup, so a
//!   pool instance drawn into the cluster reads it with its instance role
//!   (`CreateLaunchTemplate`, `CreateLaunchTemplateVersion` when it exists,
//!   `DescribeLaunchTemplateVersions` of `$Latest`, `DeleteLaunchTemplate`).
//! - **publish_runtime**: the runtime binary in S3 (`runtime_bucket`), see
//!   [`runtime_store`]: `HeadBucket`/`CreateBucket`/`PutBucketTagging`,
//!   `HeadObject`/`PutObject`, and a presigned `GetObject` URL.
//! - **public drivers** (`public_driver_cidrs`): drivers and pool instances
//!   are launched with a public IP and the project's access group, see
//!   [`driver_access`]. Instances report EC2's private and public IPs
//!   ([`motorpool_provider::NodeIps`]).
//!
//! The SDK's own retries are off: the engine's client retries throttling and
//! 5xx with backoff and counts them, and two retry layers would multiply.
//! Error codes map to [`ProviderError`] in [`errors`]: throttling, server,
//! capacity, quota, auth, not found, and invalid naming the spec field
//! (`provider.image`, `provider.subnet_ids`, ...).

mod catalog;
mod driver_access;
mod errors;
pub mod lock;
pub mod plugin;
mod runtime_store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
    VolumeType,
};
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, NodeType, Page, Provider, ProviderError, Result, Retag,
    TagFilter, Tags,
};
use sha2::{Digest, Sha256};

pub use aws_sdk_ec2;
pub use aws_sdk_ec2::config::Credentials;
pub use aws_sdk_s3;
pub use catalog::catalog;
pub use plugin::{AwsPlugin, AwsSettings};

use errors::{Ec2Error, from_sdk};

/// The provider kind.
pub const KIND: &str = "aws";

/// The image instances get when neither the spec nor the launch names one:
/// the latest Amazon Linux 2023 (x86_64), resolved by EC2 itself from AWS's
/// public SSM parameter at launch (no SSM client, no extra call).
pub const DEFAULT_IMAGE: &str =
    "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// The tag holding the client token of the launch that made an instance.
/// Provider bookkeeping: it is not reported in [`Instance::tags`].
pub const LAUNCH_TAG: &str = "motorpool-launch";

/// Instances per `DescribeInstances` page unless configured.
pub const DEFAULT_PAGE_SIZE: u32 = 500;

/// EC2's limit of instance ids in one Terminate/Stop/Start/CreateTags call.
pub const MAX_IDS_PER_CALL: usize = 1000;

/// Values per filter in the `instance-id` look-ups.
const MAX_FILTER_VALUES: usize = 200;

/// The states `list_page` asks for (see the crate docs).
const LISTED_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// The root device of images named by an SSM parameter, whose AMI is not
/// known before launch: Amazon Linux's (the default image's) root device.
const SSM_IMAGE_ROOT_DEVICE: &str = "/dev/xvda";

/// The provider's settings: the spec's `provider: { kind: aws, ... }` block.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// `None`: from the standard chain (`AWS_REGION`, the profile, ...).
    pub region: Option<String>,
    /// `None`: `AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL`, else the region's endpoint.
    pub endpoint_url: Option<String>,
    /// An AMI id (`ami-...`), an SSM parameter name (`/aws/service/...`) or
    /// `resolve:ssm:NAME`; `None`: [`DEFAULT_IMAGE`].
    pub image: Option<String>,
    /// Subnets to spread launches over; empty: the default VPC's choice.
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    /// An instance profile name, or its ARN.
    pub iam_instance_profile: Option<String>,
    pub key_name: Option<String>,
    /// Launch spot instances, falling back to on-demand when spot has no capacity.
    pub spot: bool,
    /// Size of the root volume (gp3) in GiB; `None`: the image's.
    pub root_volume_gb: Option<u32>,
    /// Extra tags on every instance and volume (keys must not start with
    /// `motorpool-` or `aws:`).
    pub tags: Tags,
    /// Instances per `DescribeInstances` page (5 to 1000).
    pub page_size: u32,
    /// Static credentials instead of the standard chain (tests, embedding).
    pub credentials: Option<Credentials>,
    /// How long stop/start wait for instances still pending or stopping.
    pub settle_timeout: Duration,
    /// The S3 bucket `apply` uploads the runtime to when the spec gives no
    /// `runtime_url` ([`Provider::publish_runtime`]).
    pub runtime_bucket: Option<String>,
    /// CIDRs that may reach drivers on a public address (see the settings).
    pub public_driver_cidrs: Vec<String>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            image: None,
            subnet_ids: Vec::new(),
            security_group_ids: Vec::new(),
            iam_instance_profile: None,
            key_name: None,
            spot: false,
            root_volume_gb: None,
            tags: Tags::new(),
            page_size: DEFAULT_PAGE_SIZE,
            credentials: None,
            settle_timeout: Duration::from_secs(300),
            runtime_bucket: None,
            public_driver_cidrs: Vec::new(),
        }
    }
}

/// The AWS provider. See the crate docs for how it uses EC2.
pub struct AwsProvider {
    config: AwsConfig,
    /// The default image, normalised (`resolve:ssm:` form for SSM parameters).
    image: String,
    catalog: Vec<NodeType>,
    client: tokio::sync::OnceCell<Client>,
    /// AMI id -> its root device name, for `root_volume_gb`.
    root_devices: Mutex<HashMap<String, String>>,
    /// Round-robin start subnet for launches without a token.
    next_subnet: AtomicUsize,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::invalid(Some(format!("provider.{field}")), message)
}

/// An image setting in the form `RunInstances` takes: AMI ids as they are,
/// SSM parameter names as `resolve:ssm:NAME`.
pub fn normalize_image(image: &str) -> Result<String> {
    check_image(image).map_err(|message| invalid("image", message))
}

/// [`normalize_image`], with the problem as a plain message (for spec checks).
pub fn check_image(image: &str) -> Result<String, String> {
    let image = image.trim();
    if let Some(rest) = image.strip_prefix("ami-") {
        if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(image.to_string());
        }
    } else if let Some(name) = image.strip_prefix("resolve:ssm:") {
        if !name.is_empty() && !name.contains(char::is_whitespace) {
            return Ok(image.to_string());
        }
    } else if image.starts_with('/') && image.len() > 1 && !image.contains(char::is_whitespace) {
        return Ok(format!("resolve:ssm:{image}"));
    }
    Err(format!(
        "`{image}` is neither an AMI id (ami-0123456789abcdef0) nor an SSM parameter \
         (/aws/service/... or resolve:ssm:NAME)"
    ))
}

/// `id` is `prefix` and hex digits (`subnet-0abc...`, `sg-...`).
pub fn is_resource_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()))
}

fn check_ids(field: &str, prefix: &str, ids: &[String]) -> Result<()> {
    for id in ids {
        if !is_resource_id(prefix, id) {
            return Err(invalid(
                field,
                format!("`{id}` is not an id of the form {prefix}0123456789abcdef0"),
            ));
        }
    }
    Ok(())
}

impl AwsProvider {
    /// Checks the settings; connects to nothing until the first call.
    pub fn new(config: AwsConfig) -> Result<Self> {
        if let Some(region) = &config.region {
            let ok = !region.is_empty()
                && region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(invalid(
                    "region",
                    format!("`{region}` is not an AWS region name (like us-east-1)"),
                ));
            }
        }
        if let Some(url) = &config.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "endpoint_url",
                format!("`{url}` is not an http:// or https:// URL"),
            ));
        }
        let image = normalize_image(config.image.as_deref().unwrap_or(DEFAULT_IMAGE))?;
        check_ids("subnet_ids", "subnet-", &config.subnet_ids)?;
        check_ids("security_group_ids", "sg-", &config.security_group_ids)?;
        if let Some(gb) = config.root_volume_gb
            && !(1..=16384).contains(&gb)
        {
            return Err(invalid(
                "root_volume_gb",
                format!("root_volume_gb must be between 1 and 16384, got {gb}"),
            ));
        }
        if !(5..=1000).contains(&config.page_size) {
            return Err(invalid(
                "page_size",
                format!(
                    "EC2 pages hold 5 to 1000 instances, got {}",
                    config.page_size
                ),
            ));
        }
        for (k, v) in &config.tags {
            if k.is_empty() || k.len() > 128 || v.len() > 256 {
                return Err(invalid(
                    "tags",
                    format!("tag `{k}`: keys have 1 to 128 characters, values at most 256"),
                ));
            }
            if k.starts_with("motorpool-") || k.to_ascii_lowercase().starts_with("aws:") {
                return Err(invalid(
                    "tags",
                    format!("tag `{k}`: keys starting with `motorpool-` or `aws:` are reserved"),
                ));
            }
        }
        Ok(AwsProvider {
            config,
            image,
            catalog: catalog(),
            client: tokio::sync::OnceCell::new(),
            root_devices: Mutex::new(HashMap::new()),
            next_subnet: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// The EC2 client (built on first use), for tests and tools.
    pub async fn ec2_client(&self) -> Result<Client> {
        self.client().await.cloned()
    }

    async fn client(&self) -> Result<&Client> {
        self.client
            .get_or_try_init(|| build_client(&self.config))
            .await
    }

    /// Every instance (any state) launched with `token`.
    async fn find_launched(&self, token: &str) -> Result<Vec<Instance>> {
        let filters = vec![filter(&format!("tag:{LAUNCH_TAG}"), [token])];
        self.describe_all(filters).await
    }

    /// Every instance matching `filters`, all pages.
    async fn describe_all(&self, filters: Vec<Filter>) -> Result<Vec<Instance>> {
        let client = self.client().await?;
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .max_results(1000)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| ProviderError::from(from_sdk("DescribeInstances", e)))?;
            all.extend(
                out.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(to_instance),
            );
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(all),
            }
        }
    }

    /// The state of each of `ids` that exists (terminated ones included).
    async fn states_of(&self, ids: &[String]) -> Result<BTreeMap<String, InstanceState>> {
        let mut states = BTreeMap::new();
        for chunk in ids.chunks(MAX_FILTER_VALUES) {
            let found = self
                .describe_all(vec![filter(
                    "instance-id",
                    chunk.iter().map(String::as_str),
                )])
                .await?;
            states.extend(found.into_iter().map(|i| (i.id, i.state)));
        }
        Ok(states)
    }

    /// The root device name of `image` (an AMI id or `resolve:ssm:` name).
    async fn root_device(&self, image: &str) -> Result<String> {
        if !image.starts_with("ami-") {
            return Ok(SSM_IMAGE_ROOT_DEVICE.to_string());
        }
        if let Some(known) = self.lock_root_devices().get(image) {
            return Ok(known.clone());
        }
        let client = self.client().await?;
        let out = client
            .describe_images()
            .image_ids(image)
            .send()
            .await
            .map_err(|e| ProviderError::from(from_sdk("DescribeImages", e)))?;
        let Some(found) = out.images().iter().find(|i| i.image_id() == Some(image)) else {
            return Err(invalid(
                "image",
                format!("EC2 DescribeImages: no image `{image}` in this region"),
            ));
        };
        let device = found
            .root_device_name()
            .unwrap_or(SSM_IMAGE_ROOT_DEVICE)
            .to_string();
        self.lock_root_devices()
            .insert(image.to_string(), device.clone());
        Ok(device)
    }

    fn lock_root_devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.root_devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The (spot?, subnet) attempts of a launch, in order.
    fn attempts(&self, token: Option<&str>) -> Vec<(bool, Option<String>)> {
        let subnets = &self.config.subnet_ids;
        let order: Vec<Option<String>> = if subnets.is_empty() {
            vec![None]
        } else {
            let start = match token {
                Some(t) => {
                    let d = Sha256::digest(t.as_bytes());
                    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) as usize
                }
                None => self.next_subnet.fetch_add(1, Ordering::Relaxed),
            } % subnets.len();
            (0..subnets.len())
                .map(|k| Some(subnets[(start + k) % subnets.len()].clone()))
                .collect()
        };
        let markets: &[bool] = if self.config.spot {
            &[true, false]
        } else {
            &[false]
        };
        markets
            .iter()
            .flat_map(|&spot| order.iter().map(move |s| (spot, s.clone())))
            .collect()
    }

    /// The project of a launch that gets a public address: drivers, and
    /// pool instances (a driver may be drawn from its pool), when
    /// `public_driver_cidrs` is set.
    fn public_driver_project<'r>(&self, request: &'r LaunchRequest) -> Option<&'r str> {
        if self.config.public_driver_cidrs.is_empty() {
            return None;
        }
        let tag = |k: &str| request.tags.get(k).map(String::as_str);
        let may_drive = tag(motorpool_provider::tags::ROLE) == Some("driver")
            || tag(motorpool_provider::tags::KIND) == Some("pool");
        may_drive
            .then(|| tag(motorpool_provider::tags::PROJECT))
            .flatten()
    }

    /// One `RunInstances` attempt of `launch` with this token, market and subnet.
    async fn run_instances(
        &self,
        launch: &Prepared<'_>,
        token: Option<String>,
        spot: bool,
        subnet: Option<String>,
    ) -> Result<Vec<Instance>, Ec2Error> {
        let Prepared {
            request,
            image,
            tags,
            root_device,
            access,
        } = launch;
        let client = self
            .client()
            .await
            .map_err(|error| Ec2Error { code: None, error })?;
        let count = i32::try_from(request.count).map_err(|_| Ec2Error {
            code: None,
            error: ProviderError::invalid(
                Some("count".to_string()),
                format!("cannot launch {} instances at once", request.count),
            ),
        })?;
        let tag_spec = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(tags.to_vec()))
                .build()
        };
        let mut req = client
            .run_instances()
            .image_id(image.as_str())
            .instance_type(InstanceType::from(request.node_type.as_str()))
            .min_count(count)
            .max_count(count)
            .set_client_token(token)
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume));
        if !request.user_data.is_empty() {
            req = req.user_data(aws_smithy_types::base64::encode(&request.user_data));
        }
        match access {
            // The subnet and groups then belong to the interface.
            Some(access) => req = req.network_interfaces(access.interface(subnet)),
            None => {
                req = req.set_subnet_id(subnet);
                if !self.config.security_group_ids.is_empty() {
                    req = req.set_security_group_ids(Some(self.config.security_group_ids.clone()));
                }
            }
        }
        if let Some(profile) = &self.config.iam_instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            req = req.iam_instance_profile(spec.build());
        }
        if let Some(key) = &self.config.key_name {
            req = req.key_name(key);
        }
        if spot {
            req = req.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        if let (Some(gb), Some(device)) = (self.config.root_volume_gb, root_device.as_deref()) {
            req = req.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(i32::try_from(gb).unwrap_or(i32::MAX))
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = req.send().await.map_err(|e| from_sdk("RunInstances", e))?;
        Ok(out.instances().iter().filter_map(to_instance).collect())
    }

    /// Stop or start `ids`, waiting for instances in the way (pending ones
    /// before a stop, stopping ones before a start).
    async fn change_state(&self, start: bool, ids: &[String]) -> Result<()> {
        let ids = unique(ids);
        if let Some(bad) = ids.iter().find(|id| !is_instance_id(id)) {
            return Err(ProviderError::NotFound(format!(
                "`{bad}` is not an EC2 instance id"
            )));
        }
        let client = self.client().await?;
        let (op, waits_for) = if start {
            ("StartInstances", InstanceState::Stopping)
        } else {
            ("StopInstances", InstanceState::Pending)
        };
        for chunk in ids.chunks(MAX_IDS_PER_CALL) {
            let deadline = Instant::now() + self.config.settle_timeout;
            loop {
                let sent = if start {
                    client
                        .start_instances()
                        .set_instance_ids(Some(chunk.to_vec()))
                        .send()
                        .await
                        .map(drop)
                        .map_err(|e| from_sdk(op, e))
                } else {
                    client
                        .stop_instances()
                        .set_instance_ids(Some(chunk.to_vec()))
                        .send()
                        .await
                        .map(drop)
                        .map_err(|e| from_sdk(op, e))
                };
                let err = match sent {
                    Ok(()) => break,
                    Err(e) if e.code.as_deref() == Some("IncorrectInstanceState") => e,
                    Err(e) => return Err(e.into()),
                };
                let states = self.states_of(chunk).await?;
                if let Some(gone) = chunk
                    .iter()
                    .find(|id| matches!(states.get(*id), None | Some(InstanceState::Terminated)))
                {
                    return Err(ProviderError::NotFound(format!(
                        "EC2 {op}: instance {gone} is terminated or unknown"
                    )));
                }
                let in_the_way = chunk.iter().any(|id| states.get(id) == Some(&waits_for));
                if !in_the_way || Instant::now() >= deadline {
                    return Err(err.into());
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Ok(())
    }
}

/// What every attempt of one launch sends alike.
struct Prepared<'a> {
    request: &'a LaunchRequest,
    /// In `RunInstances` form (see [`normalize_image`]).
    image: String,
    /// The request's tags, the spec's extra tags and the launch tag.
    tags: Vec<Tag>,
    /// Set when `root_volume_gb` is.
    root_device: Option<String>,
    /// Set for a public driver (or a pool instance that may become one).
    access: Option<driver_access::AccessGroups>,
}

/// An SDK client on the provider's settings: the standard credential and
/// region chains, rustls (ring) for TLS, no SDK retries, bounded timeouts.
/// An S3 client with the provider's settings (for the runtime upload; tests
/// read the bucket with it). With an endpoint override (an emulator such as
/// moto on 127.0.0.1) it addresses buckets by path, which emulators need.
pub async fn s3_client(config: &AwsConfig) -> Result<aws_sdk_s3::Client> {
    let sdk = sdk_config(config).await?;
    let s3 = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(config.endpoint_url.is_some())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(runtime_store::UPLOAD_TIMEOUT)
                .build(),
        )
        .build();
    Ok(aws_sdk_s3::Client::from_conf(s3))
}

async fn build_client(config: &AwsConfig) -> Result<Client> {
    Ok(Client::new(&sdk_config(config).await?))
}

/// The SDK settings every client of the provider shares: our HTTP client
/// (rustls on ring), no SDK retries, the region, endpoint and credentials.
async fn sdk_config(config: &AwsConfig) -> Result<aws_config::SdkConfig> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_smithy_http_client::tls;

    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(credentials) = &config.credentials {
        loader = loader.credentials_provider(credentials.clone());
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(invalid(
            "region",
            "no AWS region: set `region` in the provider block, or AWS_REGION, or a region in \
             the AWS profile",
        ));
    }
    Ok(sdk)
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(str::to_string).collect()))
        .build()
}

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The request's idempotency token as EC2 takes it (at most 64 printable
/// ASCII characters; longer or other tokens are hashed). `None`: no token.
pub fn client_token(token: &str) -> Option<String> {
    if token.is_empty() {
        None
    } else if token.len() <= 64 && token.bytes().all(|b| b.is_ascii_graphic()) {
        Some(token.to_string())
    } else {
        Some(format!("mp-{}", &sha_hex(token)[..48]))
    }
}

/// The token of fail-over attempt `attempt` of a launch with token `base`.
fn attempt_token(base: &str, attempt: usize) -> String {
    if attempt == 0 {
        base.to_string()
    } else {
        format!("mpf{attempt}-{}", &sha_hex(base)[..48])
    }
}

/// `i-` and 8 or 17 hex digits.
fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|rest| {
        matches!(rest.len(), 8 | 17) && rest.chars().all(|c| c.is_ascii_hexdigit())
    })
}

fn unique(ids: &[String]) -> Vec<String> {
    let mut v = ids.to_vec();
    v.sort();
    v.dedup();
    v
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// An EC2 instance as the engine sees it (the launch tag left out).
fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = i.instance_id()?.to_string();
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
            InstanceState::Terminated
        }
        _ => InstanceState::Pending,
    };
    let tags = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .filter(|(k, _)| k != LAUNCH_TAG)
        .collect();
    Some(Instance {
        id,
        node_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        image: i.image_id().unwrap_or_default().to_string(),
        state,
        tags,
        // Where the node's agent listens is not known to EC2: the agent
        // publishes it in its own tags (`motorpool-agent-address`).
        address: None,
        pid: None,
        ips: motorpool_provider::NodeIps {
            private: i.private_ip_address().map(str::to_string),
            public: i.public_ip_address().map(str::to_string),
        },
        launched_at: i
            .launch_time()
            .map(|t| u64::try_from(t.secs()).unwrap_or(0))
            .unwrap_or(0),
    })
}

/// The launch template holding cluster boot document `name` (see
/// [`Provider::put_cluster_boot`]): its user data is the document.
pub fn boot_template_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "().-/_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(110)
        .collect();
    format!("motorpool-boot-{safe}")
}

#[async_trait]
impl Provider for AwsProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn catalog(&self) -> &[NodeType] {
        &self.catalog
    }

    fn default_image(&self) -> String {
        self.image.clone()
    }

    /// EC2 refills its non-mutating request bucket at about 20 calls per second.
    async fn publish_runtime(
        &self,
        runtime: &motorpool_provider::RuntimeUpload,
    ) -> Result<Option<String>> {
        let Some(bucket) = &self.config.runtime_bucket else {
            return Ok(None);
        };
        let s3 = s3_client(&self.config).await?;
        runtime_store::publish(&s3, bucket, runtime).await.map(Some)
    }

    fn calls_per_second(&self) -> f64 {
        20.0
    }

    async fn list_page(&self, filter_tags: &TagFilter, page_token: Option<String>) -> Result<Page> {
        let client = self.client().await?;
        let mut filters: Vec<Filter> = filter_tags
            .iter()
            .map(|(k, v)| filter(&format!("tag:{k}"), [v.as_str()]))
            .collect();
        filters.push(filter("instance-state-name", LISTED_STATES));
        let out = client
            .describe_instances()
            .set_filters(Some(filters))
            .max_results(i32::try_from(self.config.page_size).unwrap_or(1000))
            .set_next_token(page_token)
            .send()
            .await
            .map_err(|e| ProviderError::from(from_sdk("DescribeInstances", e)))?;
        // EC2 tag filters treat `*` and `?` as wildcards: keep exact matches only.
        let instances = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(to_instance)
            .filter(|i| filter_tags.iter().all(|(k, v)| i.tag(k) == Some(v)))
            .collect();
        Ok(Page {
            instances,
            next_token: out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        })
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>> {
        if request.count == 0 {
            return Err(ProviderError::invalid(
                Some("count".to_string()),
                "a launch needs a count of at least 1",
            ));
        }
        let base = client_token(&request.client_token);
        if let Some(token) = &base {
            let mut found = self.find_launched(token).await?;
            // EC2 lists new instances with a short delay: wait for the whole batch.
            for _ in 0..5 {
                if found.is_empty() || found.len() >= request.count as usize {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                found = self.find_launched(token).await?;
            }
            if !found.is_empty() {
                return Ok(found);
            }
        }
        let image = match &request.image {
            Some(image) => normalize_image(image)?,
            None => self.image.clone(),
        };
        let root_device = match self.config.root_volume_gb {
            Some(_) => Some(self.root_device(&image).await?),
            None => None,
        };
        let mut all_tags = self.config.tags.clone();
        all_tags.extend(request.tags.clone());
        let mut tags: Vec<Tag> = all_tags.iter().map(|(k, v)| tag(k, v)).collect();
        if let Some(token) = &base {
            tags.push(tag(LAUNCH_TAG, token));
        }
        let access = match self.public_driver_project(request) {
            Some(project) => Some(
                driver_access::ensure(
                    self.client().await?,
                    project,
                    &self.config.public_driver_cidrs,
                    self.config.subnet_ids.first().map(String::as_str),
                    &self.config.security_group_ids,
                )
                .await?,
            ),
            None => None,
        };
        let prepared = Prepared {
            request,
            image,
            tags,
            root_device,
            access,
        };
        let attempts = self.attempts(base.as_deref());
        let mut failures: Vec<String> = Vec::new();
        let mut last: Option<Ec2Error> = None;
        for (n, (spot, subnet)) in attempts.iter().enumerate() {
            let token = base.as_deref().map(|b| attempt_token(b, n));
            match self
                .run_instances(&prepared, token, *spot, subnet.clone())
                .await
            {
                Ok(mut launched) => {
                    // (EC2 echoes the tags; fill them in when an emulator does not.)
                    for i in launched.iter_mut().filter(|i| i.tags.is_empty()) {
                        i.tags = all_tags.clone();
                    }
                    return Ok(launched);
                }
                Err(e)
                    if n + 1 < attempts.len()
                        && (e.is_capacity() || (*spot && e.spot_unavailable())) =>
                {
                    failures.push(format!(
                        "{} in {}: {}",
                        if *spot { "spot" } else { "on-demand" },
                        subnet.as_deref().unwrap_or("the default subnet"),
                        e.code.as_deref().unwrap_or("capacity")
                    ));
                    last = Some(e);
                }
                Err(e) => {
                    if failures.is_empty() {
                        return Err(e.into());
                    }
                    // Say what was tried before the final failure.
                    let tried = failures.join("; ");
                    return Err(match e.error {
                        ProviderError::Capacity(m) => {
                            ProviderError::Capacity(format!("{m} (also tried: {tried})"))
                        }
                        other => other,
                    });
                }
            }
        }
        Err(last.map(ProviderError::from).unwrap_or_else(|| {
            ProviderError::Internal("EC2 RunInstances: no launch was attempted".to_string())
        }))
    }

    /// `DescribeInstances` by instance id: one call for up to 200 ids.
    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>> {
        let mut found = Vec::new();
        for chunk in ids.chunks(MAX_FILTER_VALUES) {
            found.extend(
                self.describe_all(vec![filter(
                    "instance-id",
                    chunk.iter().map(String::as_str),
                )])
                .await?,
            );
        }
        Ok(found)
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        // Ids that are not EC2 instance ids cannot exist: nothing to terminate.
        let ids: Vec<String> = unique(ids)
            .into_iter()
            .filter(|id| is_instance_id(id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        for chunk in ids.chunks(MAX_IDS_PER_CALL) {
            let mut batch = chunk.to_vec();
            // At most a few rounds: ids vanish between the look-up and the call only rarely.
            for round in 0..3 {
                match client
                    .terminate_instances()
                    .set_instance_ids(Some(batch.clone()))
                    .send()
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        let e = from_sdk("TerminateInstances", e);
                        if !matches!(e.error, ProviderError::NotFound(_)) || round == 2 {
                            return Err(e.into());
                        }
                        // Some ids are gone already: terminate the others.
                        let states = self.states_of(&batch).await?;
                        batch.retain(|id| {
                            states
                                .get(id)
                                .is_some_and(|s| *s != InstanceState::Terminated)
                        });
                        if batch.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn stop(&self, ids: &[String]) -> Result<()> {
        self.change_state(false, ids).await
    }

    async fn start(&self, ids: &[String]) -> Result<()> {
        self.change_state(true, ids).await
    }

    /// `CreateLaunchTemplate`, or `CreateLaunchTemplateVersion` when it
    /// exists (readers take `$Latest`).
    async fn put_cluster_boot(&self, name: &str, document: &str) -> Result<()> {
        let client = self.client().await?;
        let template = boot_template_name(name);
        let data = || {
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .user_data(aws_smithy_types::base64::encode(document))
                .build()
        };
        let created = client
            .create_launch_template()
            .launch_template_name(&template)
            .launch_template_data(data())
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = from_sdk("CreateLaunchTemplate", e);
                if e.code.as_deref() != Some("InvalidLaunchTemplateName.AlreadyExistsException") {
                    return Err(e.into());
                }
                client
                    .create_launch_template_version()
                    .launch_template_name(&template)
                    .launch_template_data(data())
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| ProviderError::from(from_sdk("CreateLaunchTemplateVersion", e)))
            }
        }
    }

    /// `DescribeLaunchTemplateVersions` of `$Latest`.
    async fn get_cluster_boot(&self, name: &str) -> Result<Option<String>> {
        let client = self.client().await?;
        let out = client
            .describe_launch_template_versions()
            .launch_template_name(boot_template_name(name))
            .versions("$Latest")
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let e = from_sdk("DescribeLaunchTemplateVersions", e);
                let missing = e.code.as_deref().is_some_and(|c| c.contains("NotFound"))
                    || matches!(e.error, ProviderError::NotFound(_));
                return if missing { Ok(None) } else { Err(e.into()) };
            }
        };
        let Some(encoded) = out
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
            .and_then(|d| d.user_data())
        else {
            return Ok(None);
        };
        let bytes = aws_smithy_types::base64::decode(encoded).map_err(|e| {
            ProviderError::Internal(format!("the boot document of {name} is not base64: {e}"))
        })?;
        String::from_utf8(bytes).map(Some).map_err(|e| {
            ProviderError::Internal(format!("the boot document of {name} is not text: {e}"))
        })
    }

    /// `DeleteLaunchTemplate`. One that does not exist is fine: after a
    /// failed delete (a retried one whose first answer was lost, or one that
    /// never existed, which moto answers with `MissingParameter`), it is
    /// looked up, and only a template that still exists is an error.
    async fn delete_cluster_boot(&self, name: &str) -> Result<()> {
        let client = self.client().await?;
        let deleted = client
            .delete_launch_template()
            .launch_template_name(boot_template_name(name))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = from_sdk("DeleteLaunchTemplate", e);
                match self.get_cluster_boot(name).await {
                    Ok(None) => Ok(()),
                    _ => Err(e.into()),
                }
            }
        }
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()> {
        let ids = unique(ids);
        if let Some(bad) = ids.iter().find(|id| !is_instance_id(id)) {
            return Err(ProviderError::NotFound(format!(
                "`{bad}` is not an EC2 instance id"
            )));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let set: Vec<Tag> = change.set.iter().map(|(k, v)| tag(k, v)).collect();
        let remove: Vec<Tag> = change
            .remove
            .iter()
            .filter(|k| !change.set.contains_key(*k))
            .map(|k| Tag::builder().key(k).build())
            .collect();
        for chunk in ids.chunks(MAX_IDS_PER_CALL) {
            if !set.is_empty() {
                client
                    .create_tags()
                    .set_resources(Some(chunk.to_vec()))
                    .set_tags(Some(set.clone()))
                    .send()
                    .await
                    .map_err(|e| ProviderError::from(from_sdk("CreateTags", e)))?;
            }
            if !remove.is_empty() {
                client
                    .delete_tags()
                    .set_resources(Some(chunk.to_vec()))
                    .set_tags(Some(remove.clone()))
                    .send()
                    .await
                    .map_err(|e| ProviderError::from(from_sdk("DeleteTags", e)))?;
            }
        }
        Ok(())
    }

    // The project lock: a security group per project ([`lock`]).

    async fn try_lock(
        &self,
        project: &str,
        lock: &motorpool_provider::LockInfo,
    ) -> Result<motorpool_provider::LockAttempt> {
        lock::try_lock(self.client().await?, project, lock).await
    }

    async fn renew_lock(&self, project: &str, lock: &motorpool_provider::LockInfo) -> Result<()> {
        lock::renew_lock(self.client().await?, project, lock).await
    }

    async fn read_lock(&self, project: &str) -> Result<Option<motorpool_provider::LockInfo>> {
        lock::read_lock(self.client().await?, project).await
    }

    async fn unlock(&self, project: &str, id: &str) -> Result<()> {
        lock::unlock(self.client().await?, project, id).await
    }
}

#[cfg(test)]
mod tests;
