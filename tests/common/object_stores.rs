//! Object stores for the tests of `s3://` and `az://` job data, on loopback:
//! moto's S3 (moto's server serves S3 and EC2 on one port) and Azure's
//! storage emulator, Azurite (its blob service).
//!
//! Azurite comes from `$MOTORPOOL_AZURITE_BLOB` (an `azurite-blob` program;
//! `scripts/test` sets it), else from npm: a pinned `azurite` installed once
//! into `<cargo target dir>/azurite` (under a file lock). When neither works
//! the tests fail with the reason: they are never skipped.
//!
//! The tests put and read objects with the plain HTTP here (moto takes
//! unsigned requests; Azurite's requests are signed with its well-known
//! development account key), not with the library motorpool uses, so what
//! a job wrote is checked by another client. Every server started here is
//! killed (with its process group) when its guard drops, also on failure.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "../../providers/testing/install_once.rs"]
mod install_once;

/// The Azurite release the tests run against (`scripts/test` pins the same).
pub const AZURITE_VERSION: &str = "3.37.0";
/// Azurite's well-known development account and key (public, documented).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A status code and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    s.write_all(body).expect("send body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Response { status, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// The values of every `<tag>…</tag>` in an XML listing.
pub fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
}

/// Parses `word<TAB>count` lines (a word count's output) into counts.
pub fn parse_counts(text: &str, counts: &mut std::collections::BTreeMap<String, u64>) {
    for line in text.lines() {
        let (w, c) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("not key<TAB>value: {line:?}"));
        let c: u64 = c
            .parse()
            .unwrap_or_else(|_| panic!("not a count: {line:?}"));
        assert!(
            counts.insert(w.to_string(), c).is_none(),
            "{w} appears twice"
        );
    }
}

// ---------------------------------------------------------------- S3 on moto

/// S3 calls against a moto server on `port` (path-style; moto checks no
/// signature, but reads the caller's access key from the header to apply
/// object ACLs).
pub struct S3 {
    pub port: u16,
}

fn s3_auth() -> Vec<(String, String)> {
    vec![(
        "Authorization".into(),
        "AWS4-HMAC-SHA256 Credential=AKIAMOTORPOOLTEST000/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=0"
            .into(),
    )]
}

impl S3 {
    pub fn create_bucket(&self, bucket: &str) {
        let r = http(self.port, "PUT", &format!("/{bucket}"), &s3_auth(), b"");
        assert_eq!(r.status, 200, "create bucket {bucket}: {}", r.text());
    }

    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let r = http(
            self.port,
            "PUT",
            &format!("/{bucket}/{key}"),
            &s3_auth(),
            data,
        );
        assert_eq!(r.status, 200, "put s3://{bucket}/{key}: {}", r.text());
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let r = http(
            self.port,
            "GET",
            &format!("/{bucket}/{key}"),
            &s3_auth(),
            b"",
        );
        assert_eq!(r.status, 200, "get s3://{bucket}/{key}: {}", r.text());
        r.body
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let r = http(
            self.port,
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
            &s3_auth(),
            b"",
        );
        assert_eq!(r.status, 200, "list s3://{bucket}/{prefix}: {}", r.text());
        let mut keys = xml_values(&r.text(), "Key");
        keys.sort();
        keys
    }
}

// ---------------------------------------------------------------- Azurite

/// The `azurite-blob` program, installed once per target dir.
pub fn azurite_program() -> PathBuf {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PROGRAM.get_or_init(find_or_install_azurite) {
        Ok(p) => p.clone(),
        Err(e) => panic!(
            "the az:// tests need Azurite and cannot get it: {e}\n\
             Set MOTORPOOL_AZURITE_BLOB to an azurite-blob program (npm install \
             azurite@{AZURITE_VERSION}), or make node, npm and the npm registry available."
        ),
    }
}

fn find_or_install_azurite() -> Result<PathBuf, String> {
    let package = format!("azurite@{AZURITE_VERSION}");
    let tool = install_once::Tool {
        env_var: "MOTORPOOL_AZURITE_BLOB",
        dir: "azurite",
        program: "node_modules/.bin/azurite-blob",
        package: &package,
        marker: &format!("azurite-{AZURITE_VERSION}"),
    };
    install_once::find_or_install(&tool, |dir| {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        install_once::run(
            Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefix",
                ])
                .arg(dir)
                .arg(&package),
        )
    })
}

/// Azurite's blob service on 127.0.0.1, with its data in a temporary
/// directory; killed (with its process group) on drop.
pub struct Azurite {
    child: Option<Child>,
    pub port: u16,
    _data: tempfile::TempDir,
    log: tempfile::NamedTempFile,
}

impl Azurite {
    pub fn start() -> Azurite {
        let program = azurite_program();
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port");
            let data = tempfile::tempdir().expect("azurite data dir");
            let log = tempfile::Builder::new()
                .prefix("azurite-")
                .suffix(".log")
                .tempfile()
                .expect("an azurite log");
            let child = Command::new(&program)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(data.path())
                .args(["--skipApiVersionCheck", "--loose", "--silent"])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log"))
                .stderr(log.reopen().expect("log"))
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let mut az = Azurite {
                child: Some(child),
                port,
                _data: data,
                log,
            };
            match az.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return az,
                Err(e) => {
                    last_error = format!(
                        "{e}\n--- azurite log\n{}",
                        std::fs::read_to_string(az.log.path()).unwrap_or_default()
                    )
                }
            }
        }
        panic!("Azurite did not start: {last_error}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("azurite exited early ({status})"));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("no answer on port {} after {timeout:?}", self.port))
    }

    /// The blob service's URL (`AZURITE_BLOB_STORAGE_URL`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a process needs to reach this Azurite with
    /// object_store's standard variables.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            ("AZURITE_BLOB_STORAGE_URL".into(), self.url()),
        ]
    }

    /// A request signed with the development account's key (SharedKey).
    fn signed(
        &self,
        method: &str,
        container: &str,
        blob: &str,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let date = httpdate_now();
        let mut headers: Vec<(String, String)> = vec![
            ("x-ms-date".into(), date),
            ("x-ms-version".into(), "2021-08-06".into()),
        ];
        for (k, v) in extra {
            headers.push((k.to_string(), v.to_string()));
        }
        headers.sort();
        let canon_headers: String = headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-ms-"))
            .map(|(k, v)| format!("{k}:{v}\n"))
            .collect();
        let mut path = format!("/{AZURITE_ACCOUNT}/{container}");
        if !blob.is_empty() {
            path.push('/');
            path.push_str(blob);
        }
        let mut resource = format!("/{AZURITE_ACCOUNT}{path}");
        let mut q: Vec<(&str, &str)> = query.to_vec();
        q.sort();
        for (k, v) in &q {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        let length = if body.is_empty() {
            String::new()
        } else {
            body.len().to_string()
        };
        let to_sign = format!("{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n{canon_headers}{resource}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &base64_decode(AZURITE_KEY));
        let sig = base64_encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        headers.push((
            "Authorization".into(),
            format!("SharedKey {AZURITE_ACCOUNT}:{sig}"),
        ));
        if !q.is_empty() {
            path.push('?');
            path.push_str(
                &q.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&"),
            );
        }
        http(self.port, method, &path, &headers, body)
    }

    pub fn create_container(&self, container: &str) {
        let r = self.signed("PUT", container, "", &[("restype", "container")], &[], b"");
        assert_eq!(r.status, 201, "create container {container}: {}", r.text());
    }

    pub fn put(&self, container: &str, blob: &str, data: &[u8]) {
        let r = self.signed(
            "PUT",
            container,
            blob,
            &[],
            &[("x-ms-blob-type", "BlockBlob")],
            data,
        );
        assert_eq!(r.status, 201, "put az://{container}/{blob}: {}", r.text());
    }

    pub fn get(&self, container: &str, blob: &str) -> Vec<u8> {
        let r = self.signed("GET", container, blob, &[], &[], b"");
        assert_eq!(r.status, 200, "get az://{container}/{blob}: {}", r.text());
        r.body
    }

    /// The account's containers with their metadata, as the service lists them (XML).
    pub fn containers_xml(&self) -> String {
        let r = self.signed(
            "GET",
            "",
            "",
            &[("comp", "list"), ("include", "metadata")],
            &[],
            b"",
        );
        assert_eq!(r.status, 200, "list containers: {}", r.text());
        r.text()
    }

    /// The ETag of every blob under `prefix`, by name.
    pub fn etags(&self, container: &str, prefix: &str) -> Vec<(String, String)> {
        let text = self.list(container, prefix);
        xml_values(&text, "Name")
            .into_iter()
            .zip(xml_values(&text, "Etag"))
            .collect()
    }

    /// The blob names under `prefix`, sorted.
    pub fn blobs(&self, container: &str, prefix: &str) -> Vec<String> {
        let mut names = xml_values(&self.list(container, prefix), "Name");
        names.sort();
        names
    }

    /// List Blobs under `prefix`: the service's XML answer.
    fn list(&self, container: &str, prefix: &str) -> String {
        let r = self.signed(
            "GET",
            container,
            "",
            &[
                ("comp", "list"),
                ("prefix", prefix),
                ("restype", "container"),
            ],
            &[],
            b"",
        );
        assert_eq!(
            r.status,
            200,
            "list az://{container}/{prefix}: {}",
            r.text()
        );
        r.text()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to the group this guard started; no memory is touched.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Now as an HTTP date (`Tue, 01 Dec 2026 10:00:00 GMT`).
fn httpdate_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // 1970-01-01 was a Thursday.
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!("{weekday}, {d:02} {mon} {year} {h:02}:{m:02}:{s:02} GMT")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes().filter(|b| *b != b'=') {
        let v = B64.iter().position(|c| *c == b).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
