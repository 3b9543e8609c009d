//! The project lock held in Azure Blob Storage (a blob per project in the
//! provider block's `runtime_container`), against Azurite's blob service on
//! 127.0.0.1 with its well-known development account.
//!
//! First the provider's contract, as every cloud shares it
//! (`providers/testing/lock_contract.rs`): taken by exactly one of many
//! takers at once, refused naming its holder, renewed, taken over once
//! expired (by exactly one of many takers), released and force-unlocked only
//! by its id; with what is Azure's own: the blob it keeps, a wrong account
//! key, and no cloud lock at all without `storage_account`. Then through the
//! CLI, in the sequence every cloud shares (`common::lock_scenarios`): two
//! machines (two `$MOTORPOOL_HOME`s with the same project secret) applying
//! one Azure project against the fake Resource Manager, kept apart by the
//! lock in the container, `force-unlock`, and a killed holder's lock taken
//! over once its lease runs out, and at once by the next command of the
//! holder's own home. This file says how the machines reach the fakes.

#[path = "../providers/azure/tests/support/mod.rs"]
mod arm;
mod common;
#[path = "../providers/testing/lock_contract.rs"]
mod lock_contract;
#[path = "common/object_stores.rs"]
mod object_stores;

use std::process::Command;

use arm::{FakeArm, GROUP, SUBNET, SUBSCRIPTION};
use common::lock_scenarios::{
    TwoHomes, a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out,
};
use lock_contract::{Takeover, lock, now};
use motorpool_azure::lock::lock_blob_name;
use motorpool_azure::{AzureConfig, AzureProvider, StorageConfig};
use motorpool_provider::{LockAttempt, LockInfo, Provider, ProviderError};
use object_stores::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite};

const CONTAINER: &str = "mp-state";

fn blob_endpoint(azurite: &Azurite) -> String {
    format!("{}/{AZURITE_ACCOUNT}", azurite.url())
}

/// A provider whose storage is `CONTAINER` on `azurite` (Resource Manager
/// is never called: its endpoint is a closed loopback port).
fn provider(azurite: &Azurite) -> AzureProvider {
    let mut config = AzureConfig::new(SUBSCRIPTION, GROUP, "westeurope");
    config.endpoint_url = Some("http://127.0.0.1:9".into());
    config.storage = Some(StorageConfig {
        account: AZURITE_ACCOUNT.into(),
        container: CONTAINER.into(),
        blob_endpoint: Some(blob_endpoint(azurite)),
        account_key: Some(AZURITE_KEY.into()),
    });
    AzureProvider::new(config).expect("a valid Azure config")
}

#[tokio::test]
async fn without_storage_there_is_no_cloud_lock() {
    let mut config = AzureConfig::new(SUBSCRIPTION, GROUP, "westeurope");
    config.endpoint_url = Some("http://127.0.0.1:9".into());
    let p = AzureProvider::new(config).expect("config");
    assert_eq!(
        p.try_lock("demo", &lock("a", now() + 60))
            .await
            .expect("no call is made"),
        LockAttempt::NoCloudLock
    );
    assert_eq!(p.read_lock("demo").await.expect("read"), None);
}

#[tokio::test]
async fn of_many_takers_at_once_exactly_one_holds_the_lock_and_the_rest_are_told_who() {
    let azurite = Azurite::start();
    azurite.create_container(CONTAINER);
    let winner =
        lock_contract::of_many_takers_exactly_one_wins(|| provider(&azurite), "demo").await;
    // One blob, where the provider says, holding the winner's lock (read
    // with another client: the test's own signed requests).
    assert_eq!(
        azurite.blobs(CONTAINER, "motorpool/locks/"),
        [lock_blob_name("demo")]
    );
    let body = azurite.get(CONTAINER, &lock_blob_name("demo"));
    let stored: LockInfo = serde_json::from_slice(&body).expect("the blob is a LockInfo");
    assert_eq!(stored.id, winner);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let azurite = Azurite::start();
    // The container is made by the first take when missing.
    lock_contract::the_holder_renews_and_releases_and_only_its_id_unlocks(
        &provider(&azurite),
        "demo",
        "another",
        || assert!(azurite.blobs(CONTAINER, "motorpool/locks/").is_empty()),
    )
    .await;
}

#[tokio::test]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let azurite = Azurite::start();
    // The blob is replaced in place (on its ETag): the winner always
    // replaced the dead lock.
    lock_contract::an_expired_lock_is_taken_over_by_exactly_one(
        || provider(&azurite),
        "demo",
        Takeover::InPlace,
    )
    .await;
}

#[tokio::test]
async fn a_wrong_account_key_is_an_authentication_error_naming_what_to_set() {
    let azurite = Azurite::start();
    let mut config = AzureConfig::new(SUBSCRIPTION, GROUP, "westeurope");
    config.endpoint_url = Some("http://127.0.0.1:9".into());
    config.storage = Some(StorageConfig {
        account: AZURITE_ACCOUNT.into(),
        container: CONTAINER.into(),
        blob_endpoint: Some(blob_endpoint(&azurite)),
        // Valid base64, not the account's key.
        account_key: Some("bm90IHRoZSBrZXk=".into()),
    });
    let p = AzureProvider::new(config).expect("config");
    let refused = p.try_lock("demo", &lock("a", now() + 60)).await;
    match refused {
        Err(ProviderError::Auth(message)) => {
            assert!(
                message.contains("AZURE_STORAGE_ACCOUNT_KEY") && message.contains(AZURITE_ACCOUNT),
                "{message}"
            );
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

// ------------------------------------------------------------- through the CLI

const PROJECT: &str = "azlock";

/// Azurite's key for the CLI, and no other Azure credentials.
fn azure_env(cmd: &mut Command) {
    for var in [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "IDENTITY_ENDPOINT",
        "MSI_ENDPOINT",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_MASTER_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AZURE_CONFIG_DIR", "/nonexistent/motorpool-test-azure")
        .env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
}

/// A pool, and with `cluster` a cluster too: nobody plays its nodes here,
/// so an apply that starts it waits for them (and holds the lock) until killed.
fn spec(fake: &FakeArm, azurite: &Azurite, cluster: bool) -> String {
    format!(
        "project: {PROJECT}\nprovider: {{ kind: azure, subscription_id: {SUBSCRIPTION}, \
         resource_group: {GROUP}, location: westeurope, subnet_id: \"{SUBNET}\", \
         endpoint_url: \"{}\", storage_account: {AZURITE_ACCOUNT}, \
         runtime_container: {CONTAINER}, blob_endpoint: \"{}\", \
         runtime_url: \"https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux\", \
         runtime_sha256: 5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef }}\n\
         pools:\n  general: {{ node_type: Standard_D2s_v5, min_idle: 1, max_capacity: 4 }}\n{}",
        fake.url(),
        blob_endpoint(azurite),
        if cluster {
            "clusters:\n  etl: { node_type: Standard_D2s_v5, workers: 1 }\n"
        } else {
            ""
        }
    )
}

/// The lock as the container holds it, read with the provider directly.
fn cloud_lock(azurite: &Azurite) -> Option<LockInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(provider(azurite).read_lock(PROJECT))
        .expect("read the lock")
}

#[test]
fn a_second_machine_is_refused_by_the_lock_in_the_container_until_force_unlock_or_the_lease_runs_out()
 {
    let fake = FakeArm::start();
    let azurite = Azurite::start();
    a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out(&TwoHomes {
        kind: "azure",
        project: PROJECT,
        spec: &|cluster| spec(&fake, &azurite, cluster),
        prepare: &azure_env,
        cloud_lock: &|| cloud_lock(&azurite),
        plan_is_clean_after_apply: false,
        // Each destroy leaves none of the project's machines.
        after_destroy: &|| assert!(fake.project_vms(PROJECT).is_empty()),
    });
}
