//! The provider's own container in Azure Blob Storage (the provider block's
//! `storage_account` and `runtime_container`): plain HTTPS calls to the Blob
//! service, the few motorpool needs — make the container, read a blob's
//! properties or body, put a blob (optionally only if absent, or only if its
//! ETag is still the one read), delete one by ETag — and a read-only SAS
//! URL for one blob. What is stored there (the runtime, the project lock) is
//! `runtime_store.rs`'s and `lock.rs`'s business; how a request is signed,
//! `shared_key.rs`'s.
//!
//! Requests are authorised with the account key when the environment gives
//! one (`AZURE_STORAGE_ACCOUNT_KEY`, or `AZURE_STORAGE_ACCESS_KEY` /
//! `AZURE_STORAGE_MASTER_KEY` as `object_store` reads them), else with a
//! bearer token of the standard Azure chain for Storage (the identity needs
//! a "Storage Blob Data Contributor" role on the account). A SAS URL needs
//! the key.

use std::time::Duration;

use motorpool_provider::{ProviderError, Result};
use url::Url;

use crate::shared_key::{AccountKey, STORAGE_VERSION, ToSign, http_date};

/// The environment variables the account key is read from, first set wins.
pub const KEY_VARIABLES: &[&str] = &[
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
];

/// How requests are authorised.
#[derive(Debug, Clone)]
pub enum Auth {
    Key(AccountKey),
    /// A bearer token for `https://storage.azure.com/` from the standard chain.
    Token(String),
}

/// Where the container is and who asks.
#[derive(Debug, Clone)]
pub struct Container {
    pub account: String,
    pub name: String,
    /// The account's blob service root: `https://ACCOUNT.blob.core.windows.net`,
    /// or an emulator's (`http://127.0.0.1:10000/devstoreaccount1`).
    pub endpoint: Url,
}

/// One answer of the Blob service.
#[derive(Debug)]
pub struct BlobAnswer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl BlobAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The service's error code (`x-ms-error-code`), if any.
    pub fn code(&self) -> &str {
        self.header("x-ms-error-code").unwrap_or("")
    }

    pub fn etag(&self) -> Option<String> {
        self.header("etag").map(str::to_string)
    }

    fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let message = body
            .split("<Message>")
            .nth(1)
            .and_then(|m| m.split("</Message>").next())
            .map(|m| m.lines().next().unwrap_or(m).to_string())
            .unwrap_or_default();
        format!("HTTP {} {} {}", self.status, self.code(), message)
            .trim()
            .to_string()
    }
}

/// The account key from the environment, if one is set.
pub fn key_from_env(account: &str) -> Result<Option<AccountKey>> {
    for var in KEY_VARIABLES {
        if let Some(value) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return AccountKey::new(account, &value)
                .map(Some)
                .map_err(|e| ProviderError::Auth(format!("{var}: {e}")));
        }
    }
    Ok(None)
}

impl Container {
    /// The URL of `blob` in the container (each `/`-separated part encoded).
    pub fn blob_url(&self, blob: &str) -> Result<Url> {
        let mut url = self.endpoint.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|()| {
                ProviderError::invalid(
                    Some("provider.blob_endpoint".to_string()),
                    format!("`{}` cannot hold a path", self.endpoint),
                )
            })?;
            segments.pop_if_empty().push(&self.name);
            for part in blob.split('/').filter(|p| !p.is_empty()) {
                segments.push(part);
            }
        }
        Ok(url)
    }

    fn container_url(&self) -> Result<Url> {
        let mut url = self.blob_url("")?;
        url.set_query(Some("restype=container"));
        Ok(url)
    }

    pub fn is_https(&self) -> bool {
        self.endpoint.scheme() == "https"
    }

    /// A HEAD of `url` (the container's or a blob's properties).
    pub async fn head(&self, http: &reqwest::Client, auth: &Auth, url: &Url) -> Result<BlobAnswer> {
        self.send(
            http,
            auth,
            reqwest::Method::HEAD,
            url,
            &[],
            Vec::new(),
            None,
        )
        .await
    }

    /// One request, signed; any status is an answer (the caller reads it),
    /// a request that got none is [`ProviderError::Server`] (retryable).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        http: &reqwest::Client,
        auth: &Auth,
        method: reqwest::Method,
        url: &Url,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<BlobAnswer> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut all: Vec<(String, String)> = vec![
            ("x-ms-date".into(), http_date(now)),
            ("x-ms-version".into(), STORAGE_VERSION.into()),
        ];
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let authorization = match auth {
            Auth::Key(key) => key.authorization(&ToSign {
                method: method.as_str(),
                url,
                headers: &all,
                content_length: body.len(),
            }),
            Auth::Token(token) => format!("Bearer {token}"),
        };
        let mut request = http
            .request(method.clone(), url.clone())
            .header("Authorization", authorization);
        for (k, v) in &all {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        // Content-Length is sent (and signed) for every body, also an empty one.
        request = request.body(body);
        let call = format!("{method} {}", self.redacted(url));
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError::Server(format!("Blob service {call}: {e}")))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| ProviderError::Server(format!("Blob service {call}: {e}")))?
            .to_vec();
        Ok(BlobAnswer {
            status,
            headers,
            body,
        })
    }

    /// `url` without its query (a SAS must not end up in a message).
    fn redacted(&self, url: &Url) -> String {
        let mut url = url.clone();
        url.set_query(None);
        url.to_string()
    }

    /// The error of an unexpected answer to `call` on `url`.
    pub fn error(&self, call: &str, url: &Url, answer: &BlobAnswer) -> ProviderError {
        let text = format!(
            "Blob service {call} on {}: {}",
            self.redacted(url),
            answer.describe()
        );
        match answer.status {
            401 | 403 => ProviderError::Auth(format!(
                "{text} (storage account `{}`: set {} to its key, or give this identity a \
                 Storage Blob Data role on it)",
                self.account, KEY_VARIABLES[0]
            )),
            404 => ProviderError::NotFound(text),
            429 => ProviderError::Throttled(text),
            500..=599 => ProviderError::Server(text),
            _ => ProviderError::Internal(text),
        }
    }

    /// Make the container, private, with `metadata`, unless it exists.
    pub async fn ensure(
        &self,
        http: &reqwest::Client,
        auth: &Auth,
        metadata: &[(&str, &str)],
    ) -> Result<()> {
        let url = self.container_url()?;
        let head = self.head(http, auth, &url).await?;
        if head.status == 200 {
            return Ok(());
        }
        if head.status != 404 {
            return Err(self.error("Get Container Properties", &url, &head));
        }
        let names: Vec<(String, &str)> = metadata
            .iter()
            .map(|(k, v)| (format!("x-ms-meta-{k}"), *v))
            .collect();
        let headers: Vec<(&str, &str)> = names.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let made = self
            .send(
                http,
                auth,
                reqwest::Method::PUT,
                &url,
                &headers,
                Vec::new(),
                None,
            )
            .await?;
        match made.status {
            201 => Ok(()),
            // Made meanwhile by someone else (another apply): it exists.
            409 if made.code() == "ContainerAlreadyExists" => Ok(()),
            _ => Err(self.error("Create Container", &url, &made)),
        }
    }
}
