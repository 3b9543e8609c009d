//! Apache Spark's standalone manager as a cluster's engine.
//!
//! The runtime step installs Java (present, or Debian's
//! `openjdk-17-jre-headless`) and the pinned pyspark from PyPI once per
//! machine (`templates/engines/spark.sh`) and links it at
//! `<node>/runtime/engine`. At formation the driver node starts a Spark
//! master and the bundled driver beside it; each worker node starts a Spark
//! worker with its node type's cores and memory, joined to the master the
//! bundled driver names in `ClusterStatus`. Every daemon is started with
//! `spark-class` (the pip package has no working `sbin` scripts), bound to
//! the node's address (`SPARK_LOCAL_IP`), on ports picked here with
//! `spark.port.maxRetries=0`, so a taken port fails instead of moving, and
//! in a process group of its own, so stopping it also stops the executors
//! and Python workers it started. Beyond loopback, daemons and applications
//! authenticate with a secret derived from the cluster's credential and
//! encrypt their RPC (`spark.authenticate`, `spark.network.crypto.enabled`).
//!
//! Jobs go through the bundled driver as on a `motorpool` cluster: it keeps
//! the DAG, runs, logs, retries, timeouts and cancellation, and runs a
//! `spark:` task as `spark-submit --master spark://...` in the job's
//! directory ([`SparkSubmit`]). The cluster is ready when the master reports
//! every worker ALIVE, and idle when neither motorpool nor anyone else has
//! an application running on it. Each application motorpool submits gets a
//! UI port of its own, so the driver can read its active stages
//! (`/api/v1/applications/.../stages`) and tell the controller how many
//! tasks wait beyond the workers' cores ([`RunningRole::load`]).
//!
//! This module owns the daemons' command lines, their lifetimes and the
//! master's JSON; it must not know how a node was made or how jobs are
//! scheduled.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use super::bundled::{self, BundledRuntime};
use super::{
    DriverAccess, EngineError, EnginePlugin, EngineSetup, LogFile, RoleContext, RoleStart,
    RunBrief, RunningRole, Unsupported,
};
use crate::runtime::client::{self, JobSubmission};
use crate::runtime::driver::{EngineTasks, Launch};
use crate::runtime::{Progress, RunSummary};
use crate::spec::SparkTask;

/// The engine's kind in the spec.
pub const KIND: &str = "spark";

/// The Spark (pyspark) version a cluster gets when it names none.
pub const DEFAULT_VERSION: &str = "4.0.1";

/// What `ClusterStatus` calls the master's URL (`spark://host:port`).
pub const MASTER_KEY: &str = "spark.master";
/// ... its web UI (`http://host:port`), and its ALIVE workers.
pub const MASTER_UI_KEY: &str = "spark.master_ui";
pub const ALIVE_WORKERS_KEY: &str = "spark.alive_workers";

/// An application's UI port: "0" (any) as motorpool sets it for the
/// cluster, a port of its own per submitted application.
const UI_PORT: &str = "spark.ui.port";

/// How long a daemon may take to listen.
const DAEMON_START: Duration = Duration::from_secs(90);
/// How long a daemon has after SIGTERM before its group is killed.
const DAEMON_STOP: Duration = Duration::from_secs(5);

/// Apache Spark's standalone manager.
pub struct Spark;

/// Whether `version` looks like a pyspark release (`4.0.1`).
fn valid_version(version: &str) -> bool {
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(parts[0], "3" | "4")
}

fn version_or_default(version: &str) -> &str {
    if version.is_empty() {
        DEFAULT_VERSION
    } else {
        version
    }
}

/// Where the runtime step put this node's Spark.
#[derive(Debug, Clone)]
struct Install {
    /// The Python that runs applications and executors' workers: the same
    /// path on every node of a machine, and on every cloud node.
    python: PathBuf,
    /// `SPARK_HOME`: the pyspark package.
    spark_home: PathBuf,
    /// What the cluster's libraries add to Python's path on this node.
    python_path: String,
}

impl Install {
    fn find(role_dir: &Path) -> Result<Install, String> {
        let link = role_dir.join("engine");
        let root = std::fs::canonicalize(&link).map_err(|e| {
            format!(
                "Spark is not installed on this node ({}: {e}); the runtime step installs it",
                link.display()
            )
        })?;
        let python = root.join("venv/bin/python");
        let lib = root.join("venv/lib");
        let spark_home = std::fs::read_dir(&lib)
            .map_err(|e| format!("cannot read {}: {e}", lib.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/pyspark"))
            .find(|p| p.join("bin/spark-class").is_file())
            .ok_or_else(|| format!("no pyspark with bin/spark-class under {}", lib.display()))?;
        Ok(Install {
            python,
            spark_home,
            python_path: library_path(role_dir),
        })
    }

    /// The environment every Spark process of this node starts with.
    fn env(&self, ip: IpAddr, conf_dir: &Path) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("SPARK_HOME".into(), self.spark_home.display().to_string());
        env.insert("SPARK_LOCAL_IP".into(), ip.to_string());
        env.insert("SPARK_CONF_DIR".into(), conf_dir.display().to_string());
        env.insert("PYSPARK_PYTHON".into(), self.python.display().to_string());
        env.insert(
            "PYSPARK_DRIVER_PYTHON".into(),
            self.python.display().to_string(),
        );
        if !self.python_path.is_empty() {
            env.insert("PYTHONPATH".into(), self.python_path.clone());
        }
        // A driver program's prints reach `motorpool run` as they happen.
        env.insert("PYTHONUNBUFFERED".into(), "1".into());
        env
    }

    fn spark_class(&self) -> PathBuf {
        self.spark_home.join("bin/spark-class")
    }
}

/// The cluster's libraries on this node: the directories the libraries step
/// linked into the node's virtualenv (a `.pth` file), for Spark's Python.
fn library_path(role_dir: &Path) -> String {
    let lib = role_dir.join("venv/lib");
    let Ok(entries) = std::fs::read_dir(&lib) else {
        return String::new();
    };
    let mut dirs = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let pth = entry.path().join("site-packages/motorpool-libraries.pth");
        if let Ok(text) = std::fs::read_to_string(&pth) {
            dirs.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
    }
    dirs.join(":")
}

/// What the master and worker JVMs (not the executors) start with: they
/// coordinate and compute nothing, so the client compiler and a serial
/// collector start them sooner on a small node.
fn daemon_env() -> BTreeMap<String, String> {
    [(
        "SPARK_DAEMON_JAVA_OPTS".to_string(),
        "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC".to_string(),
    )]
    .into()
}

/// A free TCP port on `ip` (Spark is then told to take exactly it).
fn free_port(ip: IpAddr) -> Result<u16, String> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| format!("cannot find a free port on {ip}: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot read a free port: {e}"))
}

/// The properties every daemon and application of the cluster shares.
fn shared_properties(context: &RoleContext, ip: IpAddr) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    p.insert("spark.port.maxRetries".into(), "0".into());
    if !ip.is_loopback() {
        // The cluster's credential never leaves the node; Spark gets a
        // secret derived from it, the same on every node of the cluster.
        let secret = crate::auth::derive(&context.credential, "spark-authenticate")
            .expose()
            .to_string();
        p.insert("spark.authenticate".into(), "true".into());
        p.insert("spark.authenticate.secret".into(), secret);
        p.insert("spark.network.crypto.enabled".into(), "true".into());
        p.insert("spark.ui.killEnabled".into(), "false".into());
    }
    p
}

/// Writes `properties` as a Java properties file only this user can read.
fn write_properties(path: &Path, properties: &BTreeMap<String, String>) -> Result<(), String> {
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('=', "\\=")
            .replace(':', "\\:")
    };
    let text: String = properties
        .iter()
        .map(|(k, v)| format!("{}={}\n", escape(k), escape(v)))
        .collect();
    motorpool_provider::private_files::write(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A conf directory whose log4j2 settings send `level` and above to stderr.
fn conf_dir(dir: &Path, level: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let text = format!(
        "rootLogger.level = {level}\nrootLogger.appenderRef.stderr.ref = console\n\
         appender.console.type = Console\nappender.console.name = console\n\
         appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n\
         appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex\n"
    );
    let path = dir.join("log4j2.properties");
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(dir.to_path_buf())
}

/// What one daemon starts with beyond what every Spark daemon of a node shares.
struct DaemonStart {
    name: &'static str,
    class: &'static str,
    /// Arguments after `--host`, `--port`, `--webui-port` and `--properties-file`.
    args: Vec<String>,
    /// Set over the node's Spark environment.
    env: BTreeMap<String, String>,
}

/// One Spark daemon (`spark-class CLASS ARGS`), in a process group of its own.
struct Daemon {
    name: &'static str,
    child: tokio::process::Child,
    group: crate::runtime::KillGroup,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        name: &'static str,
        install: &Install,
        class: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        log: PathBuf,
    ) -> Result<Daemon, String> {
        let out = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let mut cmd = tokio::process::Command::new(install.spark_class());
        cmd.arg(class)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl with PR_SET_PDEATHSIG touches no memory; it only asks
        // the kernel to kill the daemon when the agent that started it dies,
        // so a SIGKILLed agent leaves no JVM behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the Spark {name}: {e}"))?;
        let group = crate::runtime::KillGroup::new(child.id());
        Ok(Daemon {
            name,
            child,
            group,
            log,
        })
    }

    /// Starts a daemon on the role's address at two ports picked here (its
    /// RPC port and its web UI), with the cluster's shared properties in a
    /// file only this user reads and [`daemon_env`], and waits until
    /// `ready(rpc, ui)`; a daemon that is not ready is stopped. Returns it
    /// and its two addresses.
    async fn start<F, Fut>(
        install: &Install,
        context: &RoleContext,
        start: DaemonStart,
        ready: F,
    ) -> Result<(Daemon, SocketAddr, SocketAddr), String>
    where
        F: Fn(SocketAddr, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let ip = context.listen.ip();
        let spark_dir = context.dir.join("spark");
        let conf = conf_dir(&spark_dir.join("conf-daemon"), "info")?;
        let rpc = SocketAddr::new(ip, free_port(ip)?);
        let ui = SocketAddr::new(ip, free_port(ip)?);
        let properties = spark_dir.join(format!("{}.properties", start.name));
        write_properties(&properties, &shared_properties(context, ip))?;
        let mut env = install.env(ip, &conf);
        env.extend(daemon_env());
        env.extend(start.env);
        let mut args = vec![
            "--host".to_string(),
            ip.to_string(),
            "--port".into(),
            rpc.port().to_string(),
            "--webui-port".into(),
            ui.port().to_string(),
            "--properties-file".into(),
            properties.display().to_string(),
        ];
        args.extend(start.args);
        let log = spark_dir.join(format!("{}.log", start.name));
        let mut daemon = Daemon::spawn(start.name, install, start.class, &args, &env, log)?;
        if let Err(e) = daemon.wait_until(|| ready(rpc, ui)).await {
            daemon.stop().await;
            return Err(e);
        }
        Ok((daemon, rpc, ui))
    }

    /// Whether it still runs.
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        crate::runtime::tail_text(&text, 2000)
    }

    /// Waits until `probe` answers, failing early when the daemon exits.
    async fn wait_until<F, Fut>(&mut self, mut probe: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + DAEMON_START;
        loop {
            if !self.alive() {
                return Err(format!(
                    "the Spark {} exited at start; its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                ));
            }
            if probe().await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the Spark {} did not listen within {} s; its log ({}):\n{}",
                    self.name,
                    DAEMON_START.as_secs(),
                    self.log.display(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGTERM to the group (the worker stops its executors), then SIGKILL
    /// to whatever is left in it.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: signals a process group this daemon leads; no memory is touched.
            unsafe {
                libc::kill(-pid, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(DAEMON_STOP, self.child.wait()).await;
        self.group.kill();
        let _ = self.child.wait().await;
    }
}

/// Whether a role's daemon still runs.
fn daemon_health(daemon: &mut Option<Daemon>, name: &str) -> Result<(), EngineError> {
    match daemon {
        Some(d) => match d.alive() {
            true => Ok(()),
            false => Err(EngineError::Unreachable(format!(
                "the Spark {name} daemon died"
            ))),
        },
        None => Err(EngineError::Unreachable(format!(
            "the Spark {name} was stopped"
        ))),
    }
}

/// The master's `/json/` page, the parts motorpool reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MasterState {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub workers: Vec<WorkerState>,
    #[serde(default)]
    pub activeapps: Vec<serde_json::Value>,
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct WorkerState {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub state: String,
    /// The cores it offers executors.
    #[serde(default)]
    pub cores: u32,
}

impl MasterState {
    pub fn alive_workers(&self) -> Vec<&WorkerState> {
        self.workers.iter().filter(|w| w.state == "ALIVE").collect()
    }
}

/// One stage of an application as its REST API lists it
/// (`/api/v1/applications/{id}/stages`), the counts autoscaling reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StageState {
    #[serde(default)]
    num_tasks: u32,
    #[serde(default)]
    num_active_tasks: u32,
    #[serde(default)]
    num_complete_tasks: u32,
    /// Partitions done at least once (retries and speculation not counted
    /// twice); older releases lack it.
    #[serde(default)]
    num_completed_indices: Option<u32>,
}

impl StageState {
    /// Tasks of the stage that wait for a core.
    fn pending(&self) -> u32 {
        let done = self
            .num_completed_indices
            .unwrap_or(self.num_complete_tasks);
        self.num_tasks
            .saturating_sub(done)
            .saturating_sub(self.num_active_tasks)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct AppEntry {
    #[serde(default)]
    id: String,
}

/// The load of the application whose UI listens at `ui`: (tasks waiting,
/// tasks running) over its active stages. `Ok(None)` when nothing listens
/// there any more: the application ended.
async fn application_load(ui: SocketAddr) -> Result<Option<(u32, u32)>, String> {
    if !accepts(ui).await {
        return Ok(None);
    }
    let apps: Vec<AppEntry> =
        http_get_json(ui, "/api/v1/applications", "Spark application").await?;
    let (mut queued, mut running) = (0u32, 0u32);
    for app in apps {
        let path = format!("/api/v1/applications/{}/stages?status=active", app.id);
        let stages: Vec<StageState> = http_get_json(ui, &path, "Spark application").await?;
        for stage in stages {
            queued = queued.saturating_add(stage.pending());
            running = running.saturating_add(stage.num_active_tasks);
        }
    }
    Ok(Some((queued, running)))
}

/// `GET http://{address}/json/` from the master's web UI.
async fn master_state(address: SocketAddr) -> Result<MasterState, String> {
    http_get_json(address, "/json/", "Spark master").await
}

/// `GET http://{address}{path}` from a Spark web UI (the master's, an
/// application's), its JSON answer read as `T`. HTTP/1.0: the server closes
/// the connection after the answer and never chunks it.
async fn http_get_json<T: serde::de::DeserializeOwned>(
    address: SocketAddr,
    path: &str,
    who: &str,
) -> Result<T, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot reach the {who}'s UI at {address}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: application/json\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot ask the {who}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .take(8 << 20)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("cannot read the {who}'s answer: {e}"))?;
        Ok::<Vec<u8>, String>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("the {who} at {address} did not answer in 10 s"))??;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("the {who}'s answer has no body"))?;
    let status_line = String::from_utf8_lossy(&answer[..split]);
    if !status_line.starts_with("HTTP/1.1 200") && !status_line.starts_with("HTTP/1.0 200") {
        let first = status_line.lines().next().unwrap_or_default().to_string();
        return Err(format!("the {who} answered {first} to {path}"));
    }
    serde_json::from_slice(&answer[split + 4..])
        .map_err(|e| format!("the {who}'s answer to {path} is not what Spark writes: {e}"))
}

/// What `status` and `ClusterStatus` say of a master: its URL, its UI and
/// (when it answers) its ALIVE workers.
async fn describe_master(url: &str, ui: SocketAddr) -> BTreeMap<String, String> {
    let mut d = BTreeMap::new();
    d.insert(MASTER_KEY.into(), url.to_string());
    d.insert(MASTER_UI_KEY.into(), format!("http://{ui}"));
    if let Ok(state) = master_state(ui).await {
        d.insert(
            ALIVE_WORKERS_KEY.into(),
            state.alive_workers().len().to_string(),
        );
    }
    d
}

/// How long an application's UI may take to listen before its entry in
/// [`Applications`] is dropped for nothing answering there.
const APP_UI_GRACE: Duration = Duration::from_secs(120);
/// How long the applications' UIs have to say what their stages wait for:
/// well inside the time the controller gives a driver's whole answer.
const APP_UI_TIMEOUT: Duration = Duration::from_millis(1500);

/// The web UIs of the applications this driver submitted, and when each was
/// submitted: where autoscaling asks for waiting tasks.
#[derive(Default, Clone)]
struct Applications(Arc<std::sync::Mutex<BTreeMap<SocketAddr, std::time::Instant>>>);

impl Applications {
    fn add(&self, ui: SocketAddr) {
        if let Ok(mut apps) = self.0.lock() {
            apps.insert(ui, std::time::Instant::now());
        }
    }

    fn all(&self) -> Vec<(SocketAddr, std::time::Instant)> {
        self.0
            .lock()
            .map(|apps| apps.iter().map(|(a, t)| (*a, *t)).collect())
            .unwrap_or_default()
    }

    fn forget(&self, ui: SocketAddr) {
        if let Ok(mut apps) = self.0.lock() {
            apps.remove(&ui);
        }
    }
}

/// What the bundled driver needs to run `spark:` tasks on this node.
struct SparkSubmit {
    install: Install,
    env: BTreeMap<String, String>,
    master_url: String,
    master_ui: SocketAddr,
    /// The cluster's own properties (motorpool's, then `spark_conf`).
    properties: BTreeMap<String, String>,
    applications: Applications,
}

impl SparkSubmit {
    /// The full command line of a task: motorpool's properties, then the
    /// cluster's `spark_conf`, then the task's `conf` (later wins), then
    /// the script and its arguments. `ui_port` replaces motorpool's "any
    /// port" for the application's UI (a setting of the cluster's or the
    /// task's wins over it); the port the UI will listen on, when it is
    /// known and the UI on, comes back beside the command line.
    fn command_line(&self, task: &SparkTask, ui_port: Option<u16>) -> (Vec<String>, Option<u16>) {
        let mut conf = self.properties.clone();
        if let Some(port) = ui_port
            && conf.get(UI_PORT).is_some_and(|p| p == "0")
        {
            conf.insert(UI_PORT.into(), port.to_string());
        }
        for (k, v) in &task.conf {
            conf.insert(k.clone(), v.clone());
        }
        let ui_on = conf.get("spark.ui.enabled").is_none_or(|v| v != "false");
        let watched = conf
            .get(UI_PORT)
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| ui_on && *p != 0);
        let mut argv = vec![
            self.install
                .spark_home
                .join("bin/spark-submit")
                .display()
                .to_string(),
            "--master".into(),
            self.master_url.clone(),
        ];
        for (k, v) in conf {
            argv.push("--conf".into());
            argv.push(format!("{k}={v}"));
        }
        if !task.py_files.is_empty() {
            argv.push("--py-files".into());
            argv.push(task.py_files.join(","));
        }
        argv.push(task.script.clone());
        argv.extend(task.args.iter().cloned());
        (argv, watched)
    }
}

#[async_trait]
impl EngineTasks for SparkSubmit {
    fn spark_submit(&self, task: &SparkTask) -> Result<Launch, String> {
        let ip = self.master_ui.ip();
        let (argv, watched) = self.command_line(task, free_port(ip).ok());
        if let Some(port) = watched {
            self.applications.add(SocketAddr::new(ip, port));
        }
        Ok(Launch {
            argv,
            env: self.env.clone(),
        })
    }

    async fn describe(&self) -> BTreeMap<String, String> {
        describe_master(&self.master_url, self.master_ui).await
    }
}

/// The driver node: the bundled driver (jobs) and the Spark master.
struct SparkDriver {
    runtime: bundled::Driver,
    master: Mutex<Option<Daemon>>,
    master_url: String,
    master_ui: SocketAddr,
    applications: Applications,
}

#[async_trait]
impl RunningRole for SparkDriver {
    fn address(&self) -> String {
        self.runtime.address()
    }

    async fn workers(&self) -> Result<Vec<String>, EngineError> {
        let state = master_state(self.master_ui)
            .await
            .map_err(EngineError::Unreachable)?;
        Ok(state
            .alive_workers()
            .into_iter()
            .map(|w| w.id.clone())
            .collect())
    }

    async fn running_jobs(&self) -> Result<u32, EngineError> {
        let ours = self.runtime.running_jobs().await?;
        // Applications submitted to the master by anyone else keep the
        // cluster busy too.
        let theirs = master_state(self.master_ui)
            .await
            .map(|s| s.activeapps.len() as u32)
            .unwrap_or(0);
        Ok(ours.max(theirs))
    }

    /// Slots are the ALIVE workers' cores; waiting and running tasks are
    /// those of the active stages of the applications motorpool submitted,
    /// read from their UIs' REST API. Applications someone else submitted
    /// keep the cluster busy (`running_jobs`) but their stages are not read.
    async fn load(&self) -> Result<Option<super::ClusterLoad>, EngineError> {
        let state = master_state(self.master_ui)
            .await
            .map_err(EngineError::Unreachable)?;
        let mut load = super::ClusterLoad {
            slots: state.alive_workers().iter().map(|w| w.cores).sum(),
            ..Default::default()
        };
        // All at once, each within a bound: a slow UI costs this answer its
        // tasks, never the driver's status (one that does not answer in
        // time is taken for a driver that hangs).
        let apps = self.applications.all();
        let answers = futures_util::future::join_all(apps.iter().map(|(ui, _)| async move {
            tokio::time::timeout(APP_UI_TIMEOUT, application_load(*ui))
                .await
                .unwrap_or_else(|_| Err(format!("{ui} did not answer in time")))
        }))
        .await;
        for ((ui, submitted), answer) in apps.into_iter().zip(answers) {
            match answer {
                Ok(Some((queued, running))) => {
                    load.queued_tasks = load.queued_tasks.saturating_add(queued);
                    load.running_tasks = load.running_tasks.saturating_add(running);
                }
                Ok(None) if submitted.elapsed() > APP_UI_GRACE => self.applications.forget(ui),
                // Not listening yet, or no answer this time.
                Ok(None) | Err(_) => {}
            }
        }
        Ok(Some(load))
    }

    async fn health(&self) -> Result<(), EngineError> {
        daemon_health(&mut *self.master.lock().await, "master")
    }

    async fn describe(&self) -> BTreeMap<String, String> {
        describe_master(&self.master_url, self.master_ui).await
    }

    async fn shutdown(&self) {
        self.runtime.shutdown().await;
        if let Some(master) = self.master.lock().await.take() {
            master.stop().await;
        }
    }
}

/// A worker node: one Spark worker.
struct SparkWorker {
    address: String,
    daemon: Mutex<Option<Daemon>>,
}

#[async_trait]
impl RunningRole for SparkWorker {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn workers(&self) -> Result<Vec<String>, EngineError> {
        Err(super::ask_the_driver("a Spark worker"))
    }

    async fn running_jobs(&self) -> Result<u32, EngineError> {
        Err(super::ask_the_driver("a Spark worker"))
    }

    async fn health(&self) -> Result<(), EngineError> {
        daemon_health(&mut *self.daemon.lock().await, "worker")
    }

    async fn shutdown(&self) {
        if let Some(worker) = self.daemon.lock().await.take() {
            worker.stop().await;
        }
    }
}

fn start_error(role: &'static str) -> impl Fn(String) -> EngineError {
    move |reason| EngineError::Start { role, reason }
}

async fn accepts(address: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(address).await.is_ok()
}

impl Spark {
    async fn start_driver(&self, context: RoleContext) -> Result<SparkDriver, EngineError> {
        let fail = start_error("Spark master");
        let install = Install::find(&context.dir).map_err(&fail)?;
        let ip = context.listen.ip();
        let app_conf = conf_dir(&context.dir.join("spark/conf-app"), "warn").map_err(&fail)?;
        let (master, master_rpc, master_ui) = Daemon::start(
            &install,
            &context,
            DaemonStart {
                name: "master",
                class: "org.apache.spark.deploy.master.Master",
                args: Vec::new(),
                env: BTreeMap::new(),
            },
            |_, ui| async move { master_state(ui).await.is_ok() },
        )
        .await
        .map_err(&fail)?;
        let master_url = format!("spark://{master_rpc}");
        let mut properties = shared_properties(&context, ip);
        // Applications: their UI and ports picked by the OS (nothing is
        // shared between two at once), executors sized to fit a worker.
        properties.insert(UI_PORT.into(), "0".into());
        properties.insert(
            "spark.pyspark.python".into(),
            install.python.display().to_string(),
        );
        properties.insert(
            "spark.pyspark.driver.python".into(),
            install.python.display().to_string(),
        );
        if context.node_memory_mb > 0 {
            let executor_mb = worker_memory_mb(context.node_memory_mb).min(1024);
            properties.insert("spark.executor.memory".into(), format!("{executor_mb}m"));
        }
        for (k, v) in &context.conf {
            properties.insert(k.clone(), v.clone());
        }
        let applications = Applications::default();
        let submit = SparkSubmit {
            env: install.env(ip, &app_conf),
            install,
            master_url: master_url.clone(),
            master_ui,
            properties,
            applications: applications.clone(),
        };
        let runtime = match bundled::start_driver(&context, Some(Arc::new(submit))).await {
            Ok(runtime) => runtime,
            Err(e) => {
                master.stop().await;
                return Err(e);
            }
        };
        Ok(SparkDriver {
            runtime,
            master: Mutex::new(Some(master)),
            master_url,
            master_ui,
            applications,
        })
    }

    async fn start_worker(
        &self,
        context: RoleContext,
        driver_address: String,
    ) -> Result<SparkWorker, EngineError> {
        let fail = start_error("Spark worker");
        let install = Install::find(&context.dir).map_err(&fail)?;
        let status = client::cluster_status(&driver_address, &context.credential)
            .await
            .map_err(|e| fail(format!("cannot ask the driver for its Spark master: {e:#}")))?;
        let master_url = status
            .engine
            .get(MASTER_KEY)
            .cloned()
            .ok_or_else(|| fail("the driver runs no Spark master".into()))?;
        let spark_dir = context.dir.join("spark");
        let work = spark_dir.join("work");
        std::fs::create_dir_all(&work)
            .map_err(|e| fail(format!("cannot create {}: {e}", work.display())))?;
        let cores = match (context.node_cores, context.cores) {
            (0, 0) => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            (0, c) | (c, _) => c,
        };
        let memory = match context.node_memory_mb {
            0 => 1024,
            mb => worker_memory_mb(mb),
        };
        let (worker, address, _) = Daemon::start(
            &install,
            &context,
            DaemonStart {
                name: "worker",
                class: "org.apache.spark.deploy.worker.Worker",
                args: vec![
                    "--cores".into(),
                    cores.to_string(),
                    "--memory".into(),
                    format!("{memory}m"),
                    "--work-dir".into(),
                    work.display().to_string(),
                    master_url,
                ],
                env: [(
                    "SPARK_LOCAL_DIRS".to_string(),
                    spark_dir.join("local").display().to_string(),
                )]
                .into(),
            },
            |rpc, _| accepts(rpc),
        )
        .await
        .map_err(&fail)?;
        Ok(SparkWorker {
            address: address.to_string(),
            daemon: Mutex::new(Some(worker)),
        })
    }
}

/// What a worker offers executors of a node with `node_mb`: three quarters,
/// the rest for the OS, the daemon and Python workers; never under 512 MiB.
fn worker_memory_mb(node_mb: u32) -> u32 {
    (node_mb / 4 * 3).max(512)
}

#[async_trait]
impl EnginePlugin for Spark {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "Apache Spark's standalone manager (pyspark from PyPI): jobs by spark-submit"
    }

    fn check_version(&self, version: &str) -> Result<(), Unsupported> {
        if valid_version(version) {
            Ok(())
        } else {
            Err(Unsupported(format!(
                "a Spark version is a pyspark release on PyPI, 3.x.y or 4.x.y (\"{DEFAULT_VERSION}\")"
            )))
        }
    }

    fn setup(&self, version: &str) -> Option<EngineSetup> {
        let version = version_or_default(version);
        valid_version(version).then(|| EngineSetup {
            template: "engines/spark.sh",
            version: version.to_string(),
            package: format!("pyspark=={version}"),
        })
    }

    fn check_task(&self, task: &crate::spec::Task) -> Result<(), Unsupported> {
        if task.map.is_some() {
            return Err(Unsupported(
                "map/reduce tasks run on the motorpool engine; on a Spark cluster write the \
                 job as a `spark:` task (PySpark), or use a `command:`"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn start_role(
        &self,
        role: RoleStart,
        context: RoleContext,
    ) -> Result<Arc<dyn RunningRole>, EngineError> {
        match role {
            RoleStart::Driver => Ok(Arc::new(self.start_driver(context).await?)),
            RoleStart::Worker { driver_address } => {
                Ok(Arc::new(self.start_worker(context, driver_address).await?))
            }
        }
    }

    async fn run_job(
        &self,
        driver: &DriverAccess,
        submission: JobSubmission,
        on_progress: &mut (dyn for<'p> FnMut(&'p Progress) + Send),
    ) -> Result<RunSummary, EngineError> {
        BundledRuntime
            .run_job(driver, submission, on_progress)
            .await
    }

    async fn runs(
        &self,
        driver: &DriverAccess,
        job: Option<&str>,
    ) -> Result<Vec<RunBrief>, EngineError> {
        BundledRuntime.runs(driver, job).await
    }

    async fn cancel_run(&self, driver: &DriverAccess, run_id: &str) -> Result<bool, EngineError> {
        BundledRuntime.cancel_run(driver, run_id).await
    }

    async fn logs(&self, driver: &DriverAccess, run_id: &str) -> Result<Vec<LogFile>, EngineError> {
        BundledRuntime.logs(driver, run_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_pyspark_releases() {
        for ok in ["4.0.1", "3.5.7", "4.1.0"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in [
            "4", "4.0", "latest", "4.0.1rc1", "2.4.8", "4.0.1 ", "4..1", "",
        ] {
            assert!(!valid_version(bad), "{bad:?}");
        }
        assert!(Spark.check_version("4.0").is_err());
        let setup = Spark.setup("").expect("the default version installs");
        assert_eq!(setup.package, format!("pyspark=={DEFAULT_VERSION}"));
    }

    #[test]
    fn a_task_becomes_one_spark_submit_with_the_task_conf_last() {
        let submit = SparkSubmit {
            install: Install {
                python: "/c/venv/bin/python".into(),
                spark_home: "/c/pyspark".into(),
                python_path: String::new(),
            },
            env: BTreeMap::new(),
            master_url: "spark://127.0.0.1:7077".into(),
            master_ui: "127.0.0.1:8080".parse().expect("address"),
            properties: [
                ("spark.port.maxRetries".to_string(), "0".to_string()),
                ("spark.sql.shuffle.partitions".to_string(), "8".to_string()),
                ("spark.ui.port".to_string(), "0".to_string()),
            ]
            .into(),
            applications: Applications::default(),
        };
        let task = SparkTask {
            script: "jobs/aggregate.py".into(),
            args: vec!["data/events.csv".into(), "--flag; rm -rf /".into()],
            py_files: vec!["jobs/lib.py".into(), "jobs/more.zip".into()],
            conf: [("spark.sql.shuffle.partitions".to_string(), "2".to_string())].into(),
        };
        let (argv, ui) = submit.command_line(&task, Some(4321));
        assert_eq!(
            argv,
            [
                "/c/pyspark/bin/spark-submit",
                "--master",
                "spark://127.0.0.1:7077",
                "--conf",
                "spark.port.maxRetries=0",
                "--conf",
                "spark.sql.shuffle.partitions=2",
                "--conf",
                "spark.ui.port=4321",
                "--py-files",
                "jobs/lib.py,jobs/more.zip",
                "jobs/aggregate.py",
                "data/events.csv",
                "--flag; rm -rf /",
            ]
        );
        // The application's UI is watched where it will listen...
        assert_eq!(ui, Some(4321));
        // ... at the task's own port when it names one, and not when it turns the UI off.
        let mut own = task.clone();
        own.conf.insert("spark.ui.port".into(), "4444".into());
        assert_eq!(submit.command_line(&own, Some(4321)).1, Some(4444));
        let mut off = task.clone();
        off.conf.insert("spark.ui.enabled".into(), "false".into());
        assert_eq!(submit.command_line(&off, Some(4321)).1, None);
        // No free port found: any port, not watched.
        let (argv, ui) = submit.command_line(&task, None);
        assert!(argv.contains(&"spark.ui.port=0".to_string()), "{argv:?}");
        assert_eq!(ui, None);
    }

    /// An application's UI on loopback answering the two REST calls as
    /// Spark does (HTTP/1.0, closed after the answer).
    async fn fake_application_ui() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = vec![0u8; 4096];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n]).to_string();
                let body = if line
                    .starts_with("GET /api/v1/applications/app-7/stages?status=active ")
                {
                    r#"[{"stageId":0,"numTasks":48,"numActiveTasks":1,"numCompleteTasks":5,"numCompletedIndices":5}]"#
                } else if line.starts_with("GET /api/v1/applications ") {
                    r#"[{"id":"app-7","name":"wide","attempts":[]}]"#
                } else {
                    ""
                };
                let head = if body.is_empty() {
                    "HTTP/1.1 404 Not Found"
                } else {
                    "HTTP/1.1 200 OK"
                };
                let answer = format!(
                    "{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn an_application_ui_tells_its_waiting_and_running_tasks() {
        let ui = fake_application_ui().await;
        assert_eq!(application_load(ui).await, Ok(Some((48 - 5 - 1, 1))));
        // Nothing listens: the application ended.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        assert_eq!(application_load(gone).await, Ok(None));
    }

    #[test]
    fn waiting_tasks_are_those_of_active_stages_not_done_nor_running() {
        let stages: Vec<StageState> = serde_json::from_str(
            r#"[{"status":"ACTIVE","stageId":3,"numTasks":24,"numActiveTasks":2,
                 "numCompleteTasks":5,"numFailedTasks":1,"numCompletedIndices":4},
                {"status":"ACTIVE","stageId":4,"numTasks":3,"numActiveTasks":0,"numCompleteTasks":0}]"#,
        )
        .expect("stages");
        assert_eq!(stages[0].pending(), 24 - 4 - 2);
        assert_eq!(stages[1].pending(), 3);
        // Speculative copies never make it negative.
        let over = StageState {
            num_tasks: 2,
            num_active_tasks: 2,
            num_complete_tasks: 1,
            num_completed_indices: Some(1),
        };
        assert_eq!(over.pending(), 0);
    }

    #[test]
    fn the_master_state_reads_alive_workers() {
        let json = r#"{"url":"spark://127.0.0.1:7077","workers":[
            {"id":"w1","host":"127.0.0.1","port":1,"state":"ALIVE","cores":2},
            {"id":"w2","host":"127.0.0.1","port":2,"state":"DEAD"}],
            "aliveworkers":1,"activeapps":[{"id":"app-1"}],"status":"ALIVE"}"#;
        let state: MasterState = serde_json::from_str(json).expect("parses");
        let alive: Vec<&str> = state
            .alive_workers()
            .iter()
            .map(|w| w.id.as_str())
            .collect();
        assert_eq!(alive, ["w1"]);
        assert_eq!(state.alive_workers()[0].cores, 2);
        assert_eq!(state.activeapps.len(), 1);
    }

    fn context() -> RoleContext {
        RoleContext {
            cluster: "analytics".into(),
            credential: crate::auth::Credential::new("cluster-secret"),
            dir: "/nodes/n1/runtime".into(),
            listen: "127.0.0.1:0".parse().expect("address"),
            tls: None,
            cores: 0,
            version: DEFAULT_VERSION.into(),
            conf: BTreeMap::new(),
            node_cores: 2,
            node_memory_mb: 4096,
            minute: Duration::from_secs(60),
        }
    }

    #[test]
    fn daemons_authenticate_and_encrypt_beyond_loopback_only() {
        let ctx = context();
        let local = shared_properties(&ctx, "127.0.0.1".parse().expect("ip"));
        assert_eq!(
            local.get("spark.port.maxRetries").map(String::as_str),
            Some("0")
        );
        assert!(!local.contains_key("spark.authenticate"));

        let private = shared_properties(&ctx, "10.0.0.5".parse().expect("ip"));
        assert_eq!(
            private.get("spark.authenticate").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            private
                .get("spark.network.crypto.enabled")
                .map(String::as_str),
            Some("true")
        );
        let secret = private.get("spark.authenticate.secret").expect("a secret");
        // Derived: the same on every node of the cluster, never the credential itself.
        assert_ne!(secret, "cluster-secret");
        assert_eq!(secret.len(), 64);
        let again = shared_properties(&context(), "10.0.0.6".parse().expect("ip"));
        assert_eq!(again.get("spark.authenticate.secret"), Some(secret));
    }

    #[test]
    fn properties_files_escape_what_java_reads_specially() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.properties");
        let props: BTreeMap<String, String> =
            [("spark.a".to_string(), "x=y:z\\nnew".to_string())].into();
        write_properties(&path, &props).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "spark.a=x\\=y\\:z\\\\nnew\n");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "only its owner reads the secret");
    }

    #[test]
    fn a_worker_keeps_a_quarter_of_its_node() {
        assert_eq!(worker_memory_mb(2048), 1536);
        assert_eq!(worker_memory_mb(256), 512);
    }
}
