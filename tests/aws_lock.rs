//! The project lock held in the cloud, through the CLI: two machines (two
//! `$MOTORPOOL_HOME`s with the same project secret) applying one AWS project
//! against moto's EC2 server on 127.0.0.1. The sequence is the one every
//! cloud shares (`common::lock_scenarios`): the second is refused by the
//! lock in EC2, naming its holder; `force-unlock` refuses while the holder
//! runs and lets the next apply through once it was killed; and a lock left
//! by a killed holder is taken over once its lease runs out, so it never
//! blocks forever, and at once by the next command of the holder's own home.
//! This file says how the machines reach moto.

mod common;
#[path = "../providers/aws/tests/support/mod.rs"]
mod moto;

use common::lock_scenarios::{
    TwoHomes, a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out,
};
use moto::{AMI, Moto};
use motorpool_provider::{LockInfo, Provider};

const PROJECT: &str = "awslock";

/// A pool, and with `cluster` a cluster too: nobody plays its nodes here,
/// so an apply that starts it waits for them (and holds the lock) until killed.
fn spec(endpoint: &str, cluster: bool) -> String {
    format!(
        "project: {PROJECT}\nprovider: {{ kind: aws, region: {}, image: {AMI}, endpoint_url: \"{endpoint}\", \
         runtime_url: \"https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux\", \
         runtime_sha256: 5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef }}\n\
         pools:\n  general: {{ node_type: t3.micro, min_idle: 1, max_capacity: 4 }}\n{}",
        moto::REGION,
        if cluster {
            "clusters:\n  etl: { node_type: t3.micro, workers: 1 }\n"
        } else {
            ""
        }
    )
}

/// The lock as EC2 holds it, read with the provider directly.
fn cloud_lock(moto: &Moto) -> Option<LockInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let provider = moto::provider(&moto.url(), |_| {});
    rt.block_on(provider.read_lock(PROJECT))
        .expect("read the lock")
}

#[test]
fn a_second_machine_is_refused_by_the_cloud_lock_until_force_unlock_or_the_lease_runs_out() {
    let moto = Moto::start();
    let url = moto.url();
    a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out(&TwoHomes {
        kind: "aws",
        project: PROJECT,
        spec: &|cluster| spec(&url, cluster),
        prepare: &|cmd| moto::with_aws_env(cmd, None),
        cloud_lock: &|| cloud_lock(&moto),
        plan_is_clean_after_apply: true,
        after_destroy: &|| {},
    });
}
