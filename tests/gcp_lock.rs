//! The project lock held in the cloud, through the CLI, on GCP: two machines
//! (two `$MOTORPOOL_HOME`s with the same project secret) applying one
//! project against the fake Compute API on 127.0.0.1, where the lock is an
//! item of the GCP project's common instance metadata. The second is refused
//! by the lock, naming its holder; `force-unlock` refuses while the holder
//! runs and lets the next apply through once it was killed; and a lock left
//! by a killed holder is taken over once its lease runs out, and at once by
//! the next command of the holder's own home.

mod common;
#[path = "../providers/gcp/tests/support/mod.rs"]
mod gce;

use std::process::Command;
use std::time::Duration;

use common::{Env, Run, wait_until};
use gce::{FakeGce, PROJECT};
use motorpool_provider::{LockInfo, Provider};

const MP_PROJECT: &str = "gcplock";
const LEASE_SECONDS: &str = "3";
const RUNTIME_URL: &str = "https://downloads.example.com/motorpool/0.1.0/motorpool-x86_64-linux";
const RUNTIME_SHA256: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// No Google credentials reach a test's processes.
fn without_google_credentials(cmd: &mut Command) {
    cmd.env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST")
        .env("CLOUDSDK_CONFIG", "/nonexistent/motorpool-test-gcloud");
}

fn mp(env: &Env, args: &[&str]) -> Run {
    env.mp_with(args, without_google_credentials)
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

/// One machine: its own home, the project's shared secret, a short lease.
fn machine(fake: &FakeGce, cluster: bool) -> Env {
    let env = Env::new()
        .with_var("MOTORPOOL_PROJECT_SECRET", "gcplock-shared-project-secret")
        .with_var("MOTORPOOL_LOCK_LEASE_SECONDS", LEASE_SECONDS);
    env.spec(&spec(fake, cluster));
    env
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

/// An apply from `env` that holds the lock and stays (its cluster's nodes
/// never report: nobody plays them), started in the background.
fn holding_apply(fake: &FakeGce, env: &Env) -> (common::ChildGuard, LockInfo) {
    let mut cmd = env.command(&["apply", "--yes"]);
    without_google_credentials(&mut cmd);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn motorpool");
    let guard = common::ChildGuard(Some(child));
    let pid = guard.pid() as u32;
    let mut held = None;
    let took = wait_until(Duration::from_secs(30), || {
        held = cloud_lock(fake).filter(|l| l.pid == pid);
        held.is_some()
    });
    assert!(took, "the apply (pid {pid}) never took the lock");
    (guard, held.expect("held"))
}

#[test]
fn a_second_machine_is_refused_by_the_gcp_lock_until_force_unlock_or_the_lease_runs_out() {
    let fake = FakeGce::start();
    let first = machine(&fake, true);
    let second = machine(&fake, false);

    // The first machine's apply holds the lock in the project's metadata,
    // and keeps it alive past its lease by renewing it.
    let (mut holder, held) = holding_apply(&fake, &first);
    assert_eq!(held.command, "apply");
    assert!(held.owner.contains('@'), "{held:?}");
    std::thread::sleep(Duration::from_secs(5));
    let refused = mp(&second, &["apply", "--yes"]).expect_code(1);
    for part in [
        format!(
            "project `{MP_PROJECT}` is locked in the gcp cloud by {}",
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
    let still = cloud_lock(&fake).expect("still held");
    assert_eq!(still.id, held.id);
    assert!(still.expires > held.expires, "renewed: {still:?} {held:?}");

    // force-unlock refuses while the holder runs (it can tell: same machine),
    // and an id that is not the lock's.
    let alive = mp(&second, &["force-unlock", &held.id, "--yes"]).expect_code(1);
    assert!(
        alive.stderr.contains("still runs on this machine"),
        "{}",
        alive.stderr
    );
    holder.kill9();
    let wrong = mp(&second, &["force-unlock", "0000000000000000", "--yes"]).expect_code(1);
    assert!(wrong.stderr.contains(&held.id), "{}", wrong.stderr);
    assert!(cloud_lock(&fake).is_some());
    let unlocked = mp(&second, &["force-unlock", &held.id, "--yes"]).expect_code(0);
    assert!(unlocked.stdout.contains(&held.owner), "{}", unlocked.stdout);
    assert_eq!(cloud_lock(&fake), None);

    // The next apply goes through, and releases the lock.
    mp(&second, &["apply", "--yes"]).expect_code(0);
    assert_eq!(cloud_lock(&fake), None, "released after the apply");
    mp(&second, &["plan", "--detailed-exitcode"]).expect_code(0);

    // A holder killed without force-unlock: its lock runs out, and the next
    // command takes it over by itself.
    let (mut holder, held) = holding_apply(&fake, &first);
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
    assert_eq!(cloud_lock(&fake), None);

    // The killed holder's own machine (its home) is not refused by the lock
    // it left: nobody else of that home can hold it, so it takes it over at once.
    let (mut holder, held) = holding_apply(&fake, &first);
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
    assert_eq!(cloud_lock(&fake), None);
}
