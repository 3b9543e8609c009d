//! The Azure provider: virtual machines through Resource Manager, found by
//! their tags.
//!
//! Requests are plain HTTPS calls to Resource Manager, read into
//! `azure_mgmt_compute`'s models; the crate's own client is not used, because
//! its long-running-operation handling is broken (Azure/azure-sdk-for-rust#1656:
//! it re-sends the PUT, misreads `provisioningState`, and returns from
//! delete/deallocate/start at the 202). Operations are polled here, from the
//! `Azure-AsyncOperation` (else `Location`) URL, honouring `Retry-After`.
//!
//! Credentials come from the standard Azure chain (environment
//! `AZURE_CLIENT_ID`/`AZURE_TENANT_ID`/`AZURE_CLIENT_SECRET`, workload
//! identity, managed identity, the Azure CLI), never from the spec. With an
//! `endpoint_url` on a loopback address and none of those configured, a
//! placeholder token is sent, so local stand-ins need no secret and nothing
//! asks the instance metadata service.
//!
//! An instance's id is its VM name (every VM lives in the configured
//! resource group). How each call maps to Resource Manager:
//!
//! - **list_page**: one `virtualMachines` list page of the resource group
//!   with `$expand=instanceView` (power states); the page token is ARM's
//!   `nextLink`, followed only to the configured endpoint's host. Tags are
//!   filtered here (ARM's VM list has no tag filter).
//! - **launch**: the resource group is made if missing. Each VM is one PUT
//!   with `If-None-Match: *` (create, never update), its network interface
//!   configured inline in the subnet and deleted with it, like its OS disk,
//!   tagged at creation, the user data as `customData`. Names come from the
//!   request's token (`mp-<hash>-<attempt>-<n>`), so a re-sent or re-run
//!   launch finds the VMs it made (a GET per name first) and never makes a
//!   second. With `spot: true`, Spot out of capacity (`SkuNotAvailable`,
//!   `AllocationFailed`) or out of its low-priority core quota falls back
//!   to regular VMs; a failed launch deletes
//!   what it made, so a batch is all or nothing.
//! - **describe**: a GET per VM (concurrently); 404 is "gone".
//! - **terminate / stop / start**: DELETE / `deallocate` / `start` per VM,
//!   each operation waited for.
//! - **retag**: read-modify-write of the VM's tags: PATCH with `If-Match`
//!   its etag, read again on 412.
//! - **put/get/delete_cluster_boot**: a template spec `motorpool-boot-NAME`
//!   in the resource group, whose version `1` carries the document in its
//!   metadata: nodes read it with their managed identity.
//! - **publish_runtime**: the runtime binary as a blob in the container the
//!   provider block names (`storage_account`, `runtime_container`), handed
//!   to nodes as a read-only SAS URL, see [`runtime_store`].
//! - **try_lock / renew_lock / read_lock / unlock**: the project lock as a
//!   blob in that container, changed only by conditional writes, see
//!   [`lock`]. Without `storage_account` there is no cloud lock (the local
//!   one only).
//!
//! Errors map to [`ProviderError`] in [`errors`].

mod blob;
mod catalog;
mod errors;
pub mod lock;
pub mod plugin;
pub mod runtime_store;
mod shared_key;
pub mod tags;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_mgmt_compute::package_2024_07_01::models as arm;
use base64::Engine;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{StreamExt, TryStreamExt, stream};
use motorpool_provider::{
    Instance, InstanceState, LaunchRequest, NodeType, Page, Provider, ProviderError, Result, Retag,
    TagFilter, Tags,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use catalog::catalog;
pub use plugin::{AzurePlugin, AzureSettings};

use errors::ArmError;
use tags::LAUNCH_TAG;

/// The provider kind.
pub const KIND: &str = "azure";

/// The image VMs get when neither the spec nor the launch names one
/// (publisher:offer:sku:version).
pub const DEFAULT_IMAGE: &str = "Canonical:ubuntu-24_04-lts:server:latest";

/// Resource Manager in Azure's public cloud.
pub const MANAGEMENT_ENDPOINT: &str = "https://management.azure.com";

/// The OAuth scope of Resource Manager tokens.
const MANAGEMENT_SCOPE: &str = "https://management.azure.com/.default";

/// The OAuth scope of Blob Storage tokens (used when no account key is set).
const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

pub const COMPUTE_API: &str = "2024-07-01";
pub const RESOURCES_API: &str = "2021-04-01";
pub const TEMPLATE_SPECS_API: &str = "2022-02-01";
/// The network API version VMs create their inline network interfaces with.
const VM_NETWORK_API: &str = "2020-11-01";

/// The template spec prefix of cluster boot documents.
pub const BOOT_PREFIX: &str = "motorpool-boot-";

/// The administrator account of every VM (login by SSH key only).
pub const ADMIN_USER: &str = "motorpool";

/// How many times an idempotent request is sent before its failure counts.
const SEND_ATTEMPTS: u32 = 4;

/// The token sent to a loopback endpoint when no credentials are configured.
const PLACEHOLDER_TOKEN: &str = "motorpool-local-placeholder";

/// An image as `publisher:offer:sku:version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    pub version: String,
}

impl ImageRef {
    pub fn parse(image: &str) -> Result<ImageRef, String> {
        let parts: Vec<&str> = image.trim().split(':').collect();
        match parts.as_slice() {
            [p, o, s, v]
                if parts
                    .iter()
                    .all(|x| !x.is_empty() && !x.contains(char::is_whitespace)) =>
            {
                Ok(ImageRef {
                    publisher: p.to_string(),
                    offer: o.to_string(),
                    sku: s.to_string(),
                    version: v.to_string(),
                })
            }
            _ => Err(format!(
                "`{image}` is not an image like Canonical:ubuntu-24_04-lts:server:latest \
                 (publisher:offer:sku:version)"
            )),
        }
    }

    fn urn(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.publisher, self.offer, self.sku, self.version
        )
    }
}

/// The provider's settings: the spec's `provider: { kind: azure, ... }` block.
#[derive(Debug, Clone)]
pub struct AzureConfig {
    pub subscription_id: String,
    pub resource_group: String,
    pub location: String,
    /// The subnet VMs get their network interface in (a full resource id).
    pub subnet_id: String,
    /// `publisher:offer:sku:version`; `None`: [`DEFAULT_IMAGE`].
    pub image: Option<String>,
    /// An OpenSSH public key for [`ADMIN_USER`]; `None`: a key nobody holds
    /// (the VMs need no login).
    pub ssh_public_key: Option<String>,
    pub spot: bool,
    /// What happens to an evicted Spot VM: `Deallocate` or `Delete`.
    pub eviction_policy: String,
    pub os_disk_gb: Option<u32>,
    /// `Premium_LRS`, `StandardSSD_LRS`, `Standard_LRS`; `None`: the size's default.
    pub os_disk_type: Option<String>,
    /// Extra tags on every VM.
    pub tags: Tags,
    /// Another Resource Manager root; `None`: [`MANAGEMENT_ENDPOINT`].
    pub endpoint_url: Option<String>,
    /// Where motorpool keeps its own objects (the runtime, the project
    /// lock); `None`: nowhere (the spec gives `runtime_url`, and the lock is
    /// the local one only).
    pub storage: Option<StorageConfig>,
    pub operation_timeout: Duration,
    /// The longest wait between polls of an operation, whatever `Retry-After` says.
    pub max_poll_interval: Duration,
    /// Per-VM calls in flight at once.
    pub concurrency: usize,
}

impl AzureConfig {
    pub fn new(subscription_id: &str, resource_group: &str, location: &str) -> AzureConfig {
        AzureConfig {
            subscription_id: subscription_id.to_string(),
            resource_group: resource_group.to_string(),
            location: location.to_string(),
            subnet_id: String::new(),
            image: None,
            ssh_public_key: None,
            spot: false,
            eviction_policy: "Delete".to_string(),
            os_disk_gb: None,
            os_disk_type: None,
            tags: Tags::new(),
            endpoint_url: None,
            storage: None,
            operation_timeout: Duration::from_secs(900),
            max_poll_interval: Duration::from_secs(15),
            concurrency: 16,
        }
    }

    fn endpoint(&self) -> &str {
        self.endpoint_url
            .as_deref()
            .unwrap_or(MANAGEMENT_ENDPOINT)
            .trim_end_matches('/')
    }
}

/// A container of the project's in a storage account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The storage account's name.
    pub account: String,
    /// The container (made when missing).
    pub container: String,
    /// The account's blob service root; `None`: `https://ACCOUNT.blob.core.windows.net`.
    pub blob_endpoint: Option<String>,
    /// The account key (base64) given by code (tests); never from the spec.
    /// `None`: from the environment (`AZURE_STORAGE_ACCOUNT_KEY`, ...), else a token.
    pub account_key: Option<String>,
}

impl StorageConfig {
    fn container(&self) -> Result<blob::Container> {
        let endpoint = self
            .blob_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", self.account));
        let endpoint = url::Url::parse(&endpoint).map_err(|e| {
            invalid(
                "blob_endpoint",
                format!("`{endpoint}` is not a blob service URL: {e}"),
            )
        })?;
        Ok(blob::Container {
            account: self.account.clone(),
            name: self.container.clone(),
            endpoint,
        })
    }
}

/// How requests are authorised.
enum Credential {
    Placeholder,
    Chain(std::sync::Arc<dyn azure_core::auth::TokenCredential>),
}

/// The Azure provider. See the crate docs for how it uses Resource Manager.
pub struct AzureProvider {
    config: AzureConfig,
    image: ImageRef,
    catalog: Vec<NodeType>,
    http: reqwest::Client,
    credential: tokio::sync::OnceCell<Credential>,
    group_ready: tokio::sync::OnceCell<()>,
    ssh_key: String,
    /// The container of [`AzureConfig::storage`].
    storage: Option<blob::Container>,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One answer from Resource Manager.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(|v| v.trim().parse().ok())
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::invalid(Some(format!("provider.{field}")), message)
}

/// Whether `endpoint` names a loopback host (`127.0.0.0/8`, `::1`, `localhost`).
pub fn is_loopback_endpoint(endpoint: &str) -> bool {
    match reqwest::Url::parse(endpoint) {
        Ok(url) => match url.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        },
        Err(_) => false,
    }
}

/// Whether any credential of the standard chain is configured without
/// asking a metadata service: the environment, or an Azure CLI login.
fn credentials_configured() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if set("AZURE_CLIENT_ID") || set("AZURE_FEDERATED_TOKEN_FILE") || set("IDENTITY_ENDPOINT") {
        return true;
    }
    let config_dir = std::env::var_os("AZURE_CONFIG_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".azure")));
    config_dir.is_some_and(|d| d.join("azureProfile.json").is_file())
}

fn sha_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `motorpool-launch` tag of a launch token.
pub fn launch_tag(token: &str) -> String {
    sha_hex(token)[..32].to_string()
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An OpenSSH `ssh-ed25519` public key whose private half is dropped at once:
/// Linux VMs must have a key or a password, and motorpool needs neither.
fn throwaway_ssh_key() -> String {
    let rng = ring::rand::SystemRandom::new();
    let public = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .ok()
        .and_then(|pkcs8| ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).ok())
        .map(|pair| {
            ring::signature::KeyPair::public_key(&pair)
                .as_ref()
                .to_vec()
        })
        .unwrap_or_else(|| vec![7u8; 32]);
    let mut blob = Vec::new();
    for part in [b"ssh-ed25519".as_slice(), public.as_slice()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!("ssh-ed25519 {} motorpool-throwaway", base64(&blob))
}

fn state_of(vm: &arm::VirtualMachine) -> InstanceState {
    let properties = vm.properties.as_ref();
    let provisioning = properties
        .and_then(|p| p.provisioning_state.as_deref())
        .unwrap_or("Succeeded");
    if provisioning.eq_ignore_ascii_case("Deleting") || provisioning.eq_ignore_ascii_case("Failed")
    {
        return InstanceState::Terminated;
    }
    let power = properties
        .and_then(|p| p.instance_view.as_ref())
        .and_then(|v| {
            v.statuses
                .iter()
                .filter_map(|s| s.code.as_deref())
                .find_map(|c| c.strip_prefix("PowerState/"))
                .map(str::to_string)
        });
    match power.as_deref() {
        Some("running") => InstanceState::Running,
        Some("starting") => InstanceState::Pending,
        Some("stopping" | "deallocating") => InstanceState::Stopping,
        Some("stopped" | "deallocated") => InstanceState::Stopped,
        _ if provisioning.eq_ignore_ascii_case("Creating") => InstanceState::Pending,
        _ => InstanceState::Running,
    }
}

fn to_instance(vm: &arm::VirtualMachine) -> Option<Instance> {
    let name = vm.resource.name.clone()?;
    let azure_tags: Tags = vm
        .resource
        .tags
        .as_ref()
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let properties = vm.properties.as_ref();
    let image = properties
        .and_then(|p| p.storage_profile.as_ref())
        .and_then(|s| s.image_reference.as_ref())
        .map(|i| {
            format!(
                "{}:{}:{}:{}",
                i.publisher.as_deref().unwrap_or_default(),
                i.offer.as_deref().unwrap_or_default(),
                i.sku.as_deref().unwrap_or_default(),
                i.version.as_deref().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let node_type = properties
        .and_then(|p| p.hardware_profile.as_ref())
        .and_then(|h| h.vm_size.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Some(Instance {
        id: name,
        node_type,
        image,
        state: state_of(vm),
        tags: tags::decode(&azure_tags),
        // Where the node's agent listens is not ARM's to say: the node
        // reports its progress through its own tags instead.
        address: None,
        pid: None,
        ips: Default::default(),
        launched_at: properties
            .and_then(|p| p.time_created)
            .map(|t| u64::try_from(t.unix_timestamp()).unwrap_or(0))
            .unwrap_or(0),
    })
}

impl AzureProvider {
    pub fn new(config: AzureConfig) -> Result<AzureProvider> {
        for (field, value) in [
            ("subscription_id", &config.subscription_id),
            ("resource_group", &config.resource_group),
            ("location", &config.location),
        ] {
            if value.is_empty() {
                return Err(invalid(
                    field,
                    format!("the azure provider needs `{field}`"),
                ));
            }
        }
        let image = ImageRef::parse(config.image.as_deref().unwrap_or(DEFAULT_IMAGE))
            .map_err(|m| invalid("image", m))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ProviderError::Internal(format!("cannot set up an HTTP client: {e}")))?;
        let ssh_key = config
            .ssh_public_key
            .clone()
            .unwrap_or_else(throwaway_ssh_key);
        let storage = config
            .storage
            .as_ref()
            .map(StorageConfig::container)
            .transpose()?;
        Ok(AzureProvider {
            config,
            storage,
            image,
            catalog: catalog(),
            http,
            credential: tokio::sync::OnceCell::new(),
            group_ready: tokio::sync::OnceCell::new(),
            ssh_key,
        })
    }

    pub fn config(&self) -> &AzureConfig {
        &self.config
    }

    fn group_url(&self) -> String {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}",
            self.config.endpoint(),
            self.config.subscription_id,
            self.config.resource_group
        )
    }

    fn vm_url(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.Compute/virtualMachines/{name}",
            self.group_url()
        )
    }

    fn template_spec_url(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.Resources/templateSpecs/{}",
            self.group_url(),
            boot_spec_name(name)
        )
    }

    async fn token(&self) -> Result<String> {
        self.token_for(MANAGEMENT_SCOPE).await
    }

    async fn token_for(&self, scope: &str) -> Result<String> {
        let credential = self
            .credential
            .get_or_try_init(|| async {
                let loopback = is_loopback_endpoint(self.config.endpoint());
                if loopback && !credentials_configured() {
                    return Ok(Credential::Placeholder);
                }
                azure_identity::create_default_credential()
                    .map(Credential::Chain)
                    .map_err(|e| ProviderError::Auth(format!("no Azure credentials: {e}")))
            })
            .await?;
        match credential {
            Credential::Placeholder => Ok(PLACEHOLDER_TOKEN.to_string()),
            Credential::Chain(chain) => chain
                .get_token(&[scope])
                .await
                .map(|t| t.token.secret().to_string())
                .map_err(|e| ProviderError::Auth(format!("no Azure token: {e}"))),
        }
    }

    /// Follow a URL ARM gave us only to the endpoint we were configured
    /// with: the token must not go anywhere else.
    fn same_origin(&self, url: &str) -> Result<()> {
        let ours = reqwest::Url::parse(self.config.endpoint()).ok();
        let theirs = reqwest::Url::parse(url).ok();
        let origin = |u: &reqwest::Url| {
            (
                u.scheme().to_string(),
                u.host_str().map(str::to_string),
                u.port_or_known_default(),
            )
        };
        match (ours, theirs) {
            (Some(a), Some(b)) if origin(&a) == origin(&b) => Ok(()),
            _ => Err(ProviderError::Internal(format!(
                "Resource Manager pointed at `{url}`, which is not {}: not following it",
                self.config.endpoint()
            ))),
        }
    }

    /// One request; a refused one as an [`ArmError`]. Idempotent requests
    /// (all but POST actions) are sent again, up to [`SEND_ATTEMPTS`] times,
    /// after throttling (waiting what `Retry-After` says), a server error or
    /// a lost answer: a launch is a dozen requests, and one of them failing
    /// must not throw the others' work away.
    async fn send(
        &self,
        call: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ArmError> {
        let idempotent = method != reqwest::Method::POST;
        let mut attempt = 0;
        loop {
            match self
                .send_once(call, method.clone(), url, body, headers)
                .await
            {
                Err(e)
                    if idempotent
                        && attempt + 1 < SEND_ATTEMPTS
                        && ProviderError::from(e.clone()).is_retryable() =>
                {
                    attempt += 1;
                    let pause = match e.retry_after {
                        Some(s) => Duration::from_secs(s).min(self.config.max_poll_interval),
                        None => motorpool_provider::backoff_delay(
                            attempt,
                            Duration::from_millis(200),
                            Duration::from_secs(5),
                            fastrand::f64(),
                        ),
                    };
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        call: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ArmError> {
        let lost = |message: String| ArmError {
            status: None,
            code: "Failed".to_string(),
            target: None,
            message: format!("{call}: {message}"),
            retry_after: None,
        };
        let token = self.token().await.map_err(|e| ArmError {
            status: Some(401),
            code: "AuthenticationFailed".to_string(),
            target: None,
            message: e.to_string(),
            retry_after: None,
        })?;
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(token)
            .header("Accept", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| lost(e.to_string()))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| lost(e.to_string()))?;
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let answer = Answer {
            status,
            headers,
            body,
        };
        if answer.ok() {
            Ok(answer)
        } else {
            let mut e = ArmError::from_body(call, Some(status), &answer.body);
            e.retry_after = answer.retry_after();
            Err(e)
        }
    }

    /// Wait for the operation a 201/202 answer started, from its
    /// `Azure-AsyncOperation` (else `Location`) URL, honouring `Retry-After`.
    async fn wait(&self, call: &str, answer: &Answer) -> Result<()> {
        let (url, async_operation) = match (
            answer.header("azure-asyncoperation"),
            answer.header("location"),
        ) {
            (Some(url), _) => (url.to_string(), true),
            (None, Some(url)) if answer.status == 202 => (url.to_string(), false),
            _ => return Ok(()),
        };
        self.same_origin(&url)?;
        let deadline = Instant::now() + self.config.operation_timeout;
        let mut delay = answer.retry_after();
        let mut failures = 0u32;
        loop {
            let pause = delay
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_millis(250))
                .min(self.config.max_poll_interval);
            tokio::time::sleep(pause).await;
            if Instant::now() > deadline {
                return Err(ProviderError::Server(format!(
                    "{call}: the operation did not finish in {} s",
                    self.config.operation_timeout.as_secs()
                )));
            }
            match self.send(call, reqwest::Method::GET, &url, None, &[]).await {
                Ok(polled) => {
                    failures = 0;
                    delay = polled.retry_after();
                    if async_operation {
                        let status = polled
                            .body
                            .get("status")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        match status {
                            "Succeeded" => return Ok(()),
                            "Failed" | "Canceled" => {
                                return Err(ArmError::from_body(call, None, &polled.body).into());
                            }
                            _ => {}
                        }
                    } else if polled.status != 202 {
                        return Ok(());
                    }
                }
                Err(e) => {
                    let e: ProviderError = e.into();
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    // A lost or refused poll says nothing about the operation: ask again.
                    failures += 1;
                    delay = Some(u64::from(failures.min(5)));
                }
            }
        }
    }

    async fn get_vm(&self, name: &str) -> Result<Option<arm::VirtualMachine>> {
        let url = format!(
            "{}?api-version={COMPUTE_API}&$expand=instanceView",
            self.vm_url(name)
        );
        match self
            .send("virtualMachines.get", reqwest::Method::GET, &url, None, &[])
            .await
        {
            Ok(answer) => serde_json::from_value(answer.body).map(Some).map_err(|e| {
                ProviderError::Server(format!(
                    "virtualMachines.get {name}: unreadable answer: {e}"
                ))
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_group(&self, project: &str) -> Result<()> {
        self.group_ready
            .get_or_try_init(|| async {
                let url = format!("{}?api-version={RESOURCES_API}", self.group_url());
                match self
                    .send("resourceGroups.get", reqwest::Method::GET, &url, None, &[])
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(ProviderError::from(e)),
                }
                let body = json!({
                    "location": self.config.location,
                    "tags": { motorpool_provider::tags::PROJECT: project },
                });
                self.send(
                    "resourceGroups.createOrUpdate",
                    reqwest::Method::PUT,
                    &url,
                    Some(&body),
                    &[],
                )
                .await
                .map(drop)
                .map_err(ProviderError::from)
            })
            .await
            .map(|_| ())
    }

    /// The body of a VM `name` of a launch.
    fn vm_body(
        &self,
        request: &LaunchRequest,
        name: &str,
        azure_tags: &Tags,
        spot: bool,
    ) -> Result<Value> {
        let image = match &request.image {
            Some(image) => ImageRef::parse(image).map_err(|m| invalid("image", m))?,
            None => self.image.clone(),
        };
        let mut os_disk = json!({
            "createOption": "FromImage",
            "deleteOption": "Delete",
        });
        if let Some(gb) = self.config.os_disk_gb {
            os_disk["diskSizeGB"] = json!(gb);
        }
        if let Some(kind) = &self.config.os_disk_type {
            os_disk["managedDisk"] = json!({ "storageAccountType": kind });
        }
        let mut properties = json!({
            "hardwareProfile": { "vmSize": request.node_type },
            "storageProfile": {
                "imageReference": {
                    "publisher": image.publisher,
                    "offer": image.offer,
                    "sku": image.sku,
                    "version": image.version,
                },
                "osDisk": os_disk,
            },
            "osProfile": {
                "computerName": name,
                "adminUsername": ADMIN_USER,
                "customData": base64(request.user_data.as_bytes()),
                "linuxConfiguration": {
                    "disablePasswordAuthentication": true,
                    "ssh": { "publicKeys": [{
                        "path": format!("/home/{ADMIN_USER}/.ssh/authorized_keys"),
                        "keyData": self.ssh_key,
                    }]},
                },
            },
            "networkProfile": {
                "networkApiVersion": VM_NETWORK_API,
                "networkInterfaceConfigurations": [{
                    "name": format!("{name}-nic"),
                    "properties": {
                        "primary": true,
                        "deleteOption": "Delete",
                        "ipConfigurations": [{
                            "name": "ipconfig1",
                            "properties": {
                                "primary": true,
                                "subnet": { "id": self.config.subnet_id },
                            },
                        }],
                    },
                }],
            },
        });
        if spot {
            properties["priority"] = json!("Spot");
            properties["evictionPolicy"] = json!(self.config.eviction_policy);
            properties["billingProfile"] = json!({ "maxPrice": -1 });
        }
        Ok(json!({
            "location": self.config.location,
            "tags": azure_tags,
            "properties": properties,
        }))
    }

    /// Create VM `name` unless it exists; wait until it is made.
    async fn create_vm(&self, name: &str, body: &Value) -> Result<()> {
        if let Some(vm) = self.get_vm(name).await? {
            if state_of(&vm) != InstanceState::Terminated {
                return Ok(());
            }
            // A VM whose allocation failed stays, Failed: clear it first.
            self.delete_vm(name).await?;
        }
        let url = format!("{}?api-version={COMPUTE_API}", self.vm_url(name));
        let sent = self
            .send(
                "virtualMachines.createOrUpdate",
                reqwest::Method::PUT,
                &url,
                Some(body),
                &[("If-None-Match", "*")],
            )
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            // It exists: a re-sent request whose first answer was lost.
            Err(e) if e.is_precondition_failed() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.wait("virtualMachines.createOrUpdate", &answer).await
    }

    async fn delete_vm(&self, name: &str) -> Result<()> {
        let url = format!("{}?api-version={COMPUTE_API}", self.vm_url(name));
        match self
            .send(
                "virtualMachines.delete",
                reqwest::Method::DELETE,
                &url,
                None,
                &[],
            )
            .await
        {
            Ok(answer) => match self.wait("virtualMachines.delete", &answer).await {
                Err(ProviderError::NotFound(_)) => Ok(()),
                other => other,
            },
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `deallocate` or `start` one VM, waiting for it to settle first.
    async fn power(&self, start: bool, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.config.operation_timeout;
        loop {
            let Some(vm) = self.get_vm(name).await? else {
                return Err(ProviderError::NotFound(format!("VM {name}")));
            };
            match (start, state_of(&vm)) {
                (true, InstanceState::Running | InstanceState::Pending) => return Ok(()),
                (false, InstanceState::Stopped) => return Ok(()),
                (_, InstanceState::Terminated) => {
                    return Err(ProviderError::NotFound(format!(
                        "VM {name} is being deleted"
                    )));
                }
                (true, InstanceState::Stopped) | (false, InstanceState::Running) => break,
                _ if Instant::now() > deadline => {
                    return Err(ProviderError::Server(format!("VM {name} did not settle")));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let action = if start { "start" } else { "deallocate" };
        let call = format!("virtualMachines.{action}");
        let url = format!("{}/{action}?api-version={COMPUTE_API}", self.vm_url(name));
        let answer = self
            .send(&call, reqwest::Method::POST, &url, None, &[])
            .await?;
        self.wait(&call, &answer).await
    }

    async fn retag_one(&self, name: &str, change: &Retag) -> Result<()> {
        for _ in 0..16 {
            let url = format!("{}?api-version={COMPUTE_API}", self.vm_url(name));
            let answer = match self
                .send("virtualMachines.get", reqwest::Method::GET, &url, None, &[])
                .await
            {
                Ok(answer) => answer,
                Err(e) if e.is_not_found() => {
                    return Err(ProviderError::NotFound(format!("VM {name}")));
                }
                Err(e) => return Err(e.into()),
            };
            let current: Tags = answer
                .body
                .get("tags")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let mut next = tags::decode(&current);
            for key in &change.remove {
                next.remove(key);
            }
            next.extend(change.set.clone());
            let launch = current.get(LAUNCH_TAG).cloned();
            let extra: Vec<(&str, &str)> = launch
                .as_deref()
                .map(|l| vec![(LAUNCH_TAG, l)])
                .unwrap_or_default();
            let wanted =
                tags::encode(&next, &extra).map_err(|m| ProviderError::invalid(None, m))?;
            if wanted == current {
                return Ok(());
            }
            let etag = answer
                .body
                .get("etag")
                .and_then(Value::as_str)
                .map(str::to_string);
            let headers: Vec<(&str, &str)> = etag
                .as_deref()
                .map(|e| vec![("If-Match", e)])
                .unwrap_or_default();
            match self
                .send(
                    "virtualMachines.update",
                    reqwest::Method::PATCH,
                    &url,
                    Some(&json!({ "tags": wanted })),
                    &headers,
                )
                .await
            {
                Ok(answer) => return self.wait("virtualMachines.update", &answer).await,
                Err(e) if e.is_precondition_failed() => {
                    // Someone changed the VM between our read and write: read again.
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..100))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ProviderError::Server(format!(
            "VM {name}: its tags kept changing under a retag"
        )))
    }

    /// Run `calls`, `concurrency` at a time; the first error wins.
    async fn run_all(&self, calls: Vec<BoxFuture<'_, Result<()>>>) -> Result<()> {
        stream::iter(calls)
            .buffer_unordered(self.config.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    /// One attempt of a launch: every VM of it made, or none left.
    async fn launch_attempt(
        &self,
        request: &LaunchRequest,
        names: &[String],
        azure_tags: &Tags,
        spot: bool,
    ) -> Result<()> {
        let bodies: Vec<Value> = names
            .iter()
            .map(|n| self.vm_body(request, n, azure_tags, spot))
            .collect::<Result<_>>()?;
        let calls = names
            .iter()
            .zip(&bodies)
            .map(|(n, b)| self.create_vm(n, b).boxed())
            .collect();
        if let Err(e) = self.run_all(calls).await {
            // All or nothing: what this attempt made goes again.
            let cleanup = names.iter().map(|n| self.delete_vm(n).boxed()).collect();
            let _ = self.run_all(cleanup).await;
            return Err(e);
        }
        Ok(())
    }

    async fn described(&self, names: &[String]) -> Result<Vec<Instance>> {
        let calls: Vec<_> = names.iter().map(|n| self.get_vm(n).boxed()).collect();
        let found: Vec<Option<arm::VirtualMachine>> = stream::iter(calls)
            .buffered(self.config.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(found.iter().flatten().filter_map(to_instance).collect())
    }
}

impl AzureProvider {
    /// The storage account key from the environment, else a Storage token
    /// of the standard chain.
    async fn storage_auth(&self, container: &blob::Container) -> Result<blob::Auth> {
        if let Some(key) = self
            .config
            .storage
            .as_ref()
            .and_then(|s| s.account_key.as_deref())
        {
            return shared_key::AccountKey::new(&container.account, key)
                .map(blob::Auth::Key)
                .map_err(ProviderError::Auth);
        }
        match blob::key_from_env(&container.account)? {
            Some(key) => Ok(blob::Auth::Key(key)),
            None => Ok(blob::Auth::Token(self.token_for(STORAGE_SCOPE).await?)),
        }
    }

    fn lock_store<'a>(
        &'a self,
        container: &'a blob::Container,
        auth: &'a blob::Auth,
    ) -> lock::LockStore<'a> {
        lock::LockStore {
            http: &self.http,
            container,
            auth,
        }
    }
}

/// The template spec name of cluster boot document `name`.
pub fn boot_spec_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.()".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(90 - BOOT_PREFIX.len())
        .collect();
    format!("{BOOT_PREFIX}{safe}")
}

#[async_trait]
impl Provider for AzureProvider {
    fn kind(&self) -> &str {
        KIND
    }

    fn catalog(&self) -> &[NodeType] {
        &self.catalog
    }

    fn default_image(&self) -> String {
        self.image.urn()
    }

    /// ARM allows about 20 writes a second per subscription (and more reads).
    fn calls_per_second(&self) -> f64 {
        20.0
    }

    async fn list_page(&self, filter: &TagFilter, page_token: Option<String>) -> Result<Page> {
        let url = match page_token {
            Some(next) => {
                self.same_origin(&next)?;
                next
            }
            None => format!(
                "{}/providers/Microsoft.Compute/virtualMachines?api-version={COMPUTE_API}&$expand=instanceView",
                self.group_url()
            ),
        };
        let answer = match self
            .send(
                "virtualMachines.list",
                reqwest::Method::GET,
                &url,
                None,
                &[],
            )
            .await
        {
            Ok(answer) => answer,
            // No resource group yet: nothing launched.
            Err(e) if e.is("ResourceGroupNotFound") => return Ok(Page::default()),
            Err(e) => return Err(e.into()),
        };
        let list: arm::VirtualMachineListResult =
            serde_json::from_value(answer.body).map_err(|e| {
                ProviderError::Server(format!("virtualMachines.list: unreadable answer: {e}"))
            })?;
        Ok(Page {
            instances: list
                .value
                .iter()
                .filter_map(to_instance)
                .filter(|i| tags::matches(&i.tags, filter))
                .collect(),
            next_token: list.next_link.filter(|l| !l.is_empty()),
        })
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>> {
        let mut names: Vec<String> = ids.to_vec();
        names.sort();
        names.dedup();
        self.described(&names).await
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
        let label = launch_tag(&token);
        let attempts: Vec<bool> = if self.config.spot {
            vec![true, false]
        } else {
            vec![false]
        };
        let names = |attempt: usize| -> Vec<String> {
            (0..request.count)
                .map(|i| format!("mp-{}-{attempt}-{i}", &label[..16]))
                .collect()
        };
        // A launch run before (a lost answer, an apply run again) made
        // these VMs: the names are the token's. (A partly made attempt is
        // completed below: existing VMs are skipped.)
        for attempt in 0..attempts.len() {
            let live: Vec<Instance> = self
                .described(&names(attempt))
                .await?
                .into_iter()
                .filter(|i| i.state != InstanceState::Terminated)
                .collect();
            if live.len() == request.count as usize {
                return Ok(live);
            }
        }
        let project = request
            .tags
            .get(motorpool_provider::tags::PROJECT)
            .cloned()
            .unwrap_or_default();
        self.ensure_group(&project).await?;
        let mut all_tags = self.config.tags.clone();
        all_tags.extend(request.tags.clone());
        let azure_tags = tags::encode(&all_tags, &[(LAUNCH_TAG, &label)])
            .map_err(|m| ProviderError::invalid(None, m))?;
        let mut tried: Vec<String> = Vec::new();
        for (attempt, spot) in attempts.iter().enumerate() {
            let names = names(attempt);
            match self
                .launch_attempt(request, &names, &azure_tags, *spot)
                .await
            {
                Ok(()) => return self.described(&names).await,
                // Spot has its own capacity and its own (low-priority) core
                // quota: when either says no, regular VMs are tried.
                Err(ProviderError::Capacity(m) | ProviderError::Quota(m))
                    if *spot && attempt + 1 < attempts.len() =>
                {
                    tried.push(format!("spot: {m}"));
                }
                Err(ProviderError::Capacity(m)) if !tried.is_empty() => {
                    return Err(ProviderError::Capacity(format!(
                        "{m} (also tried: {})",
                        tried.join("; ")
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::Internal(
            "virtualMachines.createOrUpdate: no launch was attempted".to_string(),
        ))
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        let mut names = ids.to_vec();
        names.sort();
        names.dedup();
        let calls = names.iter().map(|n| self.delete_vm(n).boxed()).collect();
        self.run_all(calls).await
    }

    async fn stop(&self, ids: &[String]) -> Result<()> {
        let calls = ids.iter().map(|n| self.power(false, n).boxed()).collect();
        self.run_all(calls).await
    }

    async fn start(&self, ids: &[String]) -> Result<()> {
        let calls = ids.iter().map(|n| self.power(true, n).boxed()).collect();
        self.run_all(calls).await
    }

    async fn retag(&self, ids: &[String], change: &Retag) -> Result<()> {
        let mut names = ids.to_vec();
        names.sort();
        names.dedup();
        let calls = names
            .iter()
            .map(|n| self.retag_one(n, change).boxed())
            .collect();
        self.run_all(calls).await
    }

    async fn put_cluster_boot(&self, name: &str, document: &str) -> Result<()> {
        self.ensure_group("").await?;
        let spec_url = self.template_spec_url(name);
        let body = json!({
            "location": self.config.location,
            "properties": { "description": format!("motorpool: the startup of cluster {name}") },
        });
        let answer = self
            .send(
                "templateSpecs.createOrUpdate",
                reqwest::Method::PUT,
                &format!("{spec_url}?api-version={TEMPLATE_SPECS_API}"),
                Some(&body),
                &[],
            )
            .await?;
        self.wait("templateSpecs.createOrUpdate", &answer).await?;
        let version = json!({
            "location": self.config.location,
            "properties": {
                "mainTemplate": {
                    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                    "contentVersion": "1.0.0.0",
                    "resources": [],
                },
                "metadata": { "motorpool-boot": document },
            },
        });
        let answer = self
            .send(
                "templateSpecVersions.createOrUpdate",
                reqwest::Method::PUT,
                &format!("{spec_url}/versions/1?api-version={TEMPLATE_SPECS_API}"),
                Some(&version),
                &[],
            )
            .await?;
        self.wait("templateSpecVersions.createOrUpdate", &answer)
            .await
    }

    async fn get_cluster_boot(&self, name: &str) -> Result<Option<String>> {
        let url = format!(
            "{}/versions/1?api-version={TEMPLATE_SPECS_API}",
            self.template_spec_url(name)
        );
        match self
            .send(
                "templateSpecVersions.get",
                reqwest::Method::GET,
                &url,
                None,
                &[],
            )
            .await
        {
            Ok(answer) => Ok(answer.body["properties"]["metadata"]["motorpool-boot"]
                .as_str()
                .map(str::to_string)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_cluster_boot(&self, name: &str) -> Result<()> {
        let url = format!(
            "{}?api-version={TEMPLATE_SPECS_API}",
            self.template_spec_url(name)
        );
        match self
            .send(
                "templateSpecs.delete",
                reqwest::Method::DELETE,
                &url,
                None,
                &[],
            )
            .await
        {
            Ok(answer) => self.wait("templateSpecs.delete", &answer).await,
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn publish_runtime(
        &self,
        runtime: &motorpool_provider::RuntimeUpload,
    ) -> Result<Option<String>> {
        let Some(container) = &self.storage else {
            return Ok(None);
        };
        let auth = self.storage_auth(container).await?;
        runtime_store::publish(&self.http, container, &auth, runtime)
            .await
            .map(Some)
    }

    // The project lock: a blob per project in the storage container ([`lock`]).

    async fn try_lock(
        &self,
        project: &str,
        lock: &motorpool_provider::LockInfo,
    ) -> Result<motorpool_provider::LockAttempt> {
        let Some(container) = &self.storage else {
            return Ok(motorpool_provider::LockAttempt::NoCloudLock);
        };
        let auth = self.storage_auth(container).await?;
        self.lock_store(container, &auth)
            .try_lock(project, lock)
            .await
    }

    async fn renew_lock(&self, project: &str, lock: &motorpool_provider::LockInfo) -> Result<()> {
        let Some(container) = &self.storage else {
            return Ok(());
        };
        let auth = self.storage_auth(container).await?;
        self.lock_store(container, &auth)
            .renew_lock(project, lock)
            .await
    }

    async fn read_lock(&self, project: &str) -> Result<Option<motorpool_provider::LockInfo>> {
        let Some(container) = &self.storage else {
            return Ok(None);
        };
        let auth = self.storage_auth(container).await?;
        self.lock_store(container, &auth).read_lock(project).await
    }

    async fn unlock(&self, project: &str, id: &str) -> Result<()> {
        let Some(container) = &self.storage else {
            return Ok(());
        };
        let auth = self.storage_auth(container).await?;
        self.lock_store(container, &auth).unlock(project, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_urns() {
        let image = ImageRef::parse(DEFAULT_IMAGE).expect("the default parses");
        assert_eq!(image.offer, "ubuntu-24_04-lts");
        assert_eq!(image.urn(), DEFAULT_IMAGE);
        assert!(ImageRef::parse("ubuntu").is_err());
        assert!(ImageRef::parse("a::c:d").is_err());
    }

    #[test]
    fn loopback_endpoints_are_recognised() {
        assert!(is_loopback_endpoint("http://127.0.0.1:8086"));
        assert!(is_loopback_endpoint("http://[::1]:1"));
        assert!(is_loopback_endpoint("http://localhost:1/"));
        assert!(!is_loopback_endpoint(MANAGEMENT_ENDPOINT));
    }

    #[test]
    fn the_throwaway_key_is_an_openssh_ed25519_key() {
        let key = throwaway_ssh_key();
        let mut parts = key.split(' ');
        assert_eq!(parts.next(), Some("ssh-ed25519"));
        let blob = base64::engine::general_purpose::STANDARD
            .decode(parts.next().expect("a blob"))
            .expect("base64");
        assert_eq!(blob.len(), 4 + 11 + 4 + 32);
        assert_ne!(key, throwaway_ssh_key(), "a fresh key every time");
    }

    #[test]
    fn next_links_are_followed_only_to_the_endpoint() {
        let mut config = AzureConfig::new("s", "rg", "westeurope");
        config.endpoint_url = Some("http://127.0.0.1:8086".into());
        let p = AzureProvider::new(config).expect("valid");
        assert!(
            p.same_origin("http://127.0.0.1:8086/subscriptions/s?x=1")
                .is_ok()
        );
        assert!(
            p.same_origin("http://127.0.0.1:9999/subscriptions/s")
                .is_err()
        );
        assert!(p.same_origin("https://evil.example.com/").is_err());
    }
}
