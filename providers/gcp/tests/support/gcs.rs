//! A Cloud Storage emulator for the runtime upload's tests: the
//! `gcp-storage-emulator` package from PyPI (pinned), in a virtualenv in the
//! cargo target directory made once, or `$MOTORPOOL_GCS_EMULATOR`; started
//! in memory on 127.0.0.1 and killed with its process group on drop.
//!
//! It serves what the upload uses: the JSON API's `buckets.get/insert/patch`,
//! `objects.get/list`, multipart `objects.insert`, and `GET /BUCKET/OBJECT`
//! (what a signed URL names; it does not check signatures). It does not
//! serve the XML API's list (501), which nothing here uses. Also a test
//! service account key (`TestKey`): an RSA key made by `openssl` for the
//! test, which signs URLs and self-signed tokens locally.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[path = "../../../testing/install_once.rs"]
mod install_once;

/// The emulator's version on PyPI.
pub const EMULATOR_VERSION: &str = "2026.7.19";

/// The service account email of [`TestKey`].
pub const TEST_ACCOUNT: &str = "runtime-test@motorpool-test.iam.gserviceaccount.com";

/// The emulator program, made once per process (and per target dir, under
/// a file lock, across processes). No emulator, no pass: the test fails.
pub fn emulator_program() -> PathBuf {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PROGRAM.get_or_init(find_or_install) {
        Ok(p) => p.clone(),
        Err(e) => panic!(
            "the runtime upload tests need a Cloud Storage emulator and cannot get it: {e}\n\
             Set MOTORPOOL_GCS_EMULATOR to a gcp-storage-emulator program (pip install \
             'gcp-storage-emulator=={EMULATOR_VERSION}'), or make python3 (with venv) and PyPI \
             available."
        ),
    }
}

fn find_or_install() -> Result<PathBuf, String> {
    let package = format!("gcp-storage-emulator=={EMULATOR_VERSION}");
    let tool = install_once::Tool {
        env_var: "MOTORPOOL_GCS_EMULATOR",
        dir: "gcs-venv",
        program: "bin/gcp-storage-emulator",
        package: &package,
        marker: &format!("gcs-{EMULATOR_VERSION}"),
    };
    install_once::find_or_install(&tool, |venv| install_once::pip_venv(venv, &package))
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`: status, headers, body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = unchunk(&body);
    }
    Ok((status, head, body))
}

fn unchunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// The emulator on a free loopback port, killed (its process group) on drop.
pub struct GcsEmulator {
    child: Option<Child>,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl GcsEmulator {
    pub fn start() -> GcsEmulator {
        let program = emulator_program();
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port");
            let log = tempfile::Builder::new()
                .prefix("gcs-emulator-")
                .suffix(".log")
                .tempfile()
                .expect("a log file");
            let child = Command::new(&program)
                .args(["start", "--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--in-memory")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log"))
                .stderr(log.reopen().expect("log"))
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let mut emulator = GcsEmulator {
                child: Some(child),
                port,
                log,
            };
            for _ in 0..200 {
                if matches!(http_get(port, "/"), Ok((200, _, _))) {
                    return emulator;
                }
                if let Some(Ok(Some(_))) = emulator.child.as_mut().map(|c| c.try_wait()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last = emulator.log_text();
        }
        panic!("the Cloud Storage emulator did not start:\n{last}");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A JSON API read (`/storage/v1/...`), parsed.
    pub fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, _, body) = http_get(self.port, path).expect("ask the emulator");
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The objects of `bucket`: name -> (size, generation, sha256 metadata).
    pub fn objects(&self, bucket: &str) -> Vec<serde_json::Value> {
        let (status, list) = self.json(&format!("/storage/v1/b/{bucket}/o"));
        assert_eq!(status, 200, "list {bucket}: {list}");
        list["items"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for GcsEmulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the process group this guard started.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// A service account key for tests: a fresh RSA key (`openssl genpkey`) in
/// a key file of the JSON shape Google issues, in a directory removed on drop.
pub struct TestKey {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestKey {
    pub fn new() -> TestKey {
        let dir = tempfile::tempdir().expect("a key directory");
        let pem = dir.path().join("key.pem");
        install_once::run(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&pem),
        )
        .unwrap_or_else(|e| panic!("the signing tests need openssl to make a test key: {e}"));
        let private_key = std::fs::read_to_string(&pem).expect("the key");
        let key = serde_json::json!({
            "type": "service_account",
            "project_id": "motorpool-test",
            "private_key_id": "motorpool-test-key",
            "private_key": private_key,
            "client_email": TEST_ACCOUNT,
            "token_uri": "http://127.0.0.1:9/token",
        });
        let path = dir.path().join("service-account.json");
        std::fs::write(&path, key.to_string()).expect("the key file");
        TestKey { _dir: dir, path }
    }
}
