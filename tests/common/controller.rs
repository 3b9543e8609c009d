//! `motorpool controller` in the background of a test, as a user runs it:
//! its log in a file, waited on by what it says, killed on drop.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::{ChildGuard, Env, wait_until};

/// A controller in the background, its log in a file, killed on drop.
pub struct Controller {
    child: ChildGuard,
    log: PathBuf,
}

impl Controller {
    pub fn start(env: &Env, extra: &[&str]) -> Controller {
        let log = env
            .dir
            .path()
            .join(format!("controller-{}.log", fastrand_suffix()));
        let file = std::fs::File::create(&log).expect("controller log");
        let mut args = vec!["controller", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn the controller");
        Controller {
            child: ChildGuard(Some(child)),
            log,
        }
    }

    /// SIGKILL, as a crash would end it.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until its log has `needle`; panics with the log otherwise.
    pub fn wait_for(&self, needle: &str, within: Duration) {
        assert!(
            wait_until(within, || self.log().contains(needle)),
            "the controller never logged {needle:?}:\n{}",
            self.log()
        );
    }

    /// The port its /metrics is served on.
    pub fn metrics_port(&self) -> u16 {
        self.wait_for("serving /metrics", Duration::from_secs(30));
        let log = self.log();
        let at = log
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in:\n{log}"));
        at.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {at}"))
    }

    /// SIGTERM; it must exit 0.
    pub fn stop(self) {
        let (code, log) = self.terminate();
        assert_eq!(code, 0, "{log}");
    }

    /// SIGTERM, then its exit code and log.
    pub fn terminate(mut self) -> (i32, String) {
        // SAFETY: a signal to a child this test started; no memory is touched.
        unsafe {
            libc::kill(self.child.pid(), libc::SIGTERM);
        }
        let mut child = self.child.0.take().expect("running");
        let code = wait_child(&mut child, Duration::from_secs(60));
        (code, self.log())
    }
}

pub fn wait_child(child: &mut std::process::Child, within: Duration) -> i32 {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code().unwrap_or(-1);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
