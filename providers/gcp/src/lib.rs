//! The GCP provider: Compute Engine instances through `google-cloud-compute-v1`,
//! found by their labels.
//!
//! Credentials come from Application Default Credentials
//! (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file, the metadata server),
//! never from the spec. With an `endpoint_url` on a loopback address and no
//! credentials file found, requests go anonymous, so a local stand-in of the
//! Compute API needs no key and nothing looks for a metadata server. The
//! clients are built on the first call, so a spec that is only validated
//! never touches the network.
//!
//! An instance's id is `ZONE/NAME` (instances are zonal; every call needs both).
//!
//! How each call maps to the Compute API:
//!
//! - **list_page**: one `instances.aggregatedList` page across all zones,
//!   filtered by the labels of the tag filter (see [`labels`]: tags that are
//!   no label are stored lossy as labels and exactly in metadata; only exact
//!   matches are returned). `maxResults` is the configured page size (at most
//!   500); the page token is the API's.
//! - **launch**: one `instances.bulkInsert` of `count` named instances with
//!   `minCount = count` (all or nothing), labelled at creation with the
//!   tags and `motorpool-launch` = a hash of the request's token, the user
//!   data as the `startup-script` metadata item, and a `requestId` (a UUID
//!   derived from the token), so a re-sent request is the same operation.
//!   The zone operation is waited on (`zoneOperations.wait`) and its `error`
//!   read: a zone out of capacity (`ZONE_RESOURCE_POOL_EXHAUSTED`) fails
//!   over to the next configured zone (with `spot: true`, every zone as spot
//!   first, then as standard), a quota error fails. Before launching,
//!   instances labelled with the token are looked up and returned when they
//!   exist, so a repeated launch (a retry after a lost answer, an apply run
//!   again after a kill) never makes a second batch.
//! - **describe**: `instances.get` per id (concurrently); 404 is "gone".
//! - **terminate / stop / start**: `instances.delete` / `stop` / `start` per
//!   instance (concurrently), each operation waited for. Gone instances are
//!   skipped by terminate; stop and start wait for an instance still on its
//!   way (`STOPPING`, `PROVISIONING`, ...) up to the settle timeout.
//! - **retag**: read-modify-write per instance: `setLabels` with the label
//!   fingerprint, `setMetadata` with the metadata fingerprint when a tag kept
//!   in metadata changes; a stale fingerprint (412) is read again and retried.
//! - **put/get/delete_cluster_boot**: an item `motorpool-boot-NAME` of the
//!   project's common instance metadata (`projects.setCommonInstanceMetadata`
//!   with its fingerprint), which every instance of the project can read.
//! - **try_lock / renew_lock / read_lock / unlock**: the project lock, an
//!   item `motorpool-lock-PROJECT` of the same metadata holding the lock as
//!   JSON, changed only by compare-and-swap on the metadata fingerprint
//!   (see [`lock`]).
//! - **publish_runtime**: the runtime binary in Cloud Storage
//!   (`runtime_bucket`) behind a V4 signed URL, see [`runtime_store`].
//!
//! The SDK's own retries are off: the engine retries throttling and 5xx with
//! backoff and counts them, and two retry layers would multiply. Errors map
//! to [`ProviderError`] in [`errors`].

mod catalog;
mod errors;
pub mod labels;
pub mod lock;
pub mod plugin;
pub mod runtime_store;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{StreamExt, TryStreamExt, stream};
use google_cloud_compute_v1::client::{GlobalOperations, Instances, Projects, ZoneOperations};
use google_cloud_compute_v1::model::{
    self as gce, AccessConfig, AttachedDisk, AttachedDiskInitializeParams,
    BulkInsertInstanceResource, BulkInsertInstanceResourcePerInstanceProperties,
    InstanceProperties, InstancesSetLabelsRequest, Metadata, NetworkInterface, Scheduling,
    ServiceAccount,
};
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, LockAttempt, LockInfo, NodeType, Page, Provider,
    ProviderError, Result, Retag, TagFilter, Tags,
};
use sha2::{Digest, Sha256};

pub use catalog::catalog;
pub use plugin::{GcpPlugin, GcpSettings};

use errors::{ApiError, OperationError};
use labels::{LAUNCH_LABEL, TAGS_ITEM};
use lock::{Edit, lock_item_key};

/// The provider kind.
pub const KIND: &str = "gcp";

/// The image instances get when neither the spec nor the launch names one.
pub const DEFAULT_IMAGE: &str = "projects/debian-cloud/global/images/family/debian-12";

/// The metadata item holding a node's user data: run by the guest agent at boot.
pub const STARTUP_SCRIPT_ITEM: &str = "startup-script";

/// The metadata item recording the image an instance was made from (the
/// Compute API reports only the boot disk, not the image it came from).
pub const IMAGE_ITEM: &str = "motorpool-image";

/// The project metadata item prefix of cluster boot documents.
pub const BOOT_ITEM_PREFIX: &str = "motorpool-boot-";

/// The longest one request may take (`zoneOperations.wait` answers within 2 minutes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// Instances per `aggregatedList` page unless configured (the API's maximum).
pub const DEFAULT_PAGE_SIZE: u32 = 500;

/// The scope instances get for their service account: access is then
/// governed by the account's IAM roles, as Google recommends.
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The provider's settings: the spec's `provider: { kind: gcp, ... }` block.
#[derive(Debug, Clone)]
pub struct GcpConfig {
    pub project: String,
    /// Zones to launch in, in order of preference; a launch fails over to the
    /// next on a capacity error. Never empty.
    pub zones: Vec<String>,
    pub network: Option<String>,
    pub subnetwork: Option<String>,
    /// An image URL (`projects/P/global/images/NAME` or `.../family/F`);
    /// `None`: [`DEFAULT_IMAGE`].
    pub image: Option<String>,
    /// The instances' service account email; `None`: the project's default.
    pub service_account: Option<String>,
    pub spot: bool,
    pub disk_size_gb: Option<u32>,
    /// `pd-balanced`, `pd-ssd`, `pd-standard`, ...; `None`: pd-balanced.
    pub disk_type: Option<String>,
    /// Network tags (firewall rules select instances by them).
    pub network_tags: Vec<String>,
    /// Extra labels on every instance.
    pub labels: Tags,
    /// Give instances an ephemeral public address (they then reach the
    /// internet without Cloud NAT).
    pub external_ip: bool,
    /// Another Compute API root (paths `/compute/v1/...` below it).
    pub endpoint_url: Option<String>,
    /// Instances per `aggregatedList` page (1 to 500).
    pub page_size: u32,
    /// How long stop/start wait for instances on their way to a state.
    pub settle_timeout: Duration,
    /// How long an operation is waited for.
    pub operation_timeout: Duration,
    /// Per-instance calls in flight at once.
    pub concurrency: usize,
    /// A Cloud Storage bucket of the project's where `apply` puts the
    /// runtime when the spec gives no `runtime_url` ([`Provider::publish_runtime`]).
    pub runtime_bucket: Option<String>,
}

impl GcpConfig {
    pub fn new(project: &str, zones: Vec<String>) -> GcpConfig {
        GcpConfig {
            project: project.to_string(),
            zones,
            network: None,
            subnetwork: None,
            image: None,
            service_account: None,
            spot: false,
            disk_size_gb: None,
            disk_type: None,
            network_tags: Vec::new(),
            labels: Tags::new(),
            external_ip: true,
            endpoint_url: None,
            page_size: DEFAULT_PAGE_SIZE,
            settle_timeout: Duration::from_secs(300),
            operation_timeout: Duration::from_secs(600),
            concurrency: 16,
            runtime_bucket: None,
        }
    }
}

struct Clients {
    instances: Instances,
    zone_operations: ZoneOperations,
    projects: Projects,
    global_operations: GlobalOperations,
}

/// The GCP provider. See the crate docs for how it uses the Compute API.
pub struct GcpProvider {
    config: GcpConfig,
    image: String,
    catalog: Vec<NodeType>,
    clients: tokio::sync::OnceCell<Clients>,
}

impl std::fmt::Debug for GcpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::invalid(Some(format!("provider.{field}")), message)
}

/// An image setting as the API takes it, or why it is not one.
pub fn check_image(image: &str) -> Result<String, String> {
    let image = image.trim();
    let path = image
        .strip_prefix("https://www.googleapis.com/compute/v1/")
        .unwrap_or(image);
    let parts: Vec<&str> = path.split('/').collect();
    let ok = match parts.as_slice() {
        ["projects", p, "global", "images", name] => !p.is_empty() && !name.is_empty(),
        ["projects", p, "global", "images", "family", f] => !p.is_empty() && !f.is_empty(),
        ["global", "images", name] => !name.is_empty(),
        _ => false,
    };
    if ok {
        Ok(image.to_string())
    } else {
        Err(format!(
            "`{image}` is not an image URL like projects/debian-cloud/global/images/family/debian-12"
        ))
    }
}

/// Whether `endpoint` names a loopback host (`127.0.0.0/8`, `::1`, `localhost`).
pub fn is_loopback_endpoint(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let host_port = rest.split('/').next().unwrap_or_default();
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether Application Default Credentials can be found without asking a
/// metadata server: `GOOGLE_APPLICATION_CREDENTIALS`, or gcloud's ADC file.
fn credentials_file_present() -> bool {
    if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    let config_dir = std::env::var_os("CLOUDSDK_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config/gcloud"))
        });
    config_dir.is_some_and(|d| d.join("application_default_credentials.json").is_file())
}

async fn build_clients(config: &GcpConfig) -> Result<Clients> {
    // TLS on rustls + ring, as the rest of motorpool (the crates are built
    // without their aws-lc default); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let anonymous = config
        .endpoint_url
        .as_deref()
        .is_some_and(is_loopback_endpoint)
        && !credentials_file_present();
    let credentials = if anonymous {
        google_cloud_auth::credentials::anonymous::Builder::new().build()
    } else {
        google_cloud_auth::credentials::Builder::default()
            .build()
            .map_err(|e| {
                ProviderError::Auth(format!(
                    "no Google Cloud credentials (Application Default Credentials): {e}"
                ))
            })?
    };
    macro_rules! client {
        ($client:ty) => {{
            let mut builder = <$client>::builder()
                .with_credentials(credentials.clone())
                .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
                // An answer that never comes is a failure to retry, not a hang.
                .with_attempt_timeout(REQUEST_TIMEOUT);
            if let Some(endpoint) = &config.endpoint_url {
                builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
            }
            builder.build().await.map_err(|e| {
                ProviderError::Internal(format!("cannot set up the Compute API client: {e}"))
            })?
        }};
    }
    Ok(Clients {
        instances: client!(Instances),
        zone_operations: client!(ZoneOperations),
        projects: client!(Projects),
        global_operations: client!(GlobalOperations),
    })
}

fn sha_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `motorpool-launch` label of a launch token.
pub fn launch_label(token: &str) -> String {
    sha_hex(token)[..40].to_string()
}

/// A UUID (the form `requestId` must have) derived from `seed`: the same
/// seed always gives the same request id.
pub fn request_id(seed: &str) -> String {
    let h = sha_hex(seed);
    // Version 4 and variant bits, so the API takes it as a well-formed UUID.
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// `ZONE/NAME`, split.
fn split_id(id: &str) -> Option<(&str, &str)> {
    let (zone, name) = id.split_once('/')?;
    (!zone.is_empty() && !name.is_empty() && !name.contains('/')).then_some((zone, name))
}

fn unique_ids(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
}

/// The last segment of a resource URL (`.../zones/us-central1-a` -> `us-central1-a`).
fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

fn metadata_item<'a>(metadata: Option<&'a Metadata>, key: &str) -> Option<&'a str> {
    metadata?
        .items
        .iter()
        .find(|i| i.key.as_deref() == Some(key))
        .and_then(|i| i.value.as_deref())
}

/// Unix seconds of an RFC 3339 timestamp (`2026-11-30T09:15:02.123-08:00`).
pub fn unix_seconds(timestamp: &str) -> Option<u64> {
    let (date, rest) = timestamp.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time_end = rest.find(['Z', '+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(time_end);
    let mut t = time.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: i64 = t.next()?.split('.').next()?.parse().ok()?;
    let offset = match zone.as_bytes().first() {
        Some(b'+') | Some(b'-') => {
            let (oh, om) = zone[1..].split_once(':')?;
            let secs = oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60;
            if zone.starts_with('-') { -secs } else { secs }
        }
        _ => 0,
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's method.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss - offset).ok()
}

fn state_of(status: Option<&gce::instance::Status>) -> InstanceState {
    use gce::instance::Status as S;
    match status {
        Some(S::Running) => InstanceState::Running,
        Some(S::Stopping | S::Suspending | S::PendingStop) => InstanceState::Stopping,
        Some(S::Terminated | S::Stopped | S::Suspended) => InstanceState::Stopped,
        Some(S::Deprovisioning) => InstanceState::Terminated,
        _ => InstanceState::Pending,
    }
}

/// The engine's view of a Compute instance; `None` when it has no name or zone.
fn to_instance(i: &gce::Instance) -> Option<Instance> {
    let name = i.name.as_deref()?;
    let zone = last_segment(i.zone.as_deref()?);
    let tags = labels::decode(&i.labels, metadata_item(i.metadata.as_ref(), TAGS_ITEM));
    Some(Instance {
        id: format!("{zone}/{name}"),
        node_type: i
            .machine_type
            .as_deref()
            .map(last_segment)
            .unwrap_or_default()
            .to_string(),
        image: metadata_item(i.metadata.as_ref(), IMAGE_ITEM)
            .unwrap_or_default()
            .to_string(),
        state: state_of(i.status.as_ref()),
        tags,
        // Where the node's agent listens is not the API's to say: the agent
        // publishes it (`motorpool-agent-address`) with its progress.
        address: None,
        pid: None,
        ips: motorpool_provider::NodeIps {
            private: i
                .network_interfaces
                .first()
                .and_then(|n| n.network_ip.clone()),
            public: i
                .network_interfaces
                .first()
                .and_then(|n| n.access_configs.first())
                .and_then(|a| a.nat_ip.clone()),
        },
        launched_at: i
            .creation_timestamp
            .as_deref()
            .and_then(unix_seconds)
            .unwrap_or(0),
    })
}

fn is_done(op: &gce::Operation) -> bool {
    matches!(op.status, Some(gce::operation::Status::Done))
}

impl GcpProvider {
    pub fn new(config: GcpConfig) -> Result<GcpProvider> {
        if config.project.is_empty() {
            return Err(invalid("project", "a GCP project id is required"));
        }
        if config.zones.is_empty() {
            return Err(invalid("zone", "at least one zone is required"));
        }
        let image = match &config.image {
            Some(image) => check_image(image).map_err(|m| invalid("image", m))?,
            None => DEFAULT_IMAGE.to_string(),
        };
        Ok(GcpProvider {
            config,
            image,
            catalog: catalog(),
            clients: tokio::sync::OnceCell::new(),
        })
    }

    pub fn config(&self) -> &GcpConfig {
        &self.config
    }

    async fn clients(&self) -> Result<&Clients> {
        self.clients
            .get_or_try_init(|| build_clients(&self.config))
            .await
    }

    /// Wait for zone operation `op` to finish; its failure as an error.
    async fn wait_zone(&self, call: &str, zone: &str, op: gce::Operation) -> Result<()> {
        let clients = self.clients().await?;
        let deadline = Instant::now() + self.config.operation_timeout;
        let mut op = op;
        let mut attempt = 0;
        while !is_done(&op) {
            let Some(name) = op.name.clone() else {
                return Err(ProviderError::Internal(format!(
                    "{call}: the API answered with an operation without a name"
                )));
            };
            if Instant::now() > deadline {
                return Err(ProviderError::Server(format!(
                    "{call}: operation {name} did not finish in {} s",
                    self.config.operation_timeout.as_secs()
                )));
            }
            match clients
                .zone_operations
                .wait()
                .set_project(&self.config.project)
                .set_zone(zone)
                .set_operation(&name)
                .send()
                .await
            {
                Ok(next) => {
                    op = next;
                    attempt = 0;
                }
                Err(e) => {
                    let e: ProviderError = ApiError::from_gax("zoneOperations.wait", &e).into();
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    // A lost or refused wait says nothing about the operation: ask again.
                    attempt += 1;
                    tokio::time::sleep(motorpool_provider::backoff_delay(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                        fastrand::f64(),
                    ))
                    .await;
                }
            }
        }
        match OperationError::from_operation(call, &op) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Wait for global operation `op` (project metadata changes).
    async fn wait_global(&self, call: &str, op: gce::Operation) -> Result<()> {
        let clients = self.clients().await?;
        let deadline = Instant::now() + self.config.operation_timeout;
        let mut op = op;
        while !is_done(&op) {
            let Some(name) = op.name.clone() else {
                return Err(ProviderError::Internal(format!(
                    "{call}: the API answered with an operation without a name"
                )));
            };
            if Instant::now() > deadline {
                return Err(ProviderError::Server(format!(
                    "{call}: operation {name} did not finish"
                )));
            }
            op = clients
                .global_operations
                .wait()
                .set_project(&self.config.project)
                .set_operation(&name)
                .send()
                .await
                .map_err(|e| {
                    ProviderError::from(ApiError::from_gax("globalOperations.wait", &e))
                })?;
        }
        match OperationError::from_operation(call, &op) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Every page of `aggregatedList` for `filter` (a Compute filter expression).
    async fn list_all(&self, filter: &str) -> Result<Vec<gce::Instance>> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let (page, next) = self.aggregated_page(filter, token).await?;
            found.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(found),
            }
        }
    }

    async fn aggregated_page(
        &self,
        filter: &str,
        token: Option<String>,
    ) -> Result<(Vec<gce::Instance>, Option<String>)> {
        let clients = self.clients().await?;
        let mut call = clients
            .instances
            .aggregated_list()
            .set_project(&self.config.project)
            .set_max_results(self.config.page_size);
        if !filter.is_empty() {
            call = call.set_filter(filter);
        }
        if let Some(token) = token {
            call = call.set_page_token(token);
        }
        let list = call
            .send()
            .await
            .map_err(|e| ProviderError::from(ApiError::from_gax("instances.aggregatedList", &e)))?;
        let mut instances: Vec<gce::Instance> = Vec::new();
        // Zones in a stable order, so a page reads the same every time.
        let mut scopes: Vec<_> = list.items.into_iter().collect();
        scopes.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, scoped) in scopes {
            instances.extend(scoped.instances);
        }
        Ok((instances, list.next_page_token.filter(|t| !t.is_empty())))
    }

    async fn find_launched(&self, label: &str) -> Result<Vec<Instance>> {
        let filter = format!("(labels.{LAUNCH_LABEL} = \"{label}\")");
        Ok(self
            .list_all(&filter)
            .await?
            .iter()
            .filter(|i| i.labels.get(LAUNCH_LABEL).map(String::as_str) == Some(label))
            .filter_map(to_instance)
            .filter(|i| i.state != InstanceState::Terminated)
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<gce::Instance>> {
        let Some((zone, name)) = split_id(id) else {
            return Ok(None);
        };
        let clients = self.clients().await?;
        match clients
            .instances
            .get()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .send()
            .await
        {
            Ok(i) => Ok(Some(i)),
            Err(e) => {
                let e = ApiError::from_gax("instances.get", &e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// What every instance of a launch is made from.
    fn instance_properties(
        &self,
        request: &LaunchRequest,
        image: &str,
        encoded: &labels::Encoded,
        spot: bool,
    ) -> InstanceProperties {
        let mut items = vec![
            gce::metadata::Items::new()
                .set_key(STARTUP_SCRIPT_ITEM)
                .set_value(request.user_data.clone()),
            gce::metadata::Items::new()
                .set_key(IMAGE_ITEM)
                .set_value(image.to_string()),
        ];
        if let Some(exact) = encoded.metadata_value() {
            items.push(
                gce::metadata::Items::new()
                    .set_key(TAGS_ITEM)
                    .set_value(exact),
            );
        }
        let mut init = AttachedDiskInitializeParams::new().set_source_image(image.to_string());
        if let Some(gb) = self.config.disk_size_gb {
            init = init.set_disk_size_gb(i64::from(gb));
        }
        if let Some(disk_type) = &self.config.disk_type {
            init = init.set_disk_type(disk_type.clone());
        }
        let disk = AttachedDisk::new()
            .set_boot(true)
            .set_auto_delete(true)
            .set_initialize_params(init);
        let mut nic = NetworkInterface::new();
        if let Some(network) = &self.config.network {
            nic = nic.set_network(network.clone());
        }
        if let Some(subnetwork) = &self.config.subnetwork {
            nic = nic.set_subnetwork(subnetwork.clone());
        }
        if self.config.external_ip {
            nic = nic.set_access_configs([AccessConfig::new()
                .set_name("External NAT")
                .set_type(gce::access_config::Type::OneToOneNat)]);
        }
        let mut scheduling = Scheduling::new();
        if spot {
            scheduling = scheduling
                .set_provisioning_model(gce::scheduling::ProvisioningModel::Spot)
                .set_instance_termination_action(gce::scheduling::InstanceTerminationAction::Delete)
                .set_automatic_restart(false);
        }
        let mut account = ServiceAccount::new().set_scopes([CLOUD_PLATFORM_SCOPE]);
        if let Some(email) = &self.config.service_account {
            account = account.set_email(email.clone());
        }
        let mut properties = InstanceProperties::new()
            .set_machine_type(request.node_type.clone())
            .set_labels(encoded.labels.clone())
            .set_metadata(Metadata::new().set_items(items))
            .set_disks([disk])
            .set_network_interfaces([nic])
            .set_scheduling(scheduling)
            .set_service_accounts([account]);
        if !self.config.network_tags.is_empty() {
            properties =
                properties.set_tags(gce::Tags::new().set_items(self.config.network_tags.clone()));
        }
        properties
    }

    /// The (spot, zone) attempts of a launch, the first zone chosen by the
    /// token so launches spread over the zones.
    fn attempts(&self, label: &str) -> Vec<(bool, String)> {
        let zones = &self.config.zones;
        let start = usize::from_str_radix(&label[..8], 16).unwrap_or(0) % zones.len();
        let ordered: Vec<String> = zones[start..]
            .iter()
            .chain(zones[..start].iter())
            .cloned()
            .collect();
        let mut attempts: Vec<(bool, String)> = Vec::new();
        if self.config.spot {
            attempts.extend(ordered.iter().map(|z| (true, z.clone())));
        }
        attempts.extend(ordered.into_iter().map(|z| (false, z)));
        attempts
    }

    /// One bulkInsert in one zone, waited for; the instances it made.
    async fn bulk_insert(
        &self,
        request: &LaunchRequest,
        label: &str,
        attempt: usize,
        zone: &str,
        properties: InstanceProperties,
    ) -> Result<Vec<Instance>> {
        let clients = self.clients().await?;
        let names: Vec<String> = (0..request.count)
            .map(|i| format!("mp-{}-{attempt}-{i}", &label[..16]))
            .collect();
        let per_instance: HashMap<String, BulkInsertInstanceResourcePerInstanceProperties> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    BulkInsertInstanceResourcePerInstanceProperties::new().set_name(n.clone()),
                )
            })
            .collect();
        let body = BulkInsertInstanceResource::new()
            .set_count(i64::from(request.count))
            .set_min_count(i64::from(request.count))
            .set_per_instance_properties(per_instance)
            .set_instance_properties(properties);
        let sent = clients
            .instances
            .bulk_insert()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_request_id(request_id(&format!("{label}/{attempt}")))
            .set_body(body)
            .send()
            .await;
        let op = match sent {
            Ok(op) => op,
            Err(e) => {
                let e = ApiError::from_gax("instances.bulkInsert", &e);
                if e.is_already_exists() {
                    return self.find_launched(label).await;
                }
                return Err(e.into());
            }
        };
        self.wait_zone("instances.bulkInsert", zone, op).await?;
        let mut made = self.find_launched(label).await?;
        // The list can trail the operation briefly: wait for the whole batch.
        for _ in 0..10 {
            if made.len() >= request.count as usize {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            made = self.find_launched(label).await?;
        }
        Ok(made)
    }

    /// Run `calls` (one per instance), `concurrency` at a time; the first error wins.
    async fn run_all(&self, calls: Vec<BoxFuture<'_, Result<()>>>) -> Result<()> {
        stream::iter(calls)
            .buffer_unordered(self.config.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    async fn delete_one(&self, zone: &str, name: &str) -> Result<()> {
        let clients = self.clients().await?;
        let sent = clients
            .instances
            .delete()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .set_request_id(request_id(&format!("delete/{zone}/{name}")))
            .send()
            .await;
        match sent {
            Ok(op) => match self.wait_zone("instances.delete", zone, op).await {
                Err(ProviderError::NotFound(_)) => Ok(()),
                other => other,
            },
            Err(e) => {
                let e = ApiError::from_gax("instances.delete", &e);
                if e.is_not_found() {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// Stop or start one instance, waiting for it to settle first.
    async fn change_state(&self, start: bool, zone: &str, name: &str) -> Result<()> {
        use gce::instance::Status as S;
        let clients = self.clients().await?;
        let id = format!("{zone}/{name}");
        let deadline = Instant::now() + self.config.settle_timeout;
        loop {
            let Some(instance) = self.get(&id).await? else {
                return Err(ProviderError::NotFound(format!("instance {id}")));
            };
            let status = instance.status.clone();
            let settled = match (start, &status) {
                (true, Some(S::Running | S::Provisioning | S::Staging)) => return Ok(()),
                (false, Some(S::Terminated | S::Stopped)) => return Ok(()),
                (true, Some(S::Terminated | S::Stopped | S::Suspended)) => true,
                (false, Some(S::Running)) => true,
                _ => false,
            };
            if settled {
                break;
            }
            if Instant::now() > deadline {
                return Err(ProviderError::Server(format!(
                    "instance {id} did not settle (still {:?})",
                    status
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (call, sent) = if start {
            (
                "instances.start",
                clients
                    .instances
                    .start()
                    .set_project(&self.config.project)
                    .set_zone(zone)
                    .set_instance(name)
                    .send()
                    .await,
            )
        } else {
            (
                "instances.stop",
                clients
                    .instances
                    .stop()
                    .set_project(&self.config.project)
                    .set_zone(zone)
                    .set_instance(name)
                    .send()
                    .await,
            )
        };
        let op = sent.map_err(|e| ProviderError::from(ApiError::from_gax(call, &e)))?;
        self.wait_zone(call, zone, op).await
    }

    /// Apply `change` to one instance's labels and metadata, with fingerprints.
    ///
    /// Labels and metadata cannot change in one call, and a reader between
    /// two calls must never see a lossy label without its exact value (a
    /// worker would dial `10_0_0_5_7077`). So it goes in three steps, each
    /// from a fresh read: first the metadata gains the new exact values
    /// (keeping the old ones), then the labels change, then the metadata
    /// drops what is no longer needed. Every intermediate state reads as the
    /// old or the new value of each tag. A stale fingerprint (someone else
    /// changed the instance meanwhile) is read again.
    async fn retag_one(&self, zone: &str, name: &str, change: &Retag) -> Result<()> {
        let id = format!("{zone}/{name}");
        for _ in 0..16 {
            let Some(instance) = self.get(&id).await? else {
                return Err(ProviderError::NotFound(format!("instance {id}")));
            };
            let exact_item = metadata_item(instance.metadata.as_ref(), TAGS_ITEM);
            let current_exact: Tags = exact_item
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            let mut next = labels::decode(&instance.labels, exact_item);
            for key in &change.remove {
                next.remove(key);
            }
            next.extend(change.set.clone());
            let launch = instance.labels.get(LAUNCH_LABEL).cloned();
            let extra: Vec<(&str, &str)> = launch
                .as_deref()
                .map(|l| vec![(LAUNCH_LABEL, l)])
                .unwrap_or_default();
            let encoded =
                labels::encode(&next, &extra).map_err(|m| ProviderError::invalid(None, m))?;
            let current_labels: BTreeMap<String, String> =
                instance.labels.clone().into_iter().collect();
            let step = if encoded.labels != current_labels {
                let mut union = current_exact.clone();
                union.extend(encoded.exact.clone());
                if union != current_exact {
                    self.set_instance_metadata(zone, name, &instance, &union)
                        .await?
                } else {
                    self.set_instance_labels(zone, name, &instance, &encoded.labels)
                        .await?
                }
            } else if encoded.exact != current_exact {
                self.set_instance_metadata(zone, name, &instance, &encoded.exact)
                    .await?
            } else {
                return Ok(());
            };
            if step == Written::Stale {
                // Someone changed the instance between our read and write.
                tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..100))).await;
            }
        }
        Err(ProviderError::Server(format!(
            "instance {id}: its labels kept changing under a retag"
        )))
    }

    async fn set_instance_labels(
        &self,
        zone: &str,
        name: &str,
        instance: &gce::Instance,
        labels: &BTreeMap<String, String>,
    ) -> Result<Written> {
        let clients = self.clients().await?;
        let body = InstancesSetLabelsRequest::new()
            .set_labels(labels.clone())
            .set_label_fingerprint(instance.label_fingerprint.clone().unwrap_or_default());
        let sent = clients
            .instances
            .set_labels()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .set_body(body)
            .send()
            .await;
        self.written("instances.setLabels", zone, sent).await
    }

    /// Replace the [`TAGS_ITEM`] metadata item (the other items stay).
    async fn set_instance_metadata(
        &self,
        zone: &str,
        name: &str,
        instance: &gce::Instance,
        exact: &Tags,
    ) -> Result<Written> {
        let clients = self.clients().await?;
        let metadata = instance.metadata.clone().unwrap_or_default();
        let mut items: Vec<gce::metadata::Items> = metadata
            .items
            .into_iter()
            .filter(|i| i.key.as_deref() != Some(TAGS_ITEM))
            .collect();
        if !exact.is_empty() {
            let value = serde_json::to_string(exact)
                .map_err(|e| ProviderError::Internal(format!("tags as JSON: {e}")))?;
            items.push(
                gce::metadata::Items::new()
                    .set_key(TAGS_ITEM)
                    .set_value(value),
            );
        }
        let body = Metadata::new()
            .set_items(items)
            .set_fingerprint(metadata.fingerprint.unwrap_or_default());
        let sent = clients
            .instances
            .set_metadata()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .set_body(body)
            .send()
            .await;
        self.written("instances.setMetadata", zone, sent).await
    }

    /// The outcome of a fingerprinted write: done (its operation waited
    /// for), or refused as stale.
    async fn written(
        &self,
        call: &str,
        zone: &str,
        sent: google_cloud_compute_v1::Result<gce::Operation>,
    ) -> Result<Written> {
        match sent {
            Ok(op) => {
                self.wait_zone(call, zone, op).await?;
                Ok(Written::Done)
            }
            Err(e) => {
                let e = ApiError::from_gax(call, &e);
                if e.is_stale_fingerprint() {
                    Ok(Written::Stale)
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// The project's common metadata item `key`, if set.
    async fn project_item(&self, key: &str) -> Result<Option<String>> {
        let clients = self.clients().await?;
        let project = clients
            .projects
            .get()
            .set_project(&self.config.project)
            .send()
            .await
            .map_err(|e| ProviderError::from(ApiError::from_gax("projects.get", &e)))?;
        Ok(metadata_item(project.common_instance_metadata.as_ref(), key).map(str::to_string))
    }

    /// Set the project's common metadata item `key` to `value` (`None`: remove it).
    async fn set_project_item(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.edit_project_item(key, |current| {
            Ok(if current == value {
                Edit::Keep(())
            } else {
                Edit::Write(value.map(str::to_string), ())
            })
        })
        .await
    }

    /// Compare-and-swap on the project's common metadata item `key`: read
    /// the metadata and its fingerprint, let `decide` choose from the item's
    /// value, and write with that fingerprint. A write refused as stale
    /// (someone changed the metadata since the read) is read and decided
    /// again, so what `decide` saw is what the write replaced. The other
    /// items stay as they are.
    async fn edit_project_item<T>(
        &self,
        key: &str,
        mut decide: impl FnMut(Option<&str>) -> Result<Edit<T>>,
    ) -> Result<T> {
        let clients = self.clients().await?;
        let deadline = Instant::now() + self.config.operation_timeout;
        let mut round: u32 = 0;
        loop {
            let project = clients
                .projects
                .get()
                .set_project(&self.config.project)
                .send()
                .await
                .map_err(|e| ProviderError::from(ApiError::from_gax("projects.get", &e)))?;
            let metadata = project.common_instance_metadata.unwrap_or_default();
            let (value, answer) = match decide(metadata_item(Some(&metadata), key))? {
                Edit::Keep(answer) => return Ok(answer),
                Edit::Write(value, answer) => (value, answer),
            };
            let mut items: Vec<gce::metadata::Items> = metadata
                .items
                .iter()
                .filter(|i| i.key.as_deref() != Some(key))
                .cloned()
                .collect();
            if let Some(value) = value {
                items.push(gce::metadata::Items::new().set_key(key).set_value(value));
            }
            let body = Metadata::new()
                .set_items(items)
                .set_fingerprint(metadata.fingerprint.clone().unwrap_or_default());
            match clients
                .projects
                .set_common_instance_metadata()
                .set_project(&self.config.project)
                .set_body(body)
                .send()
                .await
            {
                Ok(op) => {
                    self.wait_global("projects.setCommonInstanceMetadata", op)
                        .await?;
                    return Ok(answer);
                }
                Err(e) => {
                    let e = ApiError::from_gax("projects.setCommonInstanceMetadata", &e);
                    if !e.is_stale_fingerprint() {
                        return Err(e.into());
                    }
                }
            }
            // Stale: another change came first (its operation may still be
            // running, and the metadata reads as before it until it is done).
            if Instant::now() > deadline {
                return Err(ProviderError::Server(format!(
                    "the project's metadata kept changing under an update of `{key}`"
                )));
            }
            round += 1;
            let pause = 20 * u64::from(round.min(10)) + fastrand::u64(0..50);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

/// How a fingerprinted write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Done,
    Stale,
}

/// A project metadata key: `prefix` and `name`, with what keys may not hold
/// (anything but letters, digits, `-` and `_`) as `_`, at most 128 bytes.
pub(crate) fn item_key(prefix: &str, name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(128 - prefix.len())
        .collect();
    format!("{prefix}{safe}")
}

/// The project metadata key of cluster boot document `name`.
pub fn boot_item_key(name: &str) -> String {
    item_key(BOOT_ITEM_PREFIX, name)
}

#[async_trait]
impl Provider for GcpProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn catalog(&self) -> &[NodeType] {
        &self.catalog
    }

    fn default_image(&self) -> String {
        self.image.clone()
    }

    async fn publish_runtime(
        &self,
        runtime: &motorpool_provider::RuntimeUpload,
    ) -> Result<Option<String>> {
        let Some(bucket) = &self.config.runtime_bucket else {
            return Ok(None);
        };
        runtime_store::publish(&self.config.project, bucket, runtime)
            .await
            .map(Some)
    }

    /// Compute's default read and write quotas are per minute (about 20 per
    /// second each per project and region).
    fn calls_per_second(&self) -> f64 {
        20.0
    }

    async fn list_page(&self, filter: &TagFilter, page_token: Option<String>) -> Result<Page> {
        let (page, next_token) = self
            .aggregated_page(&labels::filter_expression(filter), page_token)
            .await?;
        Ok(Page {
            instances: page
                .iter()
                .filter_map(to_instance)
                .filter(|i| labels::matches(&i.tags, filter))
                .collect(),
            next_token,
        })
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>> {
        let ids = unique_ids(ids);
        let calls: Vec<_> = ids.iter().map(|id| self.get(id).boxed()).collect();
        let found: Vec<Option<gce::Instance>> = stream::iter(calls)
            .buffered(self.config.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(found.iter().flatten().filter_map(to_instance).collect())
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>> {
        if request.count == 0 {
            return Err(ProviderError::invalid(
                Some("count".to_string()),
                "a launch needs a count of at least 1",
            ));
        }
        let token = if request.client_token.is_empty() {
            format!("untokened-{}", fastrand::u64(..))
        } else {
            request.client_token.clone()
        };
        let label = launch_label(&token);
        let found = self.find_launched(&label).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        let image = match &request.image {
            Some(image) => check_image(image).map_err(|m| invalid("image", m))?,
            None => self.image.clone(),
        };
        let mut all_tags = self.config.labels.clone();
        all_tags.extend(request.tags.clone());
        let encoded = labels::encode(&all_tags, &[(LAUNCH_LABEL, &label)])
            .map_err(|m| ProviderError::invalid(None, m))?;
        let attempts = self.attempts(&label);
        let mut tried: Vec<String> = Vec::new();
        for (n, (spot, zone)) in attempts.iter().enumerate() {
            let properties = self.instance_properties(request, &image, &encoded, *spot);
            match self.bulk_insert(request, &label, n, zone, properties).await {
                Ok(made) => return Ok(made),
                Err(ProviderError::Capacity(message)) if n + 1 < attempts.len() => {
                    tried.push(format!(
                        "{} in {zone}: {message}",
                        if *spot { "spot" } else { "standard" }
                    ));
                }
                Err(ProviderError::Capacity(message)) if !tried.is_empty() => {
                    return Err(ProviderError::Capacity(format!(
                        "{message} (also tried: {})",
                        tried.join("; ")
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::Internal(
            "instances.bulkInsert: no launch was attempted".to_string(),
        ))
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        let ids = unique_ids(ids);
        let calls = ids
            .iter()
            .filter_map(|id| split_id(id))
            .map(|(zone, name)| self.delete_one(zone, name).boxed())
            .collect();
        self.run_all(calls).await
    }

    async fn stop(&self, ids: &[String]) -> Result<()> {
        let ids = unique_ids(ids);
        let calls = ids
            .iter()
            .filter_map(|id| split_id(id))
            .map(|(zone, name)| self.change_state(false, zone, name).boxed())
            .collect();
        self.run_all(calls).await
    }

    async fn start(&self, ids: &[String]) -> Result<()> {
        let ids = unique_ids(ids);
        let calls = ids
            .iter()
            .filter_map(|id| split_id(id))
            .map(|(zone, name)| self.change_state(true, zone, name).boxed())
            .collect();
        self.run_all(calls).await
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()> {
        let ids = unique_ids(ids);
        if let Some(bad) = ids.iter().find(|id| split_id(id).is_none()) {
            return Err(ProviderError::NotFound(format!(
                "`{bad}` is not a GCP instance id (ZONE/NAME)"
            )));
        }
        let calls = ids
            .iter()
            .filter_map(|id| split_id(id))
            .map(|(zone, name)| self.retag_one(zone, name, change).boxed())
            .collect();
        self.run_all(calls).await
    }

    async fn put_cluster_boot(&self, name: &str, document: &str) -> Result<()> {
        self.set_project_item(&boot_item_key(name), Some(document))
            .await
    }

    async fn get_cluster_boot(&self, name: &str) -> Result<Option<String>> {
        self.project_item(&boot_item_key(name)).await
    }

    async fn delete_cluster_boot(&self, name: &str) -> Result<()> {
        self.set_project_item(&boot_item_key(name), None).await
    }

    async fn try_lock(&self, project: &str, lock: &LockInfo) -> Result<LockAttempt> {
        self.edit_project_item(&lock_item_key(project), |current| {
            lock::take(current, lock, lock::now())
        })
        .await
    }

    async fn renew_lock(&self, project: &str, lock: &LockInfo) -> Result<()> {
        self.edit_project_item(&lock_item_key(project), |current| {
            lock::renew(current, project, lock)
        })
        .await
    }

    async fn read_lock(&self, project: &str) -> Result<Option<LockInfo>> {
        Ok(self
            .project_item(&lock_item_key(project))
            .await?
            .as_deref()
            .map(lock::parse))
    }

    async fn unlock(&self, project: &str, id: &str) -> Result<()> {
        self.edit_project_item(&lock_item_key(project), |current| {
            lock::remove(current, project, id)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zone_slash_name() {
        assert_eq!(
            split_id("us-central1-a/mp-1"),
            Some(("us-central1-a", "mp-1"))
        );
        assert_eq!(split_id("mp-1"), None);
        assert_eq!(split_id("a/b/c"), None);
    }

    #[test]
    fn request_ids_are_stable_uuids() {
        let id = request_id("token/0");
        assert_eq!(id, request_id("token/0"));
        assert_ne!(id, request_id("token/1"));
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4') && parts[3].starts_with('8'));
    }

    #[test]
    fn timestamps_parse_with_offsets() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            unix_seconds("2026-11-30T09:15:02.123-08:00"),
            Some(1_796_058_902)
        );
        assert_eq!(
            unix_seconds("2026-11-30T17:15:02+00:00"),
            Some(1_796_058_902)
        );
        assert_eq!(unix_seconds("yesterday"), None);
    }

    #[test]
    fn loopback_endpoints_are_recognised() {
        assert!(is_loopback_endpoint("http://127.0.0.1:8085"));
        assert!(is_loopback_endpoint("http://127.3.2.1:1/compute"));
        assert!(is_loopback_endpoint("http://[::1]:8085"));
        assert!(is_loopback_endpoint("http://localhost:80"));
        assert!(!is_loopback_endpoint("https://compute.googleapis.com"));
        assert!(!is_loopback_endpoint("http://10.0.0.1:8085"));
    }

    #[test]
    fn images_are_urls() {
        assert!(check_image(DEFAULT_IMAGE).is_ok());
        assert!(check_image("projects/p/global/images/my-image").is_ok());
        assert!(check_image("debian-12").is_err());
    }

    #[test]
    fn launches_start_in_a_zone_chosen_by_the_token() {
        let mut config = GcpConfig::new("p", vec!["a".into(), "b".into(), "c".into()]);
        config.spot = true;
        let provider = GcpProvider::new(config).expect("valid");
        let attempts = provider.attempts(&launch_label("t"));
        assert_eq!(attempts.len(), 6, "every zone spot, then standard");
        assert!(attempts[..3].iter().all(|(spot, _)| *spot));
        let zones: std::collections::BTreeSet<&str> =
            attempts[..3].iter().map(|(_, z)| z.as_str()).collect();
        assert_eq!(zones.len(), 3);
    }
}
