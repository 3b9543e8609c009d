use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Stops the in-process agent when dropped, also when the test fails.
struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningAgent {
    fn start(opts: AgentOptions) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_until(opts, async {
            let _ = stopped.await;
        }));
        RunningAgent {
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn wait_for_agent_file(dir: &Path) -> AgentFile {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(file) = AgentFile::read(dir) {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "no agent.json in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn agent_writes_agent_json_and_answers_identity_and_health() {
    let home = tempfile::tempdir().expect("temp dir");
    let dir = home.path().join("local-0000abcd");
    let agent = RunningAgent::start(AgentOptions {
        dir: dir.clone(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        instance_id: "local-0000abcd".to_string(),
        config: None,
        runtime_port: 0,
    });

    let file = wait_for_agent_file(&dir).await;
    assert_eq!(file.instance_id, "local-0000abcd");
    assert_eq!(file.pid, std::process::id());
    assert!(file.address.starts_with("127.0.0.1:"), "{}", file.address);
    assert!(!file.address.ends_with(":0"), "{}", file.address);
    // Written atomically: no temporary file is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != AGENT_FILE)
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let who = identity(&file.address, TIMEOUT).await.expect("identity");
    assert_eq!(who.instance_id, "local-0000abcd");
    assert_eq!(who.pid, std::process::id());
    assert_eq!(who.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(who.protocol_version, PROTOCOL_VERSION);
    assert_eq!(
        PathBuf::from(&who.dir),
        std::path::absolute(&dir).expect("absolute")
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(who.started_at_unix <= now && who.started_at_unix + 60 > now);

    let health1 = health(&file.address, TIMEOUT).await.expect("health");
    assert!(health1.ok);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let health2 = health(&file.address, TIMEOUT).await.expect("health");
    assert!(health2.uptime_ms >= health1.uptime_ms + 10);

    agent.shutdown().await.expect("clean shutdown");
    assert!(
        !dir.join(AGENT_FILE).exists(),
        "a stopped agent removes its agent.json"
    );
    assert!(
        identity(&file.address, Duration::from_millis(500))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn agent_refuses_a_non_loopback_address_without_tls() {
    let home = tempfile::tempdir().expect("temp dir");
    let err = run_until(
        AgentOptions {
            dir: home.path().join("a"),
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            instance_id: "local-1".to_string(),
            config: None,
            runtime_port: 0,
        },
        std::future::pending(),
    )
    .await
    .expect_err("0.0.0.0 must be refused");
    let message = format!("{err:#}");
    assert!(message.contains("loopback"), "{message}");
    assert!(message.contains("without TLS"), "{message}");
    assert!(!home.path().join("a").join(AGENT_FILE).exists());
}

#[tokio::test]
async fn agent_reports_a_busy_port_and_writes_no_agent_json() {
    let home = tempfile::tempdir().expect("temp dir");
    let busy = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = busy.local_addr().expect("addr");
    let err = run_until(
        AgentOptions {
            dir: home.path().join("a"),
            listen: addr,
            instance_id: "local-1".to_string(),
            config: None,
            runtime_port: 0,
        },
        std::future::pending(),
    )
    .await
    .expect_err("a busy port must fail");
    assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
    assert!(!home.path().join("a").join(AGENT_FILE).exists());
}

#[tokio::test]
async fn identity_of_nothing_fails_fast_with_the_address() {
    let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let started = Instant::now();
    let err = identity(&addr, Duration::from_secs(2))
        .await
        .expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(format!("{err:#}").contains(&addr), "{err:#}");
}

#[test]
fn the_agent_config_never_prints_its_secrets() {
    let ca = crate::tls::ProjectCa::derive(&crate::auth::Credential::new("s3cr3t")).expect("ca");
    let config = AgentConfig {
        credential: "agent-credential-value".into(),
        project: "p".into(),
        tls: Some(ca.node_tls(false).expect("node tls")),
        ..AgentConfig::default()
    };
    let printed = format!("{config:?}");
    assert!(!printed.contains("agent-credential-value"), "{printed}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    // It still round-trips through its JSON (the node's private file).
    let json = serde_json::to_string(&config).expect("json");
    let back: AgentConfig = serde_json::from_str(&json).expect("parse");
    assert_eq!(back.tls, config.tls);
    assert_eq!(back.credential, config.credential);
}
