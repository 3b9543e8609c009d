//! The runtime upload on S3 ([`motorpool_provider::Provider::publish_runtime`]):
//! `apply` hands over a stripped `motorpool` binary, and this puts it in the
//! bucket the provider block names (`runtime_bucket`) and returns a
//! presigned GET URL the nodes' user data downloads (and checks against the
//! SHA-256 the engine computed).
//!
//! - **The bucket** is made when missing (`HeadBucket`, then `CreateBucket`
//!   in the client's region) and tagged `motorpool-project=<project>`; one
//!   another account owns, or this one may not read, is an error naming it.
//! - **Once per content**: the object's name carries the version, platform
//!   and SHA-256 ([`motorpool_provider::RuntimeUpload::object_name`]), and
//!   `HeadObject` finds an upload made before, so a second apply uploads
//!   nothing. An object there under that name with another checksum in its
//!   metadata (not written by motorpool) is replaced.
//! - **The URL** is a SigV4 presigned `GetObject`, valid for the upload's
//!   `valid_for` (S3 caps it at 7 days, and at the session's expiry for
//!   temporary credentials). The bucket stays private.
//!

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration, Tag, Tagging};
use motorpool_provider::{ProviderError, Result, RuntimeUpload, tags};

/// The metadata key holding the object's SHA-256 (`x-amz-meta-sha256`).
const SHA_METADATA: &str = "sha256";

/// S3's longest presigned URL lifetime.
const MAX_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long one upload may take (the binary is tens of MB).
pub(crate) const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn s3_error(call: &str, bucket: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Internal(format!("S3 {call} on bucket `{bucket}`: {e}"))
}

/// Upload `runtime` to `bucket` unless it is there already; its presigned URL.
pub(crate) async fn publish(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    runtime: &RuntimeUpload,
) -> Result<String> {
    let s3 = s3.clone();
    ensure_bucket(&s3, bucket, &runtime.project).await?;
    let key = runtime.object_name();
    let present = match s3.head_object().bucket(bucket).key(&key).send().await {
        Ok(head) => head
            .metadata()
            .and_then(|m| m.get(SHA_METADATA))
            .is_some_and(|sha| sha.eq_ignore_ascii_case(&runtime.sha256)),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => false,
        Err(e) => return Err(s3_error("HeadObject", bucket, e.into_service_error())),
    };
    if !present {
        let body = ByteStream::from_path(&runtime.path).await.map_err(|e| {
            ProviderError::Internal(format!(
                "cannot read the runtime {}: {e}",
                runtime.path.display()
            ))
        })?;
        s3.put_object()
            .bucket(bucket)
            .key(&key)
            .body(body)
            .metadata(SHA_METADATA, &runtime.sha256)
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(|e| s3_error("PutObject", bucket, e.into_service_error()))?;
    }
    let lifetime = runtime.valid_for.min(MAX_URL_LIFETIME);
    let presigning = PresigningConfig::expires_in(lifetime)
        .map_err(|e| ProviderError::Internal(format!("cannot presign for {lifetime:?}: {e}")))?;
    let request = s3
        .get_object()
        .bucket(bucket)
        .key(&key)
        .presigned(presigning)
        .await
        .map_err(|e| s3_error("presign GetObject", bucket, e))?;
    Ok(request.uri().to_string())
}

/// Make `bucket` (tagged as `project`'s) unless it exists and is readable.
async fn ensure_bucket(s3: &aws_sdk_s3::Client, bucket: &str, project: &str) -> Result<()> {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => return Ok(()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            return Err(match status {
                Some(403) => ProviderError::invalid(
                    Some("runtime_bucket".into()),
                    format!(
                        "the S3 bucket `{bucket}` exists but these credentials may not use it \
                         (another account's, or no s3:ListBucket): name another `runtime_bucket`"
                    ),
                ),
                _ => s3_error("HeadBucket", bucket, e.into_service_error()),
            });
        }
    }
    let mut create = s3.create_bucket().bucket(bucket);
    // us-east-1 takes no location constraint; every other region needs one.
    if let Some(region) = s3.config().region().map(|r| r.as_ref().to_string())
        && region != "us-east-1"
    {
        create = create.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region.as_str()))
                .build(),
        );
    }
    match create.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_bucket_already_owned_by_you()) => {}
        Err(e) => {
            let e = e.into_service_error();
            if e.is_bucket_already_exists() {
                return Err(ProviderError::invalid(
                    Some("runtime_bucket".into()),
                    format!(
                        "the S3 bucket name `{bucket}` is taken by another account: bucket names \
                         are global, name another `runtime_bucket`"
                    ),
                ));
            }
            return Err(s3_error("CreateBucket", bucket, e));
        }
    }
    let tagging = Tagging::builder()
        .tag_set(
            Tag::builder()
                .key(tags::PROJECT)
                .value(project)
                .build()
                .map_err(|e| ProviderError::Internal(e.to_string()))?,
        )
        .build()
        .map_err(|e| ProviderError::Internal(e.to_string()))?;
    s3.put_bucket_tagging()
        .bucket(bucket)
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| s3_error("PutBucketTagging", bucket, e.into_service_error()))?;
    Ok(())
}
