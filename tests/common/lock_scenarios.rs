//! The project lock through the CLI, written once for every cloud: two
//! machines (two `$MOTORPOOL_HOME`s with the same project secret) applying
//! one project, kept apart by the lock in the cloud. It owns the sequence
//! (refusal naming the holder, `force-unlock`, takeover after the lease,
//! takeover by the killed holder's own home); each cloud's test file says
//! how its machines reach its stand-in ([`TwoHomes`]) and starts that
//! stand-in itself.

use std::process::{Command, Stdio};
use std::time::Duration;

use motorpool_provider::LockInfo;

use super::{ChildGuard, Env, Run, wait_until};

/// How one cloud's two machines are prepared, and how its lock is read.
pub struct TwoHomes<'a> {
    /// The provider kind, as the refusal names it (`aws`, `gcp`, `azure`).
    pub kind: &'a str,
    /// The motorpool project in the spec.
    pub project: &'a str,
    /// The spec text, with a cluster (nobody plays its nodes, so an apply
    /// that starts it waits, holding the lock, until killed) or without.
    pub spec: &'a dyn Fn(bool) -> String,
    /// What each command's environment needs to reach the stand-in (and
    /// nothing of the machine's real credentials).
    pub prepare: &'a dyn Fn(&mut Command),
    /// The lock as the cloud holds it, read with the provider directly.
    pub cloud_lock: &'a dyn Fn() -> Option<LockInfo>,
    /// Whether a `plan --detailed-exitcode` after the apply that got through
    /// must find nothing to do.
    pub plan_is_clean_after_apply: bool,
    /// The cloud's own check after each `destroy` that took over a lock.
    pub after_destroy: &'a dyn Fn(),
}

impl TwoHomes<'_> {
    fn mp(&self, env: &Env, args: &[&str]) -> Run {
        env.mp_with(args, |cmd| (self.prepare)(cmd))
    }

    /// One machine: its own home, the project's shared secret, a 3 s lease.
    fn machine(&self, cluster: bool) -> Env {
        let secret = format!("{}-shared-project-secret", self.project);
        let env = Env::new()
            .with_var("MOTORPOOL_PROJECT_SECRET", &secret)
            .with_var("MOTORPOOL_LOCK_LEASE_SECONDS", "3");
        env.spec(&(self.spec)(cluster));
        env
    }

    /// An apply from `env` that holds the lock and stays (its cluster's
    /// nodes never report), started in the background.
    fn holding_apply(&self, env: &Env) -> (ChildGuard, LockInfo) {
        let mut cmd = env.command(&["apply", "--yes"]);
        (self.prepare)(&mut cmd);
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn motorpool");
        let guard = ChildGuard(Some(child));
        let pid = guard.pid() as u32;
        let mut held = None;
        let took = wait_until(Duration::from_secs(30), || {
            held = (self.cloud_lock)().filter(|l| l.pid == pid);
            held.is_some()
        });
        assert!(took, "the apply (pid {pid}) never took the lock");
        (guard, held.expect("held"))
    }
}

/// The whole sequence: the second machine is refused by the first's lock
/// (naming holder, pid, command and the `force-unlock` to run), which the
/// holder renews past its lease; `force-unlock` refuses while the holder
/// runs and for a wrong id, then frees it; a killed holder's lock is taken
/// over once its lease ran out, and at once by its own home's next command.
pub fn a_second_machine_is_refused_until_force_unlock_or_the_lease_runs_out(case: &TwoHomes) {
    let first = case.machine(true);
    let second = case.machine(false);

    // The first machine's apply holds the lock in the cloud, and keeps it
    // alive past its lease by renewing it.
    let (mut holder, held) = case.holding_apply(&first);
    assert_eq!(held.command, "apply");
    assert!(held.owner.contains('@'), "{held:?}");
    std::thread::sleep(Duration::from_secs(5));
    let refused = case.mp(&second, &["apply", "--yes"]).expect_code(1);
    for part in [
        format!(
            "project `{}` is locked in the {} cloud by {}",
            case.project, case.kind, held.owner
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
    let still = (case.cloud_lock)().expect("still held");
    assert_eq!(still.id, held.id);
    assert!(still.expires > held.expires, "renewed: {still:?} {held:?}");

    // force-unlock refuses while the holder runs (it can tell: same
    // machine), and an id that is not the lock's.
    let alive = case
        .mp(&second, &["force-unlock", &held.id, "--yes"])
        .expect_code(1);
    assert!(
        alive.stderr.contains("still runs on this machine"),
        "{}",
        alive.stderr
    );
    holder.kill9();
    let wrong = case
        .mp(&second, &["force-unlock", "0000000000000000", "--yes"])
        .expect_code(1);
    assert!(wrong.stderr.contains(&held.id), "{}", wrong.stderr);
    assert!((case.cloud_lock)().is_some());
    let unlocked = case
        .mp(&second, &["force-unlock", &held.id, "--yes"])
        .expect_code(0);
    assert!(unlocked.stdout.contains(&held.owner), "{}", unlocked.stdout);
    assert_eq!((case.cloud_lock)(), None);

    // The next apply goes through, and releases the lock.
    case.mp(&second, &["apply", "--yes"]).expect_code(0);
    assert_eq!((case.cloud_lock)(), None, "released after the apply");
    if case.plan_is_clean_after_apply {
        case.mp(&second, &["plan", "--detailed-exitcode"])
            .expect_code(0);
    }

    // A holder killed without force-unlock: its lock runs out, and the next
    // command takes it over by itself.
    let (mut holder, held) = case.holding_apply(&first);
    holder.kill9();
    let mut last = None;
    let through = wait_until(Duration::from_secs(30), || {
        let run = case.mp(&second, &["destroy", "--yes"]);
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
    assert_eq!((case.cloud_lock)(), None);
    (case.after_destroy)();

    // The killed holder's own machine (its home) is not refused by the lock
    // it left: nobody else of that home can hold it, so it takes it over at once.
    let (mut holder, held) = case.holding_apply(&first);
    holder.kill9();
    let again = case.mp(&first, &["destroy", "--yes"]).expect_code(0);
    assert!(
        again
            .stdout
            .contains("Took over the project lock left by a killed motorpool of this machine"),
        "{}",
        again.stdout
    );
    assert!(again.stdout.contains(&held.id), "{}", again.stdout);
    assert_eq!((case.cloud_lock)(), None);
    (case.after_destroy)();
}
