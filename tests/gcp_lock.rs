//! The project lock held in the cloud, through the CLI, on GCP: two machines
//! (two `$MOTORPOOL_HOME`s with the same project secret) applying one
//! project against the fake Compute API on 127.0.0.1, where the lock is an
//! item of the GCP project's common instance metadata. The sequence is the
//! one every cloud shares (`common::lock_scenarios`): the second is refused
//! by the lock, naming its holder; `force-unlock` refuses while the holder
//! runs and lets the next apply through once it was killed; and a lock left
//! by a killed holder is taken over once its lease runs out, and at once by
//! the next command of the holder's own home. This file says how the
//! machines reach the fake.

mod common;
#[path = "../providers/gcp/tests/support/mod.rs"]
mod gce;

use std::process::Command;

use common::lock_scenarios::{
    TwoHomes, a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out,
};
use gce::{FakeGce, PROJECT};
use motorpool_provider::{LockInfo, Provider};

const MP_PROJECT: &str = "gcplock";
const RUNTIME_URL: &str = "https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux";
const RUNTIME_SHA256: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// No Google credentials reach a test's processes.
fn without_google_credentials(cmd: &mut Command) {
    cmd.env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST")
        .env("CLOUDSDK_CONFIG", "/nonexistent/motorpool-test-gcloud");
}

/// A pool, and with `cluster` a cluster too: nobody plays its nodes here,
/// so an apply that starts it waits for them (and holds the lock) until killed.
fn spec(fake: &FakeGce, cluster: bool) -> String {
    format!(
        "project: {MP_PROJECT}\nprovider: {{ kind: gcp, project: {PROJECT}, zones: [us-central1-a], \
         endpoint_url: \"{}\", runtime_url: \"{RUNTIME_URL}\", runtime_sha256: {RUNTIME_SHA256} }}\n\
         pools:\n  general: {{ node_type: e2-small, min_idle: 1, max_capacity: 4 }}\n{}",
        fake.url(),
        if cluster {
            "clusters:\n  etl: { node_type: e2-small, workers: 1 }\n"
        } else {
            ""
        }
    )
}

/// The lock as the GCP project's metadata holds it, read with the provider.
fn cloud_lock(fake: &FakeGce) -> Option<LockInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let provider = fake.provider(|_| {});
    rt.block_on(provider.read_lock(MP_PROJECT))
        .expect("read the lock")
}

#[test]
fn a_second_machine_is_refused_by_the_gcp_lock_until_force_unlock_or_the_lease_runs_out() {
    let fake = FakeGce::start();
    a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out(&TwoHomes {
        kind: "gcp",
        project: MP_PROJECT,
        spec: &|cluster| spec(&fake, cluster),
        prepare: &without_google_credentials,
        cloud_lock: &|| cloud_lock(&fake),
        plan_is_clean_after_apply: true,
        after_destroy: &|| {},
    });
}
