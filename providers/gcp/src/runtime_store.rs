//! The runtime upload on Cloud Storage ([`motorpool_provider::Provider::publish_runtime`]):
//! `apply` hands over a stripped `motorpool` binary, and this puts it in the
//! bucket the provider block names (`runtime_bucket`) and returns a V4
//! signed GET URL the nodes' startup script downloads (and checks against
//! the SHA-256 the engine computed).
//!
//! - **The bucket** is made when missing (JSON API `buckets.get`, then
//!   `buckets.insert` in the provider's GCP project) and labelled
//!   `motorpool-project=<project>`; one that another project owns, or these
//!   credentials may not read, is an error naming it.
//! - **Once per content**: the object's name carries the version, platform
//!   and SHA-256 ([`motorpool_provider::RuntimeUpload::object_name`]), and
//!   `objects.get` finds an upload made before (its custom metadata
//!   `sha256` equal), so a second apply uploads nothing. An object there
//!   under that name without that checksum (not written by motorpool) is
//!   replaced.
//! - **The URL** is a V4 signed URL (`GOOG4-RSA-SHA256`, through
//!   `object_store`'s signer) valid for the upload's `valid_for` (at most 7
//!   days). Signing needs a service account's key (or, off loopback, the
//!   IAM `signBlob` permission of the account the credentials are); without
//!   one, the error says what to set. The bucket stays private.
//! - **Where**: `https://storage.googleapis.com`, or the endpoint
//!   `STORAGE_EMULATOR_HOST` (or `object_store`'s `GOOGLE_BASE_URL`) names.
//!   Credentials are `object_store`'s chain: `GOOGLE_SERVICE_ACCOUNT` /
//!   `GOOGLE_SERVICE_ACCOUNT_PATH` / `GOOGLE_SERVICE_ACCOUNT_KEY`, then
//!   Application Default Credentials. On a loopback endpoint without a key,
//!   nothing looks for a metadata server: it fails, saying what to set.
//!
//! This file owns only the runtime's bucket and object; it must not touch
//! instances or project metadata.

use std::time::Duration;

use motorpool_provider::{ProviderError, Result, RuntimeUpload, tags};
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;

use crate::is_loopback_endpoint;
use crate::labels::label_value;

/// Cloud Storage's own endpoint.
pub const DEFAULT_STORAGE_URL: &str = "https://storage.googleapis.com";

/// The longest a V4 signed URL may be valid.
const MAX_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long one upload may take (the binary is tens of MB).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long any other Cloud Storage call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The custom metadata key holding the object's SHA-256.
const SHA_METADATA: &str = "sha256";

/// Environment variables that give `object_store` a service account key.
const KEY_VARIABLES: [&str; 4] = [
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "SERVICE_ACCOUNT",
];

/// What to set when the credentials cannot sign a URL.
const HOW_TO_SIGN: &str = "set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT_PATH) \
    to a service account key file (JSON) whose account may create buckets and objects, or give \
    `runtime_url` and `runtime_sha256` in the provider block instead of `runtime_bucket`";

/// The Cloud Storage endpoint in force: `STORAGE_EMULATOR_HOST` (with or
/// without a scheme), else `GOOGLE_BASE_URL`, else Google's.
pub fn storage_url() -> String {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(host) = var("STORAGE_EMULATOR_HOST") {
        let host = host.trim().trim_end_matches('/');
        return if host.starts_with("http://") || host.starts_with("https://") {
            host.to_string()
        } else {
            format!("http://{host}")
        };
    }
    var("GOOGLE_BASE_URL")
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| DEFAULT_STORAGE_URL.to_string())
}

fn has_key_variable() -> bool {
    KEY_VARIABLES
        .iter()
        .chain(["GOOGLE_APPLICATION_CREDENTIALS"].iter())
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

fn gcs_error(call: &str, bucket: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Internal(format!("Cloud Storage {call} on bucket `{bucket}`: {e}"))
}

/// Percent-encoding of one path segment (an object name in the JSON API).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client for one bucket: `object_store`'s (credentials, signer) and a
/// plain HTTP client for the JSON API calls `object_store` does not make.
struct Bucket {
    name: String,
    base: String,
    store: GoogleCloudStorage,
    http: reqwest::Client,
}

impl Bucket {
    fn new(name: &str) -> Result<Bucket> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = storage_url();
        if is_loopback_endpoint(&base) && !has_key_variable() {
            return Err(ProviderError::Auth(format!(
                "Cloud Storage at {base} (a local endpoint): no service account key to sign \
                 the runtime's download URL with, and no metadata server is asked there; \
                 {HOW_TO_SIGN}"
            )));
        }
        let store = GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(name)
            .with_base_url(&base)
            .build()
            .map_err(|e| {
                ProviderError::Auth(format!(
                    "cannot set up Cloud Storage for the runtime bucket `{name}`: {e}; \
                     {HOW_TO_SIGN}"
                ))
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| ProviderError::Internal(format!("an HTTP client: {e}")))?;
        Ok(Bucket {
            name: name.to_string(),
            base,
            store,
            http,
        })
    }

    async fn bearer(&self) -> Result<String> {
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| {
                ProviderError::Auth(format!(
                    "no Google credentials for Cloud Storage: {e}; {HOW_TO_SIGN}"
                ))
            })?;
        Ok(credential.bearer.clone())
    }

    /// One JSON API request: its status and body.
    async fn call(
        &self,
        call: &str,
        method: reqwest::Method,
        url: String,
        content_type: Option<String>,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, serde_json::Value)> {
        let bearer = self.bearer().await?;
        let timeout = if call == "objects.insert" {
            UPLOAD_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        let mut request = self.http.request(method, &url).timeout(timeout);
        if !bearer.is_empty() {
            request = request.bearer_auth(bearer);
        }
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError::Server(format!("Cloud Storage {call}: {e}")))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ProviderError::Server(format!("Cloud Storage {call}: {e}")))?;
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        match status {
            429 => Err(ProviderError::Throttled(format!(
                "Cloud Storage {call}: {}",
                message(&json)
            ))),
            500..=599 => Err(ProviderError::Server(format!(
                "Cloud Storage {call}: {status} {}",
                message(&json)
            ))),
            401 => Err(ProviderError::Auth(format!(
                "Cloud Storage {call}: {}",
                message(&json)
            ))),
            _ => Ok((status, json)),
        }
    }
}

fn message(json: &serde_json::Value) -> String {
    json["error"]["message"]
        .as_str()
        .unwrap_or("(no message)")
        .to_string()
}

/// Upload `runtime` to `bucket` (in GCP project `gcp_project`) unless it is
/// there already; its signed URL.
pub(crate) async fn publish(
    gcp_project: &str,
    bucket: &str,
    runtime: &RuntimeUpload,
) -> Result<String> {
    let b = Bucket::new(bucket)?;
    ensure_bucket(&b, gcp_project, &runtime.project).await?;
    let key = runtime.object_name();
    let object_url = format!(
        "{}/storage/v1/b/{}/o/{}",
        b.base,
        encode_segment(bucket),
        encode_segment(&key)
    );
    let (status, object) = b
        .call("objects.get", reqwest::Method::GET, object_url, None, None)
        .await?;
    let present = match status {
        200 => object["metadata"][SHA_METADATA]
            .as_str()
            .is_some_and(|sha| sha.eq_ignore_ascii_case(&runtime.sha256)),
        404 => false,
        _ => return Err(gcs_error("objects.get", bucket, message(&object))),
    };
    if !present {
        upload(&b, &key, runtime).await?;
    }
    let lifetime = runtime.valid_for.min(MAX_URL_LIFETIME);
    let url = b
        .store
        .signed_url(http::Method::GET, &ObjectPath::from(key.as_str()), lifetime)
        .await
        .map_err(|e| {
            ProviderError::Auth(format!(
                "cannot sign a download URL for the runtime in bucket `{bucket}` with these \
                 Google credentials ({e}); {HOW_TO_SIGN}"
            ))
        })?;
    Ok(url.to_string())
}

/// One multipart upload (`uploadType=multipart`): the object's metadata,
/// with its SHA-256, and the file.
async fn upload(b: &Bucket, key: &str, runtime: &RuntimeUpload) -> Result<()> {
    let data = tokio::fs::read(&runtime.path).await.map_err(|e| {
        ProviderError::Internal(format!(
            "cannot read the runtime {}: {e}",
            runtime.path.display()
        ))
    })?;
    let metadata = serde_json::json!({
        "name": key,
        "contentType": "application/octet-stream",
        "metadata": { SHA_METADATA: runtime.sha256 },
    });
    let boundary = format!("motorpool-{}", fastrand::u64(..));
    let mut body = Vec::with_capacity(data.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n\
             --{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let url = format!(
        "{}/upload/storage/v1/b/{}/o?uploadType=multipart",
        b.base,
        encode_segment(&b.name)
    );
    let (status, answer) = b
        .call(
            "objects.insert",
            reqwest::Method::POST,
            url,
            Some(format!("multipart/related; boundary={boundary}")),
            Some(body),
        )
        .await?;
    if status != 200 {
        return Err(gcs_error("objects.insert", &b.name, message(&answer)));
    }
    Ok(())
}

/// Make the bucket (labelled as `project`'s) unless it exists and is readable.
async fn ensure_bucket(b: &Bucket, gcp_project: &str, project: &str) -> Result<()> {
    let bucket_url = format!("{}/storage/v1/b/{}", b.base, encode_segment(&b.name));
    let taken = || {
        ProviderError::invalid(
            Some("runtime_bucket".into()),
            format!(
                "the Cloud Storage bucket `{}` exists but these credentials may not use it \
                 (another project's, or no storage.buckets.get): bucket names are global, name \
                 another `runtime_bucket`",
                b.name
            ),
        )
    };
    let (status, found) = b
        .call(
            "buckets.get",
            reqwest::Method::GET,
            bucket_url.clone(),
            None,
            None,
        )
        .await?;
    match status {
        200 => return Ok(()),
        404 => {}
        403 => return Err(taken()),
        _ => return Err(gcs_error("buckets.get", &b.name, message(&found))),
    }
    let mut labels = serde_json::Map::new();
    labels.insert(tags::PROJECT.to_string(), label_value(project).into());
    let wanted = serde_json::Value::Object(labels);
    let body = serde_json::json!({ "name": b.name, "labels": wanted });
    let (status, made) = b
        .call(
            "buckets.insert",
            reqwest::Method::POST,
            format!(
                "{}/storage/v1/b?project={}",
                b.base,
                encode_segment(gcp_project)
            ),
            Some("application/json".to_string()),
            Some(body.to_string().into_bytes()),
        )
        .await?;
    match status {
        200 => {}
        // Made meanwhile: ours (another apply of this project) when we may read it.
        409 => {
            let (status, _) = b
                .call("buckets.get", reqwest::Method::GET, bucket_url, None, None)
                .await?;
            return if status == 200 { Ok(()) } else { Err(taken()) };
        }
        403 => return Err(taken()),
        _ => return Err(gcs_error("buckets.insert", &b.name, message(&made))),
    }
    // Labelled at creation; an answer without the label gets it set.
    if made["labels"] != wanted {
        let (status, patched) = b
            .call(
                "buckets.patch",
                reqwest::Method::PATCH,
                bucket_url,
                Some("application/json".to_string()),
                Some(
                    serde_json::json!({ "labels": wanted })
                        .to_string()
                        .into_bytes(),
                ),
            )
            .await?;
        if status != 200 {
            return Err(gcs_error("buckets.patch", &b.name, message(&patched)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_one_encoded_segment() {
        assert_eq!(
            encode_segment("motorpool/runtime/0.1.0/x86_64-linux/ab/motorpool"),
            "motorpool%2Fruntime%2F0.1.0%2Fx86_64-linux%2Fab%2Fmotorpool"
        );
    }
}
