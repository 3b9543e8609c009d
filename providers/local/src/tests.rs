//! Tests against a stand-in agent: a small sh script that, like `motorpool
//! agent`, writes `agent.json` (address, pid, instance id) into its `--dir`
//! and then runs until it is killed.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;

const FAKE_AGENT: &str = r#"#!/bin/sh
# A stand-in for `motorpool agent --dir D --listen A --instance-id I`.
dir=""
id=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --instance-id) id="$2"; shift 2 ;;
    *) shift ;;
  esac
done
echo "fake agent $id starting in $dir"
port=$(( $$ % 20000 + 30000 ))
printf '{"address": "127.0.0.1:%s", "pid": %s, "instance_id": "%s"}\n' "$port" "$$" "$id" > "$dir/.agent.json.tmp"
mv "$dir/.agent.json.tmp" "$dir/agent.json"
while :; do sleep 1; done
"#;

const FAILING_AGENT: &str = "#!/bin/sh\necho 'cannot bind: boom' >&2\nexit 3\n";

const HANGING_AGENT: &str = "#!/bin/sh\nwhile :; do sleep 1; done\n";

/// A temporary home plus the stand-in agents. Dropping it (also when a test
/// panics) kills every process whose command line names the temporary
/// directory, with its process group, before the directory goes.
struct TestHome {
    tmp: tempfile::TempDir,
}

impl TestHome {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        for (name, text) in [
            ("fake-agent", FAKE_AGENT),
            ("failing-agent", FAILING_AGENT),
            ("hanging-agent", HANGING_AGENT),
        ] {
            let path = tmp.path().join(name);
            fs::write(&path, text).expect("write script");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        TestHome { tmp }
    }

    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    fn program(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn provider(&self) -> LocalProvider {
        self.provider_with("fake-agent", DEFAULT_PAGE_SIZE)
    }

    fn provider_with(&self, program: &str, page_size: usize) -> LocalProvider {
        LocalProvider::new(LocalConfig {
            home: self.home(),
            agent_program: self.program(program),
            page_size,
        })
        .expect("provider")
        .with_stop_grace(Duration::from_secs(2))
    }

    /// Processes whose command line names this test's directory.
    fn processes(&self) -> Vec<u32> {
        let needle = self.tmp.path().as_os_str().as_encoded_bytes().to_vec();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
                && process::exists(pid)
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.processes();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                process::kill_group(pid, libc::SIGKILL);
                if let Ok(raw) = libc::pid_t::try_from(pid) {
                    // SAFETY: plain kill of a process this test started.
                    unsafe {
                        libc::kill(raw, libc::SIGKILL);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process of the test that is killed and reaped on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn request(count: u32, token: &str, tag_pairs: &[(&str, &str)]) -> LaunchRequest {
    LaunchRequest {
        count,
        node_type: "small".to_string(),
        image: None,
        tags: tags(tag_pairs),
        user_data: String::new(),
        client_token: token.to_string(),
    }
}

async fn list_all(provider: &LocalProvider, filter: &TagFilter) -> Vec<Instance> {
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let page = provider.list_page(filter, token).await.expect("list_page");
        all.extend(page.instances);
        match page.next_token {
            Some(next) => token = Some(next),
            None => return all,
        }
    }
}

fn pid_alive(pid: u32, provider: &LocalProvider, id: &str) -> bool {
    process::liveness(pid, &provider.instance_dir(id).expect("valid id")) == Liveness::Alive
}

async fn wait_until_dead(pid: u32, provider: &LocalProvider, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid, provider, id) {
        assert!(Instant::now() < deadline, "{pid} did not die");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state_of<'a>(list: &'a [Instance], id: &str) -> &'a Instance {
    list.iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} not listed in {list:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn launch_lists_running_agents_and_is_idempotent_per_token() {
    let t = TestHome::new();
    let provider = t.provider();
    assert_eq!(provider.kind(), "local");
    assert_eq!(provider.default_image(), "local-runtime-1");
    assert!(provider.calls_per_second() >= 1000.0);

    let launched = provider
        .launch(&request(3, "tok-1", &[("motorpool-project", "p")]))
        .await
        .expect("launch");
    assert_eq!(launched.len(), 3);
    for instance in &launched {
        assert!(valid_id(&instance.id), "{}", instance.id);
        assert_eq!(instance.state, InstanceState::Running, "{instance:?}");
        assert_eq!(instance.image, DEFAULT_IMAGE);
        assert_eq!(instance.tag("motorpool-project"), Some("p"));
        let pid = instance.pid.expect("pid");
        assert!(pid_alive(pid, &provider, &instance.id));
        let address = instance.address.as_deref().expect("address");
        assert!(address.starts_with("127.0.0.1:"), "{address}");
        let dir = provider.instance_dir(&instance.id).expect("valid id");
        assert!(dir.join("instance.json").is_file());
        let log = fs::read_to_string(provider.log_path(&instance.id).expect("valid id"))
            .expect("agent.log");
        assert!(log.contains("fake agent"), "{log}");
    }

    let listed = list_all(&provider, &tags(&[("motorpool-project", "p")])).await;
    let mut launched_ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    launched_ids.sort();
    let listed_ids: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();
    assert_eq!(listed_ids, launched_ids, "sorted by id");
    for instance in &listed {
        assert_eq!(instance.state, InstanceState::Running);
        assert!(instance.pid.is_some() && instance.address.is_some());
    }
    assert!(
        list_all(&provider, &tags(&[("motorpool-project", "other")]))
            .await
            .is_empty()
    );

    // The same token again: the same instances, nothing new.
    let again = provider
        .launch(&request(3, "tok-1", &[("motorpool-project", "p")]))
        .await
        .expect("relaunch");
    let mut again_ids: Vec<String> = again.iter().map(|i| i.id.clone()).collect();
    again_ids.sort();
    assert_eq!(again_ids, launched_ids);
    assert_eq!(list_all(&provider, &TagFilter::new()).await.len(), 3);

    // A fresh provider (another CLI run) sees the same.
    let other = t.provider();
    let again = other
        .launch(&request(3, "tok-1", &[("motorpool-project", "p")]))
        .await
        .expect("relaunch from another provider");
    assert_eq!(again.len(), 3);

    // The token with other parameters is refused and changes nothing.
    let err = provider
        .launch(&request(4, "tok-1", &[("motorpool-project", "p")]))
        .await
        .expect_err("mismatch");
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    assert_eq!(list_all(&provider, &TagFilter::new()).await.len(), 3);

    provider.terminate(&launched_ids).await.expect("terminate");
    assert!(list_all(&provider, &TagFilter::new()).await.is_empty());
    assert!(t.processes().is_empty(), "{:?}", t.processes());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_reused_process_is_reported_terminated_and_terminate_cleans_up() {
    let t = TestHome::new();
    let provider = t.provider();
    let launched = provider
        .launch(&request(3, "tok", &[("k", "v")]))
        .await
        .expect("launch");
    let victim = &launched[0];
    let pid = victim.pid.expect("pid");

    // Killed behind the provider's back: drift.
    process::kill_group(pid, libc::SIGKILL);
    wait_until_dead(pid, &provider, &victim.id).await;
    let listed = list_all(&provider, &TagFilter::new()).await;
    let seen = state_of(&listed, &victim.id);
    assert_eq!(seen.state, InstanceState::Terminated);
    assert_eq!(seen.pid, None);
    assert_eq!(seen.address, None);
    for other in &launched[1..] {
        assert_eq!(state_of(&listed, &other.id).state, InstanceState::Running);
    }

    // A record whose pid now belongs to another program (pid reuse) is dead too.
    let reused = &launched[1];
    let path = provider
        .instance_dir(&reused.id)
        .expect("valid id")
        .join("instance.json");
    let mut record: Record =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("parse");
    let real_pid = record.pid;
    record.pid = Some(std::process::id());
    fs::write(&path, serde_json::to_vec(&record).expect("encode")).expect("write");
    let listed = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(
        state_of(&listed, &reused.id).state,
        InstanceState::Terminated
    );
    // Back to the real pid, so that terminate below finds the agent.
    record.pid = real_pid;
    fs::write(&path, serde_json::to_vec(&record).expect("encode")).expect("write");

    // Terminate removes the processes and the directories; unknown ids are fine.
    let mut ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    ids.push("local-deadbeef".to_string());
    let started = Instant::now();
    provider.terminate(&ids).await.expect("terminate");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    for instance in &launched {
        assert!(
            !provider
                .instance_dir(&instance.id)
                .expect("valid id")
                .exists()
        );
        if let Some(pid) = instance.pid {
            assert!(!pid_alive(pid, &provider, &instance.id));
        }
    }
    assert!(list_all(&provider, &TagFilter::new()).await.is_empty());
    assert!(t.processes().is_empty(), "{:?}", t.processes());
    // Again: already gone is not an error.
    provider.terminate(&ids).await.expect("terminate again");

    // Ids that are not ours never become paths.
    let err = provider
        .terminate(&["../../etc".to_string()])
        .await
        .expect_err("bad id");
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_pid_is_never_signalled() {
    let t = TestHome::new();
    let provider = t.provider();
    let launched = provider.launch(&request(1, "", &[])).await.expect("launch");
    let id = launched[0].id.clone();
    let agent_pid = launched[0].pid.expect("pid");
    // Point the record at a foreign process: a sleep this test owns.
    let mut foreign = ChildGuard(
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep"),
    );
    let path = provider
        .instance_dir(&id)
        .expect("valid id")
        .join("instance.json");
    let mut record: Record =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("parse");
    record.pid = Some(foreign.0.id());
    record.pgid = Some(foreign.0.id());
    fs::write(&path, serde_json::to_vec(&record).expect("encode")).expect("write");

    provider
        .terminate(std::slice::from_ref(&id))
        .await
        .expect("terminate");
    let still_running = foreign.0.try_wait().expect("try_wait").is_none();
    assert!(
        still_running,
        "terminate signalled a process that is not its agent"
    );
    assert!(!provider.instance_dir(&id).expect("valid id").exists());
    // The real agent (now without a record) is left to the guard.
    process::kill_group(agent_pid, libc::SIGKILL);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_keeps_the_directory_and_start_brings_the_same_instance_back() {
    let t = TestHome::new();
    let provider = t.provider();
    let launched = provider
        .launch(&request(2, "tok", &[("k", "v")]))
        .await
        .expect("launch");
    let id = launched[0].id.clone();
    let old_pid = launched[0].pid.expect("pid");

    provider
        .stop(std::slice::from_ref(&id))
        .await
        .expect("stop");
    assert!(!pid_alive(old_pid, &provider, &id));
    assert!(
        provider
            .instance_dir(&id)
            .expect("valid id")
            .join("instance.json")
            .is_file()
    );
    let listed = list_all(&provider, &TagFilter::new()).await;
    let seen = state_of(&listed, &id);
    assert_eq!(seen.state, InstanceState::Stopped);
    assert_eq!(seen.pid, None);
    assert_eq!(
        state_of(&listed, &launched[1].id).state,
        InstanceState::Running
    );
    // Stopping again is fine.
    provider
        .stop(std::slice::from_ref(&id))
        .await
        .expect("stop again");

    provider
        .start(std::slice::from_ref(&id))
        .await
        .expect("start");
    let listed = list_all(&provider, &TagFilter::new()).await;
    let seen = state_of(&listed, &id);
    assert_eq!(seen.state, InstanceState::Running);
    let new_pid = seen.pid.expect("pid");
    assert_ne!(new_pid, old_pid);
    assert!(pid_alive(new_pid, &provider, &id));
    assert_eq!(seen.tags, tags(&[("k", "v")]));
    // Starting a running instance changes nothing.
    provider
        .start(std::slice::from_ref(&id))
        .await
        .expect("start again");
    let listed = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(state_of(&listed, &id).pid, Some(new_pid));
    let log = fs::read_to_string(provider.log_path(&id).expect("valid id")).expect("log");
    assert_eq!(
        log.matches("fake agent").count(),
        2,
        "the log is appended: {log}"
    );

    // Unknown ids: NotFound, and nothing changes.
    let err = provider
        .stop(&[id.clone(), "local-00000000".to_string()])
        .await
        .expect_err("unknown");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    assert!(pid_alive(new_pid, &provider, &id));

    let ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    provider.terminate(&ids).await.expect("terminate");
    assert!(t.processes().is_empty(), "{:?}", t.processes());
}

#[tokio::test(flavor = "multi_thread")]
async fn retag_sets_and_removes_tags() {
    let t = TestHome::new();
    let provider = t.provider();
    let launched = provider
        .launch(&request(
            2,
            "tok",
            &[("motorpool-role", "idle"), ("motorpool-idle-since", "1")],
        ))
        .await
        .expect("launch");
    let id = launched[0].id.clone();
    let change = Retag {
        set: tags(&[("motorpool-role", "worker"), ("motorpool-name", "etl")]),
        remove: vec!["motorpool-idle-since".to_string()],
    };
    provider
        .retag(std::slice::from_ref(&id), &change)
        .await
        .expect("retag");
    provider
        .retag(std::slice::from_ref(&id), &change)
        .await
        .expect("retag is safe to repeat");
    let workers = list_all(&provider, &tags(&[("motorpool-role", "worker")])).await;
    assert_eq!(workers.len(), 1);
    assert_eq!(
        workers[0].tags,
        tags(&[("motorpool-role", "worker"), ("motorpool-name", "etl")])
    );
    assert_eq!(workers[0].state, InstanceState::Running);
    let idle = list_all(&provider, &tags(&[("motorpool-role", "idle")])).await;
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].id, launched[1].id);

    // Many concurrent retags of one record: none is lost.
    let mut tasks = Vec::new();
    for n in 0..20 {
        let provider = provider.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let change = Retag {
                set: tags(&[(format!("k{n}").as_str(), "v")]),
                remove: Vec::new(),
            };
            provider.retag(&[id], &change).await
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("retag");
    }
    let workers = list_all(&provider, &tags(&[("motorpool-role", "worker")])).await;
    assert_eq!(workers[0].tags.len(), 22, "{:?}", workers[0].tags);

    let err = provider
        .retag(&["local-00000000".to_string()], &change)
        .await
        .expect_err("unknown");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");

    let ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    provider.terminate(&ids).await.expect("terminate");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_through_matching_instances_in_id_order() {
    let t = TestHome::new();
    let provider = t.provider_with("fake-agent", 2);
    let mine = provider
        .launch(&request(5, "mine", &[("motorpool-project", "a")]))
        .await
        .expect("launch");
    let theirs = provider
        .launch(&request(2, "theirs", &[("motorpool-project", "b")]))
        .await
        .expect("launch");

    let filter = tags(&[("motorpool-project", "a")]);
    let mut pages = Vec::new();
    let mut token = None;
    loop {
        let page = provider.list_page(&filter, token).await.expect("page");
        assert!(page.instances.len() <= 2);
        pages.push(
            page.instances
                .iter()
                .map(|i| i.id.clone())
                .collect::<Vec<_>>(),
        );
        match page.next_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(pages.len(), 3, "{pages:?}");
    let seen: Vec<String> = pages.concat();
    let mut expected: Vec<String> = mine.iter().map(|i| i.id.clone()).collect();
    expected.sort();
    assert_eq!(seen, expected);

    let everything = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(everything.len(), 7);

    let err = provider
        .list_page(&filter, Some("../x".to_string()))
        .await
        .expect_err("bad token");
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");

    let ids: Vec<String> = mine.iter().chain(&theirs).map(|i| i.id.clone()).collect();
    provider.terminate(&ids).await.expect("terminate");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_exits_or_hangs_fails_the_launch_naming_its_log() {
    let t = TestHome::new();
    let failing = t.provider_with("failing-agent", DEFAULT_PAGE_SIZE);
    let err = failing
        .launch(&request(1, "f", &[("k", "fail")]))
        .await
        .expect_err("the agent exits");
    let message = err.to_string();
    assert!(message.contains("exit code 3"), "{message}");
    assert!(message.contains("agent.log"), "{message}");
    let listed = list_all(&failing, &tags(&[("k", "fail")])).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, InstanceState::Terminated);
    let log = fs::read_to_string(failing.log_path(&listed[0].id).expect("valid id")).expect("log");
    assert!(log.contains("boom"), "{log}");

    let hanging = t
        .provider_with("hanging-agent", DEFAULT_PAGE_SIZE)
        .with_start_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = hanging
        .launch(&request(1, "h", &[("k", "hang")]))
        .await
        .expect_err("the agent never listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = err.to_string();
    assert!(message.contains("did not start listening"), "{message}");
    assert!(message.contains("agent.log"), "{message}");
    let listed = list_all(&hanging, &tags(&[("k", "hang")])).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, InstanceState::Terminated);
    assert!(t.processes().is_empty(), "the hanging agent was killed");

    let missing = LocalProvider::new(LocalConfig::new(t.home(), t.program("no-such-program")))
        .expect("provider");
    let err = missing
        .launch(&request(1, "m", &[("k", "missing")]))
        .await
        .expect_err("no program");
    assert!(err.to_string().contains("no-such-program"), "{err}");
    let listed = list_all(&missing, &tags(&[("k", "missing")])).await;
    assert_eq!(listed[0].state, InstanceState::Terminated);
}

#[tokio::test(flavor = "multi_thread")]
async fn records_of_a_launch_killed_before_its_agents_started_list_as_terminated() {
    let t = TestHome::new();
    let provider = t.provider();
    // What a launcher SIGKILLed between writing the record and spawning leaves.
    let mut gone = Command::new("true").spawn().expect("true");
    let dead_pid = gone.id();
    gone.wait().expect("wait");
    let id = "local-0badc0de";
    let dir = provider.instance_dir(id).expect("valid id");
    fs::create_dir_all(&dir).expect("mkdir");
    let record = Record {
        id: id.to_string(),
        node_type: "small".to_string(),
        image: DEFAULT_IMAGE.to_string(),
        tags: tags(&[("k", "v")]),
        state: InstanceState::Pending,
        launched_at: now_unix(),
        client_token: "t".to_string(),
        pid: None,
        pgid: None,
        address: None,
        dir: Some(dir.clone()),
        launcher_pid: Some(dead_pid),
        spawned_at: None,
    };
    fs::write(
        dir.join("instance.json"),
        serde_json::to_vec(&record).expect("encode"),
    )
    .expect("write");
    let listed = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, InstanceState::Terminated);

    // While its launcher lives, it is pending.
    let mut record = record;
    record.launcher_pid = Some(std::process::id());
    fs::write(
        dir.join("instance.json"),
        serde_json::to_vec(&record).expect("encode"),
    )
    .expect("write");
    let listed = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(listed[0].state, InstanceState::Pending);

    // Once its launcher is gone, start revives it with the same id.
    record.launcher_pid = Some(dead_pid);
    fs::write(
        dir.join("instance.json"),
        serde_json::to_vec(&record).expect("encode"),
    )
    .expect("write");
    provider.start(&[id.to_string()]).await.expect("start");
    let listed = list_all(&provider, &TagFilter::new()).await;
    assert_eq!(listed[0].state, InstanceState::Running);
    provider
        .terminate(&[id.to_string()])
        .await
        .expect("terminate");
    assert!(t.processes().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_home_is_a_clear_error_naming_the_path() {
    let t = TestHome::new();
    fs::create_dir_all(t.home()).expect("mkdir");
    fs::write(t.home().join("local"), "not a dir").expect("write");
    let err = LocalProvider::new(LocalConfig::new(t.home(), t.program("fake-agent")))
        .expect_err("a file where a dir should be");
    assert!(matches!(err, ProviderError::Internal(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&t.home().join("local").display().to_string()),
        "{err}"
    );

    // Broken after the provider was made: launch and list say where.
    fs::remove_file(t.home().join("local")).expect("rm");
    let provider = t.provider();
    fs::write(t.home().join("local"), "not a dir").expect("write");
    let err = provider
        .launch(&request(1, "x", &[]))
        .await
        .expect_err("broken home");
    assert!(err.to_string().contains("local"), "{err}");
    let err = provider
        .list_page(&TagFilter::new(), None)
        .await
        .expect_err("broken home");
    assert!(matches!(err, ProviderError::Internal(_)), "{err}");

    // An unreadable record: list names it; terminate still cleans it up.
    fs::remove_file(t.home().join("local")).expect("rm");
    let dir = provider.instance_dir("local-12345678").expect("valid id");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("instance.json"), "{ not json").expect("write");
    let err = provider
        .list_page(&TagFilter::new(), None)
        .await
        .expect_err("corrupt record");
    assert!(matches!(err, ProviderError::Internal(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&dir.join("instance.json").display().to_string()),
        "{err}"
    );
    provider
        .terminate(&["local-12345678".to_string()])
        .await
        .expect("terminate a broken record");
    assert!(!dir.exists());
    assert!(
        provider
            .list_page(&TagFilter::new(), None)
            .await
            .expect("list")
            .instances
            .is_empty()
    );

    assert!(provider.log_path("../../etc").is_none());

    // Bad requests change nothing.
    let mut bad = request(1, "y", &[]);
    bad.node_type = "huge".to_string();
    let err = provider.launch(&bad).await.expect_err("unknown node type");
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    let mut bad = request(1, "z", &[]);
    bad.image = Some("ami-123".to_string());
    let err = provider.launch(&bad).await.expect_err("unknown image");
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    assert!(
        provider
            .list_page(&TagFilter::new(), None)
            .await
            .expect("list")
            .instances
            .is_empty()
    );
    assert!(
        LocalProvider::new(LocalConfig {
            home: t.home(),
            agent_program: t.program("fake-agent"),
            page_size: 0
        })
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_client_tokens_are_safe_file_names() {
    let t = TestHome::new();
    let provider = t.provider();
    let a = provider
        .launch(&request(1, "../../evil/token", &[]))
        .await
        .expect("launch");
    let b = provider
        .launch(&request(1, "..%2F..%2Fevil%2Ftoken", &[]))
        .await
        .expect("launch");
    assert_ne!(a[0].id, b[0].id, "different tokens never share a mapping");
    let again = provider
        .launch(&request(1, "../../evil/token", &[]))
        .await
        .expect("launch");
    assert_eq!(again[0].id, a[0].id);
    assert!(!t.tmp.path().join("evil").exists());
    for entry in fs::read_dir(t.home().join("local/tokens")).expect("tokens") {
        let name = entry.expect("entry").file_name();
        assert!(!name.to_string_lossy().contains('/'));
    }
    provider
        .terminate(&[a[0].id.clone(), b[0].id.clone()])
        .await
        .expect("terminate");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_agents_launch_and_terminate_quickly() {
    let t = TestHome::new();
    let provider = t.provider();
    let started = Instant::now();
    let launched = provider
        .launch(&request(100, "big", &[("motorpool-project", "big")]))
        .await
        .expect("launch 100");
    let launch_time = started.elapsed();
    assert_eq!(launched.len(), 100);
    assert!(launched.iter().all(|i| i.state == InstanceState::Running));
    let ids: BTreeSet<&str> = launched.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), 100, "ids are unique");

    // Two concurrent launches with one token make one batch.
    let same = request(3, "same", &[]);
    let (x, y) = tokio::join!(provider.launch(&same), provider.launch(&same));
    let mut x: Vec<String> = x.expect("x").into_iter().map(|i| i.id).collect();
    let mut y: Vec<String> = y.expect("y").into_iter().map(|i| i.id).collect();
    x.sort();
    y.sort();
    assert_eq!(x, y);

    let all: Vec<String> = list_all(&provider, &TagFilter::new())
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(all.len(), 103);
    let started = Instant::now();
    provider.terminate(&all).await.expect("terminate");
    let terminate_time = started.elapsed();
    eprintln!("100 agents: launch {launch_time:?}, terminate 103 {terminate_time:?}");
    assert!(
        launch_time < Duration::from_secs(5),
        "launch took {launch_time:?}"
    );
    assert!(
        terminate_time < Duration::from_secs(5),
        "terminate took {terminate_time:?}"
    );
    assert!(list_all(&provider, &TagFilter::new()).await.is_empty());
    assert!(t.processes().is_empty(), "{:?}", t.processes());
}

#[test]
fn ids_and_token_names_are_checked() {
    assert!(valid_id("local-0a1b2c3d"));
    assert!(!valid_id("local-"));
    assert!(!valid_id("local-../x"));
    assert!(!valid_id("i-123"));
    assert!(!valid_id("local-ABC"));
    assert_eq!(token_file_name("plan-1.a_b").expect("ok"), "plan-1.a_b");
    assert_eq!(token_file_name(".x/y").expect("ok"), "%2Ex%2Fy");
    assert_eq!(token_file_name("%").expect("ok"), "%25");
    assert!(token_file_name(&"x".repeat(300)).is_err());
}

/// What a launcher killed between fork and its record write leaves: a
/// pending record with no pid, whose launcher is dead, and a live agent.
/// Before `agent.pid`, list called it terminated, terminate removed its
/// directory and the agent ran on.
fn as_if_the_launcher_was_killed_after_fork(provider: &LocalProvider, id: &str) {
    let path = provider
        .instance_dir(id)
        .expect("valid id")
        .join("instance.json");
    let mut record: Record =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("parse");
    record.state = InstanceState::Pending;
    record.pid = None;
    record.pgid = None;
    record.address = None;
    // A pid that is no process: the launcher is gone.
    record.launcher_pid = Some(u32::MAX / 2);
    fs::write(&path, serde_json::to_vec(&record).expect("encode")).expect("write");
}

#[tokio::test]
async fn an_agent_whose_launcher_died_before_recording_its_pid_is_still_found_and_stopped() {
    let t = TestHome::new();
    let provider = t.provider();
    let launched = provider
        .launch(&request(2, "tok", &[("k", "v")]))
        .await
        .expect("launch");
    let (orphan, adopted) = (&launched[0], &launched[1]);
    let orphan_pid = orphan.pid.expect("pid");
    let adopted_pid = adopted.pid.expect("pid");
    as_if_the_launcher_was_killed_after_fork(&provider, &orphan.id);
    as_if_the_launcher_was_killed_after_fork(&provider, &adopted.id);

    // Listed as what it is: a live agent, by the pid it wrote before exec.
    let listed = list_all(&provider, &TagFilter::new()).await;
    let seen = state_of(&listed, &orphan.id);
    assert_eq!(seen.state, InstanceState::Running, "{seen:?}");
    assert_eq!(seen.pid, Some(orphan_pid));

    // A replayed launch adopts the listening agent: same process, running.
    let replayed = provider
        .launch(&request(2, "tok", &[("k", "v")]))
        .await
        .expect("replay");
    let again = state_of(&replayed, &adopted.id);
    assert_eq!(again.state, InstanceState::Running);
    assert_eq!(again.pid, Some(adopted_pid));

    // Terminate stops the agent it never recorded, checked by pid.
    as_if_the_launcher_was_killed_after_fork(&provider, &orphan.id);
    provider
        .terminate(std::slice::from_ref(&orphan.id))
        .await
        .expect("terminate");
    let deadline = Instant::now() + Duration::from_secs(5);
    while process::exists(orphan_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !process::exists(orphan_pid),
        "agent {orphan_pid} left running"
    );
    provider
        .terminate(std::slice::from_ref(&adopted.id))
        .await
        .expect("terminate");
}
