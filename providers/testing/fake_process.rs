//! A fake cloud API played by a Python script of the repository (the GCP and
//! Azure stand-ins): started on 127.0.0.1 on a port of its own choosing (it
//! prints `listening on http://127.0.0.1:PORT`), killed on drop, also when a
//! test fails, and a plain HTTP/1.1 client for its `/_fake/` controls.
//!
//! Test support only: included by path (`#[path]`) from each cloud crate's
//! `tests/support/mod.rs`, so the crates share it without a test crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running fake, or a handle on one another handle started.
pub struct FakeProcess {
    child: Option<Child>,
    pub port: u16,
    log: Option<tempfile::NamedTempFile>,
}

impl FakeProcess {
    /// Start `python3 SCRIPT --host 127.0.0.1 --port 0 ARGS...` and wait for its port.
    pub fn start(script: &Path, args: &[&str]) -> FakeProcess {
        let log = tempfile::Builder::new()
            .prefix("fake-api-")
            .suffix(".log")
            .tempfile()
            .expect("a log file for the fake");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("fake log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("the fake's stdout");
        let mut fake = FakeProcess {
            child: Some(child),
            port: 0,
            log: Some(log),
        };
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        fake.port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{} did not say where it listens ({line:?}):\n{}",
                    script.display(),
                    fake.log_text()
                )
            });
        fake
    }

    /// A handle on a fake another handle started (it stops with that one).
    pub fn attach(port: u16) -> FakeProcess {
        FakeProcess {
            child: None,
            port,
            log: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log.path()).ok())
            .unwrap_or_default()
    }

    /// One request: its status and body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        write!(s, "{head}\r\n{body}")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `POST /_fake/config` with `json` (a partial update).
    pub fn configure(&self, json: &str) {
        let (status, body) = self
            .http("POST", "/_fake/config", &[], json)
            .expect("configure the fake");
        assert_eq!(status, 200, "{body}");
    }

    /// `GET /_fake/requests`: request counts by `METHOD template`.
    pub fn requests(&self) -> serde_json::Value {
        let (_, body) = self
            .http("GET", "/_fake/requests", &[], "")
            .expect("read the fake's counts");
        serde_json::from_str(&body).expect("counts are JSON")
    }

    /// How many requests of `key` (e.g. `GET aggregated/instances`) the fake answered.
    pub fn count(&self, key: &str) -> u64 {
        self.requests()[key].as_u64().unwrap_or(0)
    }

    /// `GET path` of the fake's controls, as JSON.
    pub fn control(&self, path: &str) -> serde_json::Value {
        let (_, body) = self
            .http("GET", path, &[], "")
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
