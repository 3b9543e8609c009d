//! A cloud machine's first boot, played on this one: the user data the
//! cloud holds runs for real, as cloud-init runs it (`sh -eu` as root of a
//! directory of its own), with what a machine has around it played on
//! loopback:
//!
//! - **the instance metadata service**: one small HTTP server per machine
//!   (IMDSv2 token, `instance-id`, `local-ipv4`, `placement/region`, and an
//!   instance role's credentials), reached through the AWS SDKs' own
//!   override, `AWS_EC2_METADATA_SERVICE_ENDPOINT`;
//! - **the machine's address**: each machine gets an address of its own in
//!   127.0.0.0/8, so its agent listens on the fixed cloud ports (7443, 7444)
//!   as on a real node, and every machine of a test can;
//! - **systemd**: a `systemctl` on `PATH` that starts the unit's `ExecStart`
//!   in a session of its own and keeps its pid, so it can be stopped.
//!
//! Everything else is real: `curl` downloads the runtime from where the
//! user data says (a presigned S3 URL on moto), `sha256sum` checks it, and
//! the downloaded binary is the agent that runs. [`Booted`] stops the script
//! and the agent it started (its whole process group) on drop.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What the metadata service tells one machine.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub instance_id: String,
    pub private_ip: Ipv4Addr,
    pub region: String,
    /// The instance role's credentials (moto accepts any).
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// An instance metadata service for one machine, on 127.0.0.1; stopped on drop.
pub struct Imds {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Imds {
    pub fn start(metadata: Metadata) -> std::io::Result<Imds> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    let _ = answer(stream, &metadata);
                }
            }
        });
        Ok(Imds {
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The role name the metadata service reports.
const ROLE: &str = "motorpool-node";

/// One HTTP/1.x request, one response, then close.
fn answer(stream: TcpStream, m: &Metadata) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut token_header = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        token_header |= line
            .to_ascii_lowercase()
            .starts_with("x-aws-ec2-metadata-token:");
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let credentials = format!(
        "{{\n  \"Code\" : \"Success\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \"Token\" : \"\",\n  \"Expiration\" : \"2099-01-01T00:00:00Z\"\n}}",
        m.access_key_id, m.secret_access_key
    );
    // IMDSv2: a token first (PUT), then every read carries it.
    let body = match (method, path) {
        ("PUT", "/latest/api/token") => Some("imds-token-for-tests".to_string()),
        ("GET", _) if !token_header => None,
        ("GET", "/latest/meta-data/instance-id") => Some(m.instance_id.clone()),
        ("GET", "/latest/meta-data/local-ipv4") => Some(m.private_ip.to_string()),
        ("GET", "/latest/meta-data/placement/region") => Some(m.region.clone()),
        ("GET", "/latest/meta-data/iam/security-credentials/") => Some(ROLE.to_string()),
        ("GET", p) if p == format!("/latest/meta-data/iam/security-credentials/{ROLE}") => {
            Some(credentials)
        }
        _ => None,
    };
    let mut stream = stream;
    match body {
        Some(body) => write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None if !token_header && method == "GET" => {
            write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        }
        None => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    }
}

/// The `systemctl` the script finds on `PATH`: `daemon-reload` does nothing;
/// `enable --now UNIT` starts the unit's `ExecStart` (read from
/// `$MOTORPOOL_NODE_ROOT/etc/systemd/system/UNIT`) in a session of its own,
/// its output in `$MOTORPOOL_NODE_ROOT/UNIT.log`, its pid in `.../UNIT.pid`.
const SYSTEMCTL: &str = r#"#!/bin/sh
set -eu
case "$1" in
  daemon-reload) exit 0 ;;
  enable)
    [ "$2" = "--now" ] || { echo "systemctl double: only enable --now" >&2; exit 1; }
    unit="$MOTORPOOL_NODE_ROOT/etc/systemd/system/$3"
    exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
    [ -n "$exec_start" ] || { echo "systemctl double: no ExecStart in $unit" >&2; exit 1; }
    setsid sh -c "exec $exec_start" > "$MOTORPOOL_NODE_ROOT/$3.log" 2>&1 < /dev/null &
    echo $! > "$MOTORPOOL_NODE_ROOT/$3.pid"
    ;;
  *) echo "systemctl double: $*" >&2; exit 1 ;;
esac
"#;

/// The unit the AWS user data installs.
pub const AGENT_UNIT: &str = "motorpool-agent.service";

/// A directory holding the `systemctl` double, to put first on `PATH`.
pub fn fake_bin(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let path = bin.join("systemctl");
    std::fs::write(&path, SYSTEMCTL)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// A machine booted from its user data: the script, and the agent it left running.
pub struct Booted {
    pub root: PathBuf,
    script: Option<Child>,
    _imds: Imds,
}

impl Booted {
    /// Run `user_data` as machine `metadata.instance_id` would at first boot,
    /// under `root`, with `bin` (see [`fake_bin`]) first on `PATH`; `prepare`
    /// adds the environment (the cloud's endpoint and credentials).
    pub fn boot(
        user_data: &str,
        metadata: Metadata,
        root: &Path,
        bin: &Path,
        prepare: &dyn Fn(&mut Command),
    ) -> std::io::Result<Booted> {
        std::fs::create_dir_all(root)?;
        let script = root.join("user-data");
        std::fs::write(&script, user_data)?;
        let imds = Imds::start(metadata)?;
        let log = std::fs::File::create(root.join("cloud-init.log"))?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-eu")
            .arg(&script)
            .env("PATH", path)
            .env("MOTORPOOL_NODE_ROOT", root)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        prepare(&mut cmd);
        let child = cmd.spawn()?;
        Ok(Booted {
            root: root.to_path_buf(),
            script: Some(child),
            _imds: imds,
        })
    }

    /// The pid of the agent the script started, once it has.
    pub fn agent_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join(format!("{AGENT_UNIT}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What the script printed, then what the agent did.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.root.join(name)).unwrap_or_default();
        format!(
            "--- cloud-init\n{}--- agent\n{}",
            read("cloud-init.log"),
            read(&format!("{AGENT_UNIT}.log"))
        )
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut child) = self.script.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.agent_pid() {
            // The agent leads a session of its own: its group is its steps too.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
