//! The project lock held in Azure Blob Storage: one blob per project,
//! `motorpool/locks/<project>` ([`lock_blob_name`]) in the provider block's
//! container, whose body is the [`LockInfo`] as JSON.
//!
//! Every change is a conditional write, Azure's atomic compare-and-swap on a
//! blob (as Terraform's `azurerm` backend relies on the Blob service for its
//! state lock):
//!
//! - **take**: Put Blob with `If-None-Match: *`; of two takers at once the
//!   service lets exactly one create it, the other gets 409 (or 412).
//! - **take over** a lock whose expiry passed: Put Blob with `If-Match` the
//!   ETag read with the expired lock. Two takers of one expired lock both
//!   send the same ETag; the first write changes it, so the second gets 412
//!   and reads the new, unexpired lock: never both win. (Unlike the EC2
//!   lock, nothing is deleted first, so there is no window without a lock.)
//! - **renew**: Put Blob with the new expiry, `If-Match` the ETag of the
//!   blob just read and found to carry this holder's id.
//! - **release / force-unlock**: Delete Blob, `If-Match` the ETag of the
//!   blob just read and found to carry the id asked for.
//!
//! Blob *leases* (Lease Blob) are not used: their duration is 15 to 60
//! seconds or infinite, while the engine's lease is its own
//! (`LockInfo::expires`, renewed by its task, taken over once passed); an
//! infinite blob lease left by a killed holder would need breaking, which
//! the expiry already covers.
//!
//! The container is made (private, tagged with the project in its
//! metadata) by the first take that finds it missing.
//!
//! This file owns only the lock's blob; it must not touch the runtime's.

use motorpool_provider::{LockAttempt, LockInfo, ProviderError, Result};

use crate::blob::{Auth, BlobAnswer, Container};
use crate::runtime_store::PROJECT_METADATA;

/// How many write/read rounds a take tries before it reports the lock as
/// held by whoever holds it then (each round is one lost race).
const ROUNDS: usize = 4;

/// The lock's blob name for `project`.
pub fn lock_blob_name(project: &str) -> String {
    format!("motorpool/locks/{project}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The container and credentials the lock lives with.
pub(crate) struct LockStore<'a> {
    pub http: &'a reqwest::Client,
    pub container: &'a Container,
    pub auth: &'a Auth,
}

/// How a conditional write ended.
enum Written {
    Done,
    /// The condition failed: someone else wrote (or deleted) it first.
    Lost,
    /// The container does not exist (yet).
    NoContainer,
}

impl LockStore<'_> {
    async fn send(
        &self,
        method: reqwest::Method,
        project: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(url::Url, BlobAnswer)> {
        let url = self.container.blob_url(&lock_blob_name(project))?;
        let answer = self
            .container
            .send(self.http, self.auth, method, &url, headers, body, None)
            .await?;
        Ok((url, answer))
    }

    /// The lock blob of `project`, with its ETag, if it exists. A body that
    /// cannot be read counts as a lock run out (it holds nothing).
    async fn read(&self, project: &str) -> Result<Option<(String, LockInfo)>> {
        let (url, answer) = self
            .send(reqwest::Method::GET, project, &[], Vec::new())
            .await?;
        match answer.status {
            200 => {
                let etag = answer.etag().ok_or_else(|| {
                    ProviderError::Internal(format!("Get Blob on {url} answered without an ETag"))
                })?;
                let info = serde_json::from_slice(&answer.body).unwrap_or(LockInfo {
                    id: String::new(),
                    owner: "an unknown holder".to_string(),
                    pid: 0,
                    command: String::new(),
                    since: 0,
                    expires: 0,
                });
                Ok(Some((etag, info)))
            }
            404 => Ok(None),
            _ => Err(self.container.error("Get Blob", &url, &answer)),
        }
    }

    /// Write `lock` as the blob's body if `condition` (a header) holds.
    async fn write(
        &self,
        project: &str,
        lock: &LockInfo,
        condition: (&str, &str),
    ) -> Result<Written> {
        let body = serde_json::to_vec(lock)
            .map_err(|e| ProviderError::Internal(format!("cannot encode the lock: {e}")))?;
        let meta = format!("x-ms-meta-{PROJECT_METADATA}");
        let (url, answer) = self
            .send(
                reqwest::Method::PUT,
                project,
                &[
                    ("x-ms-blob-type", "BlockBlob"),
                    ("Content-Type", "application/json"),
                    (meta.as_str(), project),
                    condition,
                ],
                body,
            )
            .await?;
        match answer.status {
            201 => Ok(Written::Done),
            404 if answer.code() == "ContainerNotFound" => Ok(Written::NoContainer),
            // Exists (If-None-Match), changed (If-Match) or deleted (If-Match on nothing).
            409 | 412 | 404 => Ok(Written::Lost),
            _ => Err(self.container.error("Put Blob", &url, &answer)),
        }
    }

    /// Delete the blob if its ETag is still `etag`.
    async fn delete(&self, project: &str, etag: &str) -> Result<Written> {
        let (url, answer) = self
            .send(
                reqwest::Method::DELETE,
                project,
                &[("If-Match", etag)],
                Vec::new(),
            )
            .await?;
        match answer.status {
            202 | 200 => Ok(Written::Done),
            412 | 404 => Ok(Written::Lost),
            _ => Err(self.container.error("Delete Blob", &url, &answer)),
        }
    }

    pub async fn try_lock(&self, project: &str, lock: &LockInfo) -> Result<LockAttempt> {
        let mut taken_over = None;
        let mut last_seen = None;
        for _ in 0..ROUNDS {
            match self.write(project, lock, ("If-None-Match", "*")).await? {
                Written::Done => return Ok(LockAttempt::Taken { taken_over }),
                Written::NoContainer => {
                    // The first lock of a new container: make it, then race for the name.
                    self.container
                        .ensure(self.http, self.auth, &[(PROJECT_METADATA, project)])
                        .await?;
                    continue;
                }
                Written::Lost => {}
            }
            let Some((etag, held)) = self.read(project).await? else {
                continue; // released meanwhile: try to create it again
            };
            if held.id == lock.id {
                // Ours: an earlier try wrote it and its answer was lost.
                return Ok(LockAttempt::Taken { taken_over });
            }
            if !held.expired(now()) {
                return Ok(LockAttempt::Held(held));
            }
            // Run out: replace exactly what was read, or lose to whoever did first.
            if let Written::Done = self.write(project, lock, ("If-Match", &etag)).await? {
                return Ok(LockAttempt::Taken {
                    taken_over: Some(held),
                });
            }
            last_seen = Some(held.clone());
            taken_over = Some(held);
        }
        match last_seen {
            Some(held) => Ok(LockAttempt::Held(held)),
            None => Err(ProviderError::Server(format!(
                "the lock blob {} kept changing hands while it was being taken; try again",
                lock_blob_name(project)
            ))),
        }
    }

    pub async fn renew_lock(&self, project: &str, lock: &LockInfo) -> Result<()> {
        for _ in 0..ROUNDS {
            let Some((etag, held)) = self.read(project).await? else {
                return Err(ProviderError::NotFound(format!(
                    "the lock blob {} is gone",
                    lock_blob_name(project)
                )));
            };
            if held.id != lock.id {
                return Err(ProviderError::NotFound(format!(
                    "the lock blob {} is now lock {} of {}",
                    lock_blob_name(project),
                    held.id,
                    held.owner
                )));
            }
            if let Written::Done = self.write(project, lock, ("If-Match", &etag)).await? {
                return Ok(());
            }
        }
        Err(ProviderError::Server(format!(
            "the lock blob {} kept changing while it was being renewed",
            lock_blob_name(project)
        )))
    }

    pub async fn read_lock(&self, project: &str) -> Result<Option<LockInfo>> {
        Ok(self.read(project).await?.map(|(_, info)| info))
    }

    pub async fn unlock(&self, project: &str, id: &str) -> Result<()> {
        for _ in 0..ROUNDS {
            let Some((etag, held)) = self.read(project).await? else {
                return Ok(());
            };
            if held.id != id {
                return Err(ProviderError::NotFound(format!(
                    "the lock of project `{project}` is {} (held by {}), not {id}",
                    held.id, held.owner
                )));
            }
            if let Written::Done = self.delete(project, &etag).await? {
                return Ok(());
            }
        }
        Err(ProviderError::Server(format!(
            "the lock blob {} kept changing while it was being removed",
            lock_blob_name(project)
        )))
    }
}
