//! A local apply killed with SIGKILL at any point: the next apply converges
//! on its first try, and destroy leaves no process behind (checked by pid).
//! Guards the fence around startup steps (a killed apply's step still runs
//! on the agent while the re-run asks for it) and the pid every local agent
//! writes before it can be lost (a launcher killed between fork and record).

mod common;

use std::time::{Duration, Instant};

use common::{Env, is_alive, wait_until};

const SPEC: &str = r#"
project: killed-local
provider: { kind: local }
pools:
  general: { node_type: small, min_idle: 1, max_capacity: 6 }
clusters:
  etl: { pool: general, workers: 2 }
"#;

const TRIALS: u64 = 20;

/// A small seeded generator (xorshift64*), so a failing trial can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Whether some agent's `state.json` says a step is running.
fn step_running(env: &Env) -> bool {
    let instances = env.home().join("local").join("instances");
    std::fs::read_dir(instances).is_ok_and(|dirs| {
        dirs.flatten().any(|d| {
            std::fs::read_to_string(d.path().join("state.json"))
                .is_ok_and(|s| s.contains("\"running\""))
        })
    })
}

#[test]
fn a_local_apply_killed_at_any_point_converges_on_the_next_apply_and_leaves_no_process() {
    let seed = std::env::var("MOTORPOOL_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    // How long a whole apply takes here: kill points are spread over it.
    let full = {
        let env = Env::new();
        env.spec(SPEC);
        let t = Instant::now();
        env.mp(&["apply", "--yes"]).expect_code(0);
        let took = t.elapsed();
        env.mp(&["destroy", "--yes"]).expect_code(0);
        took
    };
    let span = u64::try_from(full.as_millis()).unwrap_or(u64::MAX).max(50);
    let mut rng = Rng(seed | 1);
    for trial in 0..TRIALS {
        let env = Env::new();
        env.spec(SPEC);
        let mut first = env.spawn(&["apply", "--yes"]);
        // Even trials: anywhere in the apply. Odd ones: while a startup
        // step runs on some agent (the step then outlives the apply).
        let point = if trial % 2 == 0 {
            let delay = Duration::from_millis(rng.below(span));
            std::thread::sleep(delay);
            format!("{delay:?} into the apply")
        } else {
            let delay = Duration::from_millis(rng.below(300));
            let running = wait_until(full * 3, || step_running(&env));
            std::thread::sleep(delay);
            format!("{delay:?} after a step was seen running ({running})")
        };
        first.kill9();
        let context =
            format!("trial {trial} (seed {seed}, killed {point}; a whole apply: {full:?})");

        // Everything the killed apply left running, by pid.
        let left_by_kill = env.processes();

        let again = env.mp(&["apply", "--yes"]);
        assert_eq!(
            again.code, 0,
            "{context}: the re-run did not converge on its first try:\n{}\n{}",
            again.stdout, again.stderr
        );
        let plan = env.mp(&["plan", "--detailed-exitcode"]);
        assert_eq!(
            plan.code, 0,
            "{context}: changes left after the re-run:\n{}",
            plan.stdout
        );
        let nodes = env.nodes();
        assert_eq!(nodes.len(), 4, "{context}: {nodes:#?}");
        let mut pids = env.processes();
        pids.extend(left_by_kill);
        pids.extend(
            nodes
                .iter()
                .filter_map(|n| n["pid"].as_i64())
                .map(|p| p as i32),
        );

        let destroyed = env.mp(&["destroy", "--yes"]);
        assert_eq!(
            destroyed.code, 0,
            "{context}: destroy failed:\n{}\n{}",
            destroyed.stdout, destroyed.stderr
        );
        assert!(env.nodes().is_empty(), "{context}: status not empty");
        let gone = wait_until(Duration::from_secs(5), || {
            pids.iter().all(|p| !is_alive(*p)) && env.processes().is_empty()
        });
        assert!(
            gone,
            "{context}: processes left after destroy: {:?} of {pids:?}",
            env.processes()
        );
    }
}
