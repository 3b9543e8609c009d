//! Stand-ins for cloud machines in the CLI tests of the cloud providers.
//!
//! [`Machines`] plays the machines: for each running instance a cloud (an
//! emulator or a fake) reports, it takes the agent config out of the user
//! data the cloud holds and starts a real `motorpool agent` on 127.0.0.1
//! with it, as cloud-init would. The agent then does what it does on a real
//! node: runs the node's startup and tags its own instance through the
//! cloud's API. An instance that stops running loses its agent. Every agent
//! is killed on drop, also when the test fails.
//!
//! With [`Machines::boot_user_data`] a machine runs its user data itself
//! instead, as a fresh node would ([`super::cloud_init`]): the script
//! downloads the runtime, checks it and starts the agent through `systemctl`.
//!
//! [`FakeNodes`] plays the nodes without running them: it tags every pool
//! instance warm and every cluster instance ready through the provider, as
//! their agents would. For tests about launching, not about startup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use motorpool_provider::{Provider, Retag, TagFilter, tags};

/// One instance as the cloud reports it.
pub struct Machine {
    pub id: String,
    pub running: bool,
    /// The user data the instance was launched with, once the cloud shows it.
    pub user_data: Option<String>,
}

/// What runs for one machine; dropping it stops it.
enum Running {
    /// An agent started from the config in the user data.
    Agent(Child),
    /// The user data itself, and the agent it started.
    Booted(super::cloud_init::Booted),
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Agent(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

type Agents = Arc<Mutex<BTreeMap<String, Running>>>;

/// How a machine comes to life: what its user data asks, under its directory.
type BootFn = dyn Fn(&Machine, &Path) -> Option<Running> + Send;

pub struct Machines {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    agents: Agents,
    dir: tempfile::TempDir,
}

impl Machines {
    /// Poll `look` (the project's instances) every 200 ms and keep one agent
    /// per running instance; `prepare` sets up each agent's environment
    /// (where its cloud's API is, no real credentials).
    pub fn start(
        look: impl FnMut() -> Vec<Machine> + Send + 'static,
        prepare: impl Fn(&mut Command) + Send + 'static,
    ) -> Machines {
        Machines::with_boot(
            look,
            Box::new(move |machine, dir| boot(machine, dir, &prepare).map(Running::Agent)),
        )
    }

    /// Like [`Machines::start`], but each machine runs its user data for
    /// real at first boot ([`super::cloud_init::Booted`]), with its own
    /// metadata service and its own address in 127.0.0.0/8 (a random
    /// 127.X.Y.0/24 per test, so tests on one machine never share one);
    /// `prepare` adds the cloud's endpoint and credentials.
    pub fn boot_user_data(
        look: impl FnMut() -> Vec<Machine> + Send + 'static,
        region: &str,
        prepare: impl Fn(&mut Command) + Send + 'static,
    ) -> Machines {
        let subnet = [127, fastrand::u8(1..=254), fastrand::u8(1..=254)];
        let next_host = std::sync::atomic::AtomicU8::new(10);
        let region = region.to_string();
        Machines::with_boot(
            look,
            Box::new(move |machine, dir| {
                let user_data = machine.user_data.as_deref()?;
                let bin = super::cloud_init::fake_bin(dir.parent()?).ok()?;
                let host = next_host.fetch_add(1, Ordering::SeqCst);
                let metadata = super::cloud_init::Metadata {
                    instance_id: machine.id.clone(),
                    private_ip: std::net::Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host),
                    region: region.clone(),
                    access_key_id: "AKIAMOTORPOOLNODE000".into(),
                    secret_access_key: "motorpool-node-role-secret".into(),
                };
                super::cloud_init::Booted::boot(user_data, metadata, dir, &bin, &prepare)
                    .ok()
                    .map(Running::Booted)
            }),
        )
    }

    fn with_boot(
        mut look: impl FnMut() -> Vec<Machine> + Send + 'static,
        boot: Box<BootFn>,
    ) -> Machines {
        let stop = Arc::new(AtomicBool::new(false));
        let agents: Agents = Arc::default();
        let dir = tempfile::Builder::new()
            .prefix("mp-machines-")
            .tempdir()
            .expect("a directory for the machines");
        let (root, flag, running) = (dir.path().to_path_buf(), stop.clone(), agents.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let live: BTreeMap<String, Machine> =
                    look().into_iter().map(|m| (m.id.clone(), m)).collect();
                let Ok(mut agents) = running.lock() else {
                    return;
                };
                // A machine that stopped or went away takes its agent with it.
                let gone: Vec<String> = agents
                    .keys()
                    .filter(|id| !live.get(*id).is_some_and(|m| m.running))
                    .cloned()
                    .collect();
                for id in gone {
                    drop(agents.remove(&id));
                }
                for (id, machine) in &live {
                    if !machine.running || agents.contains_key(id) {
                        continue;
                    }
                    let dir = machine_dir(&root, id);
                    if let Some(running) = boot(machine, &dir) {
                        agents.insert(id.clone(), running);
                    }
                }
                drop(agents);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Machines {
            stop,
            thread: Some(thread),
            agents,
            dir,
        }
    }

    /// The `motorpool-step` values instance `id`'s agent tagged itself with, in order.
    pub fn steps_reported(&self, id: &str) -> Vec<String> {
        self.log(id)
            .lines()
            .filter_map(|l| l.split_once("tagged itself motorpool-step="))
            .map(|(_, step)| step.to_string())
            .collect()
    }

    pub fn log(&self, id: &str) -> String {
        let dir = machine_dir(self.dir.path(), id);
        match std::fs::read_to_string(dir.join("agent.log")) {
            Ok(log) => log,
            // Booted from its user data: the script's output, then the agent's.
            Err(_) => [
                "cloud-init.log".to_string(),
                format!("{}.log", super::cloud_init::AGENT_UNIT),
            ]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n"),
        }
    }
}

fn machine_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id.replace('/', "_"))
}

/// Start the agent a machine's user data asks for; None when it has none (yet).
fn boot(machine: &Machine, dir: &Path, prepare: &impl Fn(&mut Command)) -> Option<Child> {
    let config = motorpool::agent::AgentConfig::from_user_data(machine.user_data.as_deref()?)?;
    std::fs::create_dir_all(dir).ok()?;
    let config_path = dir.join("agent-config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config).ok()?).ok()?;
    let log = std::fs::File::create(dir.join("agent.log")).ok()?;
    let mut cmd = Command::new(super::binary());
    cmd.args([
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--instance-id",
        &machine.id,
    ])
    .arg("--dir")
    .arg(dir.join("node"))
    .arg("--config")
    .arg(&config_path)
    .stdin(Stdio::null())
    .stdout(log.try_clone().ok()?)
    .stderr(log);
    prepare(&mut cmd);
    cmd.spawn().ok()
}

impl Drop for Machines {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut agents = match self.agents.lock() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        };
        drop(std::mem::take(&mut *agents));
        // A failing test keeps the agents' logs to read.
        if std::thread::panicking() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a placeholder directory"),
            );
            eprintln!("the machines' logs are kept in {}", dir.keep().display());
        }
    }
}

pub struct FakeNodes {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeNodes {
    /// Every 200 ms, tag project `project`'s instances as their agents would,
    /// through the provider `connect` makes (on the tagging thread).
    pub fn start<P: Provider + 'static>(
        connect: impl FnOnce() -> P + Send + 'static,
        project: &str,
    ) -> FakeNodes {
        let stop = Arc::new(AtomicBool::new(false));
        let (project, flag) = (project.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let provider = connect();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut filter = TagFilter::new();
            filter.insert(tags::PROJECT.into(), project);
            while !flag.load(Ordering::SeqCst) {
                rt.block_on(async {
                    let mut token = None;
                    let mut todo: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                    loop {
                        let Ok(page) = provider.list_page(&filter, token).await else {
                            return;
                        };
                        for i in page.instances.iter().filter(|i| i.state.is_live()) {
                            let want = match i.tag(tags::KIND) {
                                Some("pool") => "runtime",
                                Some("cluster") => "ready",
                                _ => continue,
                            };
                            if i.tag(tags::STEP) != Some(want) {
                                todo.entry(want).or_default().push(i.id.clone());
                            }
                        }
                        match page.next_token {
                            Some(t) => token = Some(t),
                            None => break,
                        }
                    }
                    for (step, ids) in todo {
                        let mut change = Retag::default();
                        change.set.insert(tags::STEP.into(), step.into());
                        let _ = provider.retag(&ids, &change).await;
                    }
                });
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        FakeNodes {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeNodes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
