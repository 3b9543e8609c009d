//! The project lock held in Azure Blob Storage (a blob per project in the
//! provider block's `runtime_container`), against Azurite's blob service on
//! 127.0.0.1 with its well-known development account.
//!
//! First the provider's contract: taken by exactly one of many takers at
//! once, refused naming its holder, renewed, taken over once expired (by
//! exactly one of many takers), released and force-unlocked only by its id;
//! and no cloud lock at all without `storage_account`. Then through the CLI:
//! two machines (two `$MOTORPOOL_HOME`s with the same project secret)
//! applying one Azure project against the fake Resource Manager, kept apart
//! by the lock in the container, `force-unlock`, and a killed holder's lock
//! taken over once its lease runs out, and at once by the next command of
//! the holder's own home.

#[path = "../providers/azure/tests/support/mod.rs"]
mod arm;
mod common;
#[path = "common/object_stores.rs"]
mod object_stores;

use std::process::Command;
use std::time::Duration;

use arm::{FakeArm, GROUP, SUBNET, SUBSCRIPTION};
use common::{Env, Run, wait_until};
use motorpool_azure::lock::lock_blob_name;
use motorpool_azure::{AzureConfig, AzureProvider, StorageConfig};
use motorpool_provider::{LockAttempt, LockInfo, Provider, ProviderError};
use object_stores::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite};

const CONTAINER: &str = "mp-state";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock(id: &str, expires: u64) -> LockInfo {
    LockInfo {
        id: id.into(),
        owner: format!("ci@runner-{id}"),
        pid: 4242,
        command: "apply".into(),
        since: now(),
        expires,
    }
}

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
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = provider(&azurite);
            let l = lock(&format!("t{i}"), now() + 600);
            tokio::spawn(async move { (l.id.clone(), p.try_lock("demo", &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut told = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        match attempt.expect("try_lock") {
            LockAttempt::Taken { taken_over } => {
                assert_eq!(taken_over, None);
                winners.push(id);
            }
            LockAttempt::Held(holder) => told.push(holder),
            LockAttempt::NoCloudLock => panic!("with storage, Azure keeps a cloud lock"),
        }
    }
    assert_eq!(winners.len(), 1, "one winner: {winners:?}");
    assert_eq!(told.len(), 5);
    for holder in &told {
        assert_eq!(holder.id, winners[0]);
        assert_eq!(holder.owner, format!("ci@runner-{}", winners[0]));
        assert_eq!(holder.pid, 4242);
        assert_eq!(holder.command, "apply");
    }
    // One blob, where the provider says, holding the winner's lock (read
    // with another client: the test's own signed requests).
    assert_eq!(
        azurite.blobs(CONTAINER, "motorpool/locks/"),
        [lock_blob_name("demo")]
    );
    let body = azurite.get(CONTAINER, &lock_blob_name("demo"));
    let stored: LockInfo = serde_json::from_slice(&body).expect("the blob is a LockInfo");
    assert_eq!(stored.id, winners[0]);
}

#[tokio::test]
async fn the_holder_renews_releases_and_only_its_id_unlocks() {
    let azurite = Azurite::start();
    let p = provider(&azurite);
    // The container is made by the first take when missing.
    let mine = lock("mine", now() + 600);
    assert!(matches!(
        p.try_lock("demo", &mine).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    let mut renewed = mine.clone();
    renewed.expires = now() + 1200;
    p.renew_lock("demo", &renewed).await.expect("renew");
    assert_eq!(
        p.read_lock("demo").await.expect("read"),
        Some(renewed.clone())
    );
    // Another id neither renews nor unlocks it.
    let other = lock("other", now() + 600);
    assert!(matches!(
        p.renew_lock("demo", &other).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock("demo", "other").await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.try_lock("demo", &other).await.expect("try"),
        LockAttempt::Held(held) if held == renewed
    ));
    p.unlock("demo", "mine").await.expect("release");
    assert_eq!(p.read_lock("demo").await.expect("read"), None);
    assert!(azurite.blobs(CONTAINER, "motorpool/locks/").is_empty());
    // Released twice is fine; a renewal after it is a lost lock.
    p.unlock("demo", "mine").await.expect("release again");
    assert!(matches!(
        p.renew_lock("demo", &renewed).await,
        Err(ProviderError::NotFound(_))
    ));
    // Other projects have locks of their own.
    assert!(matches!(
        p.try_lock("demo", &other).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    assert!(matches!(
        p.try_lock("another", &mine).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    // Taking a lock one holds already (its answer lost) is taking it.
    assert_eq!(
        p.try_lock("another", &mine).await.expect("again"),
        LockAttempt::Taken { taken_over: None }
    );
}

#[tokio::test]
async fn an_expired_lock_is_taken_over_by_exactly_one_of_many_takers() {
    let azurite = Azurite::start();
    let p = provider(&azurite);
    let dead = lock("dead", now().saturating_sub(5));
    assert!(matches!(
        p.try_lock("demo", &dead).await.expect("take"),
        LockAttempt::Taken { .. }
    ));
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let p = provider(&azurite);
            let l = lock(&format!("t{i}"), now() + 600);
            tokio::spawn(async move { (l.id.clone(), p.try_lock("demo", &l).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for t in takers {
        let (id, attempt) = t.await.expect("taker");
        match attempt.expect("try_lock") {
            LockAttempt::Taken { taken_over } => {
                // The lock is replaced in place: the winner always replaced the dead one.
                assert_eq!(taken_over.map(|l| l.id).as_deref(), Some("dead"));
                winners.push(id);
            }
            LockAttempt::Held(holder) => assert_ne!(holder.id, "dead"),
            LockAttempt::NoCloudLock => panic!("with storage, Azure keeps a cloud lock"),
        }
    }
    assert_eq!(winners.len(), 1, "one taker wins: {winners:?}");
    let held = p.read_lock("demo").await.expect("read").expect("held");
    assert_eq!(held.id, winners[0]);
    // The dead holder's renewal finds its lock gone, and so does its release.
    assert!(matches!(
        p.renew_lock("demo", &dead).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.unlock("demo", "dead").await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(p.read_lock("demo").await.expect("read"), Some(held));
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
const LEASE_SECONDS: &str = "3";

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

fn mp(env: &Env, args: &[&str]) -> Run {
    env.mp_with(args, azure_env)
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

/// One machine: its own home, the project's shared secret, a short lease.
fn machine(fake: &FakeArm, azurite: &Azurite, cluster: bool) -> Env {
    let env = Env::new()
        .with_var("MOTORPOOL_PROJECT_SECRET", "azlock-shared-project-secret")
        .with_var("MOTORPOOL_LOCK_LEASE_SECONDS", LEASE_SECONDS);
    env.spec(&spec(fake, azurite, cluster));
    env
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

/// An apply from `env` that holds the lock and stays (its cluster's nodes
/// never report: nobody plays them), started in the background.
fn holding_apply(azurite: &Azurite, env: &Env) -> (common::ChildGuard, LockInfo) {
    let mut cmd = env.command(&["apply", "--yes"]);
    azure_env(&mut cmd);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn motorpool");
    let guard = common::ChildGuard(Some(child));
    let pid = guard.pid() as u32;
    let mut held = None;
    let took = wait_until(Duration::from_secs(30), || {
        held = cloud_lock(azurite).filter(|l| l.pid == pid);
        held.is_some()
    });
    assert!(took, "the apply (pid {pid}) never took the lock");
    (guard, held.expect("held"))
}

#[test]
fn a_second_machine_is_refused_by_the_lock_in_the_container_until_force_unlock_or_the_lease_runs_out()
 {
    let fake = FakeArm::start();
    let azurite = Azurite::start();
    let first = machine(&fake, &azurite, true);
    let second = machine(&fake, &azurite, false);

    // The first machine's apply holds the lock in the container, and keeps
    // it alive past its lease by renewing it.
    let (mut holder, held) = holding_apply(&azurite, &first);
    assert_eq!(held.command, "apply");
    assert!(held.owner.contains('@'), "{held:?}");
    std::thread::sleep(Duration::from_secs(5));
    let refused = mp(&second, &["apply", "--yes"]).expect_code(1);
    for part in [
        format!(
            "project `{PROJECT}` is locked in the azure cloud by {}",
            held.owner
        ),
        format!("pid {}", holder.pid()),
        "`motorpool apply`".to_string(),
        format!("motorpool force-unlock {}", held.id),
    ] {
        assert!(
            refused.stderr.contains(&part),
            "{part:?} in:\n{}",
            refused.stderr
        );
    }
    assert_eq!(cloud_lock(&azurite).map(|l| l.id), Some(held.id.clone()));

    // force-unlock refuses while the holder runs (same machine), and an id
    // that is not the lock's.
    let alive = mp(&second, &["force-unlock", &held.id, "--yes"]).expect_code(1);
    assert!(
        alive.stderr.contains("still runs on this machine"),
        "{}",
        alive.stderr
    );
    holder.kill9();
    let wrong = mp(&second, &["force-unlock", "0000000000000000", "--yes"]).expect_code(1);
    assert!(wrong.stderr.contains(&held.id), "{}", wrong.stderr);
    assert!(cloud_lock(&azurite).is_some());
    let unlocked = mp(&second, &["force-unlock", &held.id, "--yes"]).expect_code(0);
    assert!(unlocked.stdout.contains(&held.owner), "{}", unlocked.stdout);
    assert_eq!(cloud_lock(&azurite), None);

    // The next apply goes through, and releases the lock.
    mp(&second, &["apply", "--yes"]).expect_code(0);
    assert_eq!(cloud_lock(&azurite), None, "released after the apply");

    // A holder killed without force-unlock: its lock runs out, and the next
    // command takes it over by itself.
    let (mut holder, held) = holding_apply(&azurite, &first);
    holder.kill9();
    let mut last = None;
    let through = wait_until(Duration::from_secs(30), || {
        let run = mp(&second, &["destroy", "--yes"]);
        let done = run.code == 0;
        last = Some(run);
        done
    });
    let last = last.expect("a destroy ran");
    assert!(through, "the stale lock still blocks:\n{}", last.stderr);
    assert!(
        last.stdout
            .contains(&format!("Took over the project lock of {}", held.owner)),
        "{}",
        last.stdout
    );
    assert_eq!(cloud_lock(&azurite), None);
    assert!(fake.project_vms(PROJECT).is_empty());

    // The killed holder's own machine (its home) is not refused by the lock
    // it left: nobody else of that home can hold it, so it takes it over at once.
    let (mut holder, held) = holding_apply(&azurite, &first);
    holder.kill9();
    let again = mp(&first, &["destroy", "--yes"]).expect_code(0);
    assert!(
        again
            .stdout
            .contains("Took over the project lock left by a killed motorpool of this machine"),
        "{}",
        again.stdout
    );
    assert!(again.stdout.contains(&held.id), "{}", again.stdout);
    assert_eq!(cloud_lock(&azurite), None);
}
