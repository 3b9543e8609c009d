//! Test support for the AWS provider: moto's EC2 server on loopback, and a
//! fault-injecting HTTP proxy in front of it. Shared by the provider's tests
//! (`providers/aws/tests/`) and the CLI's (`tests/aws.rs`, through `#[path]`).
//!
//! Nothing here talks to anything but 127.0.0.1: moto listens on a free
//! loopback port, every client gets an explicit loopback endpoint, static
//! fake credentials and a region, and `AWS_EC2_METADATA_DISABLED=true`.
//!
//! moto comes from `$MOTORPOOL_MOTO_SERVER` (a `moto_server` program;
//! `scripts/test` sets it), else from a virtualenv this module makes in
//! `<cargo target dir>/moto-venv` with `python3 -m venv` and a pinned
//! `moto[server]` from PyPI. When neither works the tests fail with the reason:
//! they are never skipped.
//!
//! Every process started here is killed when its guard drops, also when the
//! test panics.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use motorpool_aws::{AwsConfig, AwsProvider, Credentials};

#[path = "../../../testing/install_once.rs"]
mod install_once;

/// The moto release the tests run against (`scripts/test` pins the same).
pub const MOTO_VERSION: &str = "5.2.5";
pub const REGION: &str = "us-east-1";
pub const ACCESS_KEY_ID: &str = "AKIAMOTORPOOLTEST000";
pub const SECRET_ACCESS_KEY: &str = "motorpool-test-secret-not-a-real-key";
/// One of moto's built-in images (Amazon Linux, x86_64, root device /dev/xvda).
pub const AMI: &str = "ami-760aaa0f";

/// The environment every process that talks to moto gets (and nothing from
/// the caller's AWS setup: no profile, no real endpoint, no IMDS).
pub fn aws_env(endpoint: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_CONFIG_FILE", "/dev/null".to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_string()),
    ];
    if let Some(url) = endpoint {
        env.push(("AWS_ENDPOINT_URL", url.to_string()));
    }
    env
}

/// Variables removed from child environments so that a developer's real AWS
/// setup can never leak into a test.
pub const AWS_ENV_REMOVED: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_DEFAULT_REGION",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

/// Apply [`aws_env`] to a command, after removing [`AWS_ENV_REMOVED`].
pub fn with_aws_env(cmd: &mut Command, endpoint: Option<&str>) {
    for k in AWS_ENV_REMOVED {
        cmd.env_remove(k);
    }
    for (k, v) in aws_env(endpoint) {
        cmd.env(k, v);
    }
}

pub fn credentials() -> Credentials {
    Credentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        None,
        None,
        "motorpool-tests",
    )
}

/// A provider on `endpoint` with explicit region and static credentials: no
/// credential or region chain runs, so nothing can reach IMDS.
pub fn provider(endpoint: &str, adjust: impl FnOnce(&mut AwsConfig)) -> AwsProvider {
    let mut config = AwsConfig {
        region: Some(REGION.to_string()),
        endpoint_url: Some(endpoint.to_string()),
        image: Some(AMI.to_string()),
        credentials: Some(credentials()),
        settle_timeout: Duration::from_secs(20),
        ..AwsConfig::default()
    };
    adjust(&mut config);
    AwsProvider::new(config).expect("valid test provider settings")
}

// ---------------------------------------------------------------------------
// moto

/// The `moto_server` program, made once per process (and per target dir,
/// under a file lock, across processes).
pub fn moto_server_program() -> PathBuf {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PROGRAM.get_or_init(find_or_install_moto) {
        Ok(p) => p.clone(),
        Err(e) => panic!(
            "the AWS tests need moto's EC2 server and cannot get it: {e}\n\
             Set MOTORPOOL_MOTO_SERVER to a moto_server program (pip install \
             'moto[server]=={MOTO_VERSION}'), or make python3 (with venv) and PyPI available."
        ),
    }
}

fn find_or_install_moto() -> Result<PathBuf, String> {
    let package = format!("moto[server]=={MOTO_VERSION}");
    let tool = install_once::Tool {
        env_var: "MOTORPOOL_MOTO_SERVER",
        dir: "moto-venv",
        program: "bin/moto_server",
        package: &package,
        marker: &format!("moto-{MOTO_VERSION}"),
    };
    install_once::find_or_install(&tool, |venv| install_once::pip_venv(venv, &package))
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A moto server on 127.0.0.1, killed (with its process group) on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Start a fresh moto (empty state) and wait until it answers.
    pub fn start() -> Moto {
        let program = moto_server_program();
        let mut last_error = String::new();
        // A port picked free may be taken before moto binds it: try a few.
        for _ in 0..3 {
            let port = free_port();
            let log = tempfile::Builder::new()
                .prefix("moto-")
                .suffix(".log")
                .tempfile()
                .expect("a moto log file");
            let stdout = log.reopen().expect("moto log");
            let stderr = log.reopen().expect("moto log");
            let mut cmd = Command::new(&program);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_ENABLE_AMI_VALIDATION", "true")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .process_group(0);
            for k in AWS_ENV_REMOVED {
                cmd.env_remove(k);
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let mut moto = Moto {
                child: Some(child),
                port,
                log,
            };
            match moto.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return moto,
                Err(e) => last_error = format!("{e}\n--- moto log\n{}", moto.log_text()),
            }
        }
        panic!("moto's server did not start: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("moto exited early ({status})"));
            }
            if http_get(self.port, "/moto-api/").is_ok_and(|r| r.starts_with("HTTP/1.")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no answer on port {} after {timeout:?}", self.port))
    }

    /// Forget every resource (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        s.write_all(
            b"POST /moto-api/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .expect("reset moto");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(
            out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
            "{out}"
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The whole process group: moto and anything it started.
            // SAFETY: sending a signal; no memory is touched.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// The fault proxy

/// What the proxy does to the requests it forwards.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability of answering `400 RequestLimitExceeded` instead of forwarding.
    pub throttle_rate: f64,
    /// Probability of answering `503 ServiceUnavailable` instead of forwarding.
    pub unavailable_rate: f64,
    /// Probability, for mutating calls, of forwarding the request and then
    /// answering `503` instead of moto's answer (the change happened, the
    /// response is lost).
    pub lost_response_rate: f64,
    /// Slept before every request.
    pub latency: Duration,
    /// `RunInstances` into these subnets fails with `InsufficientInstanceCapacity`.
    pub full_subnets: Vec<String>,
    /// `RunInstances` of spot instances fails with `InsufficientInstanceCapacity`.
    pub no_spot: bool,
    pub seed: u64,
}

/// What the proxy saw and did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    pub unavailable: AtomicU64,
    pub lost: AtomicU64,
    pub capacity: AtomicU64,
    /// `Action=...` of every request, in order.
    pub actions: Mutex<Vec<String>>,
    /// The form body of every `RunInstances`, in order.
    pub run_instances: Mutex<Vec<String>>,
}

impl ProxyStats {
    pub fn injected(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
            + self.unavailable.load(Ordering::Relaxed)
            + self.lost.load(Ordering::Relaxed)
            + self.capacity.load(Ordering::Relaxed)
    }

    pub fn actions(&self) -> Vec<String> {
        self.actions
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// How many requests of `action` the proxy saw.
    pub fn count(&self, action: &str) -> usize {
        self.actions().iter().filter(|a| *a == action).count()
    }

    pub fn run_instances_bodies(&self) -> Vec<String> {
        self.run_instances
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream_port`, injecting
/// [`Faults`]; one request per connection (it answers `Connection: close`).
/// Stopped on drop.
pub struct FaultProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(faults.seed)));
        let faults = Arc::new(faults);
        let accept = {
            let (stats, stop) = (stats.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (stats, faults, rng) = (stats.clone(), faults.clone(), rng.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, upstream_port, &faults, &stats, &rng);
                    });
                }
            })
        };
        FaultProxy {
            port,
            stats,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Read one HTTP message (head and Content-Length body) from `s`, or to EOF
/// when `to_eof` (responses of an upstream we asked to close).
fn read_message(s: &mut TcpStream, to_eof: bool) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a full head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None if to_eof => {
            s.read_to_end(&mut body)?;
        }
        None => {}
    }
    Ok((head, body))
}

/// `head` with its Connection header replaced by `Connection: close` and a
/// Content-Length of `len`.
fn rewrite_head(head: &str, len: usize) -> String {
    let mut out = String::new();
    for (n, line) in head.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if n > 0
            && (name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("keep-alive"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {len}\r\nConnection: close\r\n\r\n"
    ));
    out
}

fn ec2_error(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>motorpool-fault-proxy</RequestID></Response>"
    );
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn serve(
    mut client: TcpStream,
    upstream_port: u16,
    faults: &Faults,
    stats: &ProxyStats,
    rng: &Mutex<fastrand::Rng>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (head, body) = read_message(&mut client, false)?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let action = form_value(&text, "Action").unwrap_or("").to_string();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut a) = stats.actions.lock() {
        a.push(action.clone());
    }
    if action == "RunInstances"
        && let Ok(mut r) = stats.run_instances.lock()
    {
        r.push(text.clone());
    }
    if !faults.latency.is_zero() {
        std::thread::sleep(faults.latency);
    }
    let (throttle, unavailable, lost) = {
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        (r.f64(), r.f64(), r.f64())
    };
    let mutating = !action.starts_with("Describe");
    let reply = if action == "RunInstances"
        && (faults
            .full_subnets
            .iter()
            .any(|s| form_value(&text, "SubnetId") == Some(s.as_str()))
            || (faults.no_spot
                && form_value(&text, "InstanceMarketOptions.MarketType") == Some("spot")))
    {
        stats.capacity.fetch_add(1, Ordering::Relaxed);
        Some(ec2_error(
            "500 Internal Server Error",
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient capacity in the Availability Zone you requested.",
        ))
    } else if throttle < faults.throttle_rate {
        stats.throttled.fetch_add(1, Ordering::Relaxed);
        Some(ec2_error(
            "400 Bad Request",
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ))
    } else if unavailable < faults.unavailable_rate {
        stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Some(ec2_error(
            "503 Service Unavailable",
            "ServiceUnavailable",
            "The service is unavailable. Please try again shortly.",
        ))
    } else {
        None
    };
    if let Some(reply) = reply {
        client.write_all(&reply)?;
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.set_read_timeout(Some(Duration::from_secs(60)))?;
    upstream.write_all(rewrite_head(&head, body.len()).as_bytes())?;
    upstream.write_all(&body)?;
    let (resp_head, resp_body) = read_message(&mut upstream, true)?;
    if mutating && lost < faults.lost_response_rate {
        stats.lost.fetch_add(1, Ordering::Relaxed);
        client.write_all(&ec2_error(
            "503 Service Unavailable",
            "ServiceUnavailable",
            "The service is unavailable. Please try again shortly.",
        ))?;
    } else {
        client.write_all(rewrite_head(&resp_head, resp_body.len()).as_bytes())?;
        client.write_all(&resp_body)?;
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
