//! The runtime upload on Cloud Storage against a Cloud Storage emulator on
//! 127.0.0.1 (`support/gcs.rs`): the bucket made and labelled as the
//! project's, the binary uploaded once per content, a V4 signed URL valid
//! for the asked time that serves exactly that file, and, without a key to
//! sign with, an error that says what to set.
//!
//! One test in this binary: it sets the process's environment (the
//! emulator's address and the key), which no other test may see change.

mod support;

use std::time::Duration;

use motorpool_provider::{Provider, ProviderError, RuntimeUpload};
use sha2::{Digest, Sha256};
use support::FakeGce;
use support::gcs::{GcsEmulator, TEST_ACCOUNT, TestKey, http_get};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn upload(dir: &std::path::Path, content: &[u8]) -> RuntimeUpload {
    let path = dir.join(format!("motorpool-{}", content.len()));
    std::fs::write(&path, content).expect("the runtime file");
    RuntimeUpload {
        path,
        sha256: hex(&Sha256::digest(content)),
        version: "0.1.0".into(),
        platform: "x86_64-linux".into(),
        project: "Data.Team".into(),
        valid_for: Duration::from_secs(24 * 3600),
    }
}

/// The query parameters of a URL.
fn query(url: &str) -> Vec<(String, String)> {
    url.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_is_uploaded_once_to_a_labelled_bucket_behind_a_signed_url() {
    let gcs = GcsEmulator::start();
    let key = TestKey::new();
    // SAFETY: the only test of this binary, before it starts any thread of its own.
    unsafe {
        std::env::set_var("STORAGE_EMULATOR_HOST", gcs.url());
        std::env::set_var("GOOGLE_SERVICE_ACCOUNT_PATH", &key.path);
        std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
    }
    let fake = FakeGce::start();
    let dir = tempfile::tempdir().expect("dir");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let runtime = upload(dir.path(), &content);

    // No runtime_bucket: nothing to publish (the spec must give runtime_url).
    let plain = fake.provider(|_| {});
    assert_eq!(
        plain.publish_runtime(&runtime).await.expect("publish"),
        None
    );

    let p = fake.provider(|c| c.runtime_bucket = Some("mp-runtime-test".into()));
    let url = p
        .publish_runtime(&runtime)
        .await
        .expect("publish")
        .expect("a URL");

    // The bucket was made, labelled as the project's.
    let (status, bucket) = gcs.json("/storage/v1/b/mp-runtime-test");
    assert_eq!(status, 200, "{bucket}");
    assert_eq!(
        bucket["labels"]["motorpool-project"], "data_team",
        "{bucket}"
    );
    // One object, named by version, platform and content, with its checksum.
    let objects = gcs.objects("mp-runtime-test");
    assert_eq!(objects.len(), 1, "{objects:#?}");
    let object = &objects[0];
    assert_eq!(object["name"], runtime.object_name().as_str());
    assert_eq!(object["size"], content.len().to_string().as_str());
    assert_eq!(object["metadata"]["sha256"], runtime.sha256.as_str());
    let generation = object["generation"].clone();

    // A V4 signed GET on the configured endpoint, valid 24 hours.
    let path = format!("/mp-runtime-test/{}", runtime.object_name());
    assert!(url.starts_with(&format!("{}{path}?", gcs.url())), "{url}");
    let q = query(&url);
    let param = |name: &str| {
        q.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} in {url}"))
    };
    assert_eq!(param("X-Goog-Algorithm"), "GOOG4-RSA-SHA256");
    assert_eq!(param("X-Goog-Expires"), "86400");
    assert!(
        param("X-Goog-Credential").starts_with(&TEST_ACCOUNT.replace('@', "%40")),
        "{url}"
    );
    assert_eq!(param("X-Goog-SignedHeaders"), "host");
    let signature = param("X-Goog-Signature");
    assert_eq!(signature.len(), 512, "an RSA-2048 signature in hex: {url}");
    // The URL serves exactly the file.
    let (status, _, body) = http_get(gcs.port, &url[gcs.url().len()..]).expect("download");
    assert_eq!(status, 200);
    assert_eq!(hex(&Sha256::digest(&body)), runtime.sha256);

    // A second publish of the same content uploads nothing.
    let again = p
        .publish_runtime(&runtime)
        .await
        .expect("publish again")
        .expect("a URL");
    assert!(again.contains(&path), "{again}");
    let objects = gcs.objects("mp-runtime-test");
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["generation"], generation, "not uploaded again");
    // Another build is another object beside it.
    let other = upload(dir.path(), b"another build");
    p.publish_runtime(&other).await.expect("publish another");
    assert_eq!(gcs.objects("mp-runtime-test").len(), 2);

    // Without a key to sign with, on a local endpoint: a clear error saying
    // what to set, and no look for a metadata server.
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("GOOGLE_SERVICE_ACCOUNT_PATH");
    }
    let unsigned = fake
        .provider(|c| c.runtime_bucket = Some("mp-runtime-test".into()))
        .publish_runtime(&runtime)
        .await;
    match unsigned {
        Err(ProviderError::Auth(message)) => {
            for part in [
                "GOOGLE_APPLICATION_CREDENTIALS",
                "service account key",
                "runtime_url",
            ] {
                assert!(message.contains(part), "{part:?} in {message}");
            }
        }
        other => panic!("expected an error saying what to set: {other:?}"),
    }
}
