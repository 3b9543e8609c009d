//! The runtime upload on Azure Blob Storage
//! ([`motorpool_provider::Provider::publish_runtime`]): `apply` hands over a
//! stripped `motorpool` binary, and this puts it in the container the
//! provider block names (`storage_account`, `runtime_container`) and returns
//! a read-only SAS URL the nodes' custom data downloads (and checks against
//! the SHA-256 the engine computed).
//!
//! - **The container** is made when missing, private, with the metadata
//!   `motorpool_project=<project>` (metadata names are C# identifiers on
//!   Azure: no `-`). One that exists is used as it is.
//! - **Once per content**: the blob's name carries the version, platform and
//!   SHA-256 ([`motorpool_provider::RuntimeUpload::object_name`], the same
//!   names as on S3), and its `sha256` metadata is read first, so a second
//!   apply uploads nothing. A blob there under that name with another
//!   checksum (not written by motorpool) is replaced.
//! - **The URL** is a service SAS for that one blob, read only, signed with
//!   the account key, valid from a few minutes ago (clock skew) for the
//!   upload's `valid_for`, HTTPS only unless the endpoint is plain HTTP (an
//!   emulator). Without the key there is no SAS: the error says what to set.
//!
//! It must not touch the project lock's blob (`lock.rs`).

use std::time::Duration;

use motorpool_provider::{ProviderError, Result, RuntimeUpload};

use crate::blob::{Auth, Container, KEY_VARIABLES};
use crate::shared_key::iso8601;

/// The metadata key holding the blob's SHA-256 (`x-ms-meta-sha256`).
const SHA_METADATA: &str = "sha256";

/// The container metadata naming the project it was made for.
pub const PROJECT_METADATA: &str = "motorpool_project";

/// How long one upload may take (the binary is tens of MB).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How far back a SAS starts, for nodes whose clock runs behind.
const CLOCK_SKEW: u64 = 5 * 60;

/// Upload `runtime` to `container` unless it is there already; its SAS URL.
pub(crate) async fn publish(
    http: &reqwest::Client,
    container: &Container,
    auth: &Auth,
    runtime: &RuntimeUpload,
) -> Result<String> {
    let Auth::Key(key) = auth else {
        return Err(ProviderError::Auth(format!(
            "nodes download the runtime through a SAS URL, which is signed with the storage \
             account key: set {} to the key of storage account `{}` (or give `runtime_url` and \
             `runtime_sha256`)",
            KEY_VARIABLES[0], container.account
        )));
    };
    container
        .ensure(http, auth, &[(PROJECT_METADATA, &runtime.project)])
        .await?;
    let name = runtime.object_name();
    let url = container.blob_url(&name)?;
    let head = container.head(http, auth, &url).await?;
    let present = match head.status {
        200 => head
            .header(&format!("x-ms-meta-{SHA_METADATA}"))
            .is_some_and(|sha| sha.eq_ignore_ascii_case(&runtime.sha256)),
        404 => false,
        _ => return Err(container.error("Get Blob Properties", &url, &head)),
    };
    if !present {
        let body = tokio::fs::read(&runtime.path).await.map_err(|e| {
            ProviderError::Internal(format!(
                "cannot read the runtime {}: {e}",
                runtime.path.display()
            ))
        })?;
        let meta = format!("x-ms-meta-{SHA_METADATA}");
        let put = container
            .send(
                http,
                auth,
                reqwest::Method::PUT,
                &url,
                &[
                    ("x-ms-blob-type", "BlockBlob"),
                    ("Content-Type", "application/octet-stream"),
                    (meta.as_str(), runtime.sha256.as_str()),
                ],
                body,
                Some(UPLOAD_TIMEOUT),
            )
            .await?;
        if put.status != 201 {
            return Err(container.error("Put Blob", &url, &put));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sas = key.blob_read_sas(
        &container.name,
        &name,
        &iso8601(now.saturating_sub(CLOCK_SKEW)),
        &iso8601(now + runtime.valid_for.as_secs()),
        container.is_https(),
    );
    let mut signed = url;
    signed.set_query(Some(&sas));
    Ok(signed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_the_account_key_there_is_no_sas_and_the_error_says_what_to_set() {
        let container = Container {
            account: "acmemotorpool".into(),
            name: "motorpool".into(),
            // Nothing listens there: the refusal comes before any request.
            endpoint: url::Url::parse("http://127.0.0.1:9/acmemotorpool").expect("url"),
        };
        let runtime = RuntimeUpload {
            path: "/nonexistent/motorpool".into(),
            sha256: "ab".repeat(32),
            version: "0.1.0".into(),
            platform: "x86_64-linux".into(),
            project: "demo".into(),
            valid_for: Duration::from_secs(3600),
        };
        let http = reqwest::Client::new();
        match publish(&http, &container, &Auth::Token("t".into()), &runtime).await {
            Err(ProviderError::Auth(message)) => {
                for part in ["AZURE_STORAGE_ACCOUNT_KEY", "acmemotorpool", "runtime_url"] {
                    assert!(message.contains(part), "{part} in {message}");
                }
            }
            other => panic!("expected an authentication error, got {other:?}"),
        }
    }
}
