//! The spec loader against the fixtures in testdata/specs, the generated
//! editor schema, speed, and no panics on any input.
//!
//! Every spec under `testdata/specs/invalid/` (a `*.yaml` file, or a
//! directory holding `motorpool.yaml`) lists the problems it must produce in
//! comment lines at its top:
//!
//! ```text
//! # expect: 7:5: unknown field `min_idel`          (line:col: message substring)
//! # expect: jobs/b.yaml:2:3: is defined twice      (in another file, relative to the spec)
//! # expect: <command line>: unknown target         (a command-line problem)
//! # target: prod                                   (load with --target prod)
//! # var: workers=3                                 (load with --var workers=3)
//! ```
//!
//! The loader must report exactly these problems: no more, no fewer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use motorpool::spec::{self, Diagnostic, LoadOptions, editor_schema};
use proptest::prelude::*;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/specs")
}

/// The specs in a fixture directory: `*.yaml` files and directories with a
/// `motorpool.yaml`.
fn specs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            (p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
                || p.join(spec::SPEC_FILE_NAME).is_file()
        })
        .collect();
    out.sort();
    out
}

#[derive(Debug)]
struct Expect {
    /// Relative to the spec's directory; None: the root file.
    file: Option<String>,
    /// None for command-line problems.
    pos: Option<(usize, usize)>,
    message: String,
}

struct Fixture {
    expects: Vec<Expect>,
    opts: LoadOptions,
}

fn parse_position(s: &str) -> Option<(usize, usize, &str)> {
    let mut it = s.splitn(3, ':');
    let line = it.next()?.trim().parse().ok()?;
    let col = it.next()?.trim().parse().ok()?;
    let rest = it.next()?.trim_start();
    Some((line, col, rest))
}

fn read_fixture(root: &Path) -> Fixture {
    let text = std::fs::read_to_string(root).unwrap();
    let mut fx = Fixture {
        expects: Vec::new(),
        opts: LoadOptions::default(),
    };
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        let line = line.trim_start_matches('#').trim();
        if let Some(rest) = line.strip_prefix("expect:") {
            let rest = rest.trim();
            let e = if let Some(msg) = rest.strip_prefix("<command line>:") {
                Expect {
                    file: None,
                    pos: None,
                    message: msg.trim().to_string(),
                }
            } else if let Some((l, c, msg)) = parse_position(rest) {
                Expect {
                    file: None,
                    pos: Some((l, c)),
                    message: msg.to_string(),
                }
            } else {
                let (file, rest) = rest
                    .split_once(':')
                    .unwrap_or_else(|| panic!("{}: bad expect line: {line}", root.display()));
                let (l, c, msg) = parse_position(rest)
                    .unwrap_or_else(|| panic!("{}: bad expect line: {line}", root.display()));
                Expect {
                    file: Some(file.to_string()),
                    pos: Some((l, c)),
                    message: msg.to_string(),
                }
            };
            fx.expects.push(e);
        } else if let Some(t) = line.strip_prefix("target:") {
            fx.opts.target = Some(t.trim().to_string());
        } else if let Some(v) = line.strip_prefix("var:") {
            let (k, v) = v.trim().split_once('=').expect("var: k=v");
            fx.opts.vars.push((k.to_string(), v.to_string()));
        }
    }
    fx
}

fn matches(e: &Expect, d: &Diagnostic, root_file: &Path) -> bool {
    if !d.message.contains(&e.message) {
        return false;
    }
    match e.pos {
        None => d.is_command_line(),
        Some((line, col)) => {
            let file = match &e.file {
                None => root_file.to_path_buf(),
                Some(f) => root_file.parent().unwrap().join(f),
            };
            d.file == file && d.line == line && d.col == col
        }
    }
}

/// Checks one invalid spec; returns a description of what went wrong.
fn check_invalid(spec: &Path) -> Result<usize, String> {
    let root_file = if spec.is_dir() {
        spec.join(spec::SPEC_FILE_NAME)
    } else {
        spec.to_path_buf()
    };
    let fx = read_fixture(&root_file);
    if fx.expects.is_empty() {
        return Err(format!("{}: no `# expect:` lines", root_file.display()));
    }
    let diags = match spec::load(spec, &fx.opts) {
        Ok(_) => return Err(format!("{}: loaded without errors", spec.display())),
        Err(d) => d,
    };
    let mut unmatched: Vec<&Diagnostic> = diags.iter().collect();
    let mut missing = Vec::new();
    for e in &fx.expects {
        match unmatched.iter().position(|d| matches(e, d, &root_file)) {
            Some(i) => {
                unmatched.remove(i);
            }
            None => missing.push(e),
        }
    }
    if missing.is_empty() && unmatched.is_empty() {
        return Ok(diags.len());
    }
    let mut msg = format!("{}:\n", spec.display());
    for e in missing {
        msg.push_str(&format!("  expected, not reported: {e:?}\n"));
    }
    for d in unmatched {
        msg.push_str(&format!("  reported, not expected: {d}\n"));
    }
    msg.push_str(&format!("  all reported:\n{diags}\n"));
    Err(msg)
}

#[test]
fn every_invalid_spec_reports_exactly_its_expected_problems() {
    let specs = specs_in(&testdata().join("invalid"));
    assert!(specs.len() >= 18, "fixtures missing: {specs:?}");
    let failures: Vec<String> = specs
        .iter()
        .filter_map(|s| check_invalid(s).err())
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn several_errors_in_different_resources_are_reported_in_one_pass() {
    let n = check_invalid(&testdata().join("invalid/many_errors.yaml")).unwrap();
    assert!(n >= 6, "only {n} problems reported");
}

#[test]
fn every_valid_spec_loads() {
    let specs = specs_in(&testdata().join("valid"));
    assert!(specs.len() >= 3);
    for s in specs {
        let loaded = spec::load(&s, &LoadOptions::default())
            .unwrap_or_else(|d| panic!("{} does not load:\n{d}", s.display()));
        assert!(!loaded.spec.project.is_empty());
    }
}

#[test]
fn the_project_spec_merges_includes_and_applies_targets() {
    let dir = testdata().join("valid/project");
    let l = spec::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(l.root_file, dir.join("motorpool.yaml"));
    assert_eq!(l.base_dir, dir);
    let s = &l.spec;
    assert_eq!(s.provider.kind(), "local");
    assert!(s.pools.contains_key("general"));
    assert_eq!(
        s.jobs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["nightly", "wordcount"]
    );
    let etl = &s.clusters["etl"];
    assert_eq!(etl.workers, Some(2));
    assert_eq!(etl.autotermination_minutes, Some(30));
    assert_eq!(etl.env["LOG_LEVEL"], "info".into());
    assert_eq!(etl.env["BANNER"], "etl-2 ${HOME}".into());
    let tokens = &s.jobs["nightly"].tasks["tokens"];
    assert_eq!(tokens.map.as_ref().unwrap().partitions, Some(16));

    let prod = LoadOptions {
        target: Some("prod".into()),
        vars: vec![("log_level".into(), "debug".into())],
    };
    let l = spec::load(&dir, &prod).unwrap();
    let etl = &l.spec.clusters["etl"];
    assert_eq!(etl.workers, Some(8));
    assert_eq!(etl.env["LOG_LEVEL"], "debug".into());
    // The sim provider's own settings, as its crate reads them.
    assert_eq!(l.spec.provider.kind(), "sim");
    let sim: motorpool_sim::SimSettings =
        serde_json::from_value(l.spec.provider.settings_value()).expect("sim settings");
    assert_eq!(sim.latency_ms, Some(20));
    assert_eq!(sim.throttle_rate, Some(0.01));

    let ci = LoadOptions {
        target: Some("ci".into()),
        vars: vec![],
    };
    let l = spec::load(&dir, &ci).unwrap();
    assert_eq!(l.spec.provider.kind(), "local");
    let local: motorpool_local::LocalSettings =
        serde_json::from_value(l.spec.provider.settings_value()).expect("local settings");
    assert_eq!(
        local,
        motorpool_local::LocalSettings {
            page_size: Some(50)
        }
    );
    assert_eq!(l.spec.clusters["etl"].workers, Some(1));
}

#[test]
fn command_line_problems_are_reported_as_such() {
    let dir = testdata().join("valid/project");
    let opts = LoadOptions {
        target: Some("staging".into()),
        vars: vec![("wrkers".into(), "3".into())],
    };
    let e = spec::load(&dir, &opts).unwrap_err();
    let shown = e.to_string();
    assert_eq!(
        shown,
        "<command line>: error: unknown target `staging` (--target) (known targets: prod, ci)\n\
         <command line>: error: unknown variable `wrkers` (--var wrkers=...), did you mean `workers`? \
         (declared variables: workers, log_level, autoterminate, nightly_partitions)"
    );
    // A value of the wrong type is reported where the variable is used.
    let opts = LoadOptions {
        target: None,
        vars: vec![("workers".into(), "many".into())],
    };
    let e = spec::load(&dir, &opts).unwrap_err();
    assert_eq!(e.len(), 1, "{e}");
    let d = &e.0[0];
    assert_eq!((d.line, d.col), (27, 14));
    assert_eq!(
        d.message,
        "expected an integer, found a string (from `${var.workers}`) for `workers` in cluster `etl`"
    );
}

#[test]
fn the_editor_schema_file_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/motorpool.schema.json");
    let mut want = serde_json::to_string_pretty(&editor_schema()).unwrap();
    want.push('\n');
    if std::env::var_os("MOTORPOOL_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    // The same schema, whatever the key order serde_json was built with.
    let same = have == want
        || serde_json::from_str::<serde_json::Value>(&have).ok() == Some(editor_schema());
    assert!(
        same,
        "specs/motorpool.schema.json is out of date; run `MOTORPOOL_UPDATE_SCHEMA=1 cargo test --test spec_validate`"
    );
}

/// A spec with `n` pools, clusters and jobs.
fn big_spec(n: usize) -> String {
    let mut s = String::from("project: big\nprovider: { kind: sim }\npools:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  pool-{i}:\n    node_type: medium\n    min_idle: 1\n    max_capacity: 20\n"
        ));
    }
    s.push_str("policies:\n  cap: { max_workers: 50, node_types: [small, medium] }\nclusters:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  cluster-{i}:\n    pool: pool-{i}\n    workers: 9\n    policy: cap\n    env: {{ A: \"1\", B: \"2\" }}\n    tags: {{ team: t{i} }}\n"
        ));
    }
    s.push_str("jobs:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  job-{i}:\n    cluster: cluster-{i}\n    tasks:\n      a: {{ command: \"echo a\" }}\n      b: {{ command: \"echo b\", depends_on: [a] }}\n"
        ));
    }
    s
}

#[test]
fn a_thousand_clusters_load_quickly() {
    let text = big_spec(1000);
    let start = Instant::now();
    let l = spec::load_str("big.yaml", &text, &LoadOptions::default()).unwrap();
    let took = start.elapsed();
    assert_eq!(l.spec.clusters.len(), 1000);
    eprintln!("1000 pools + clusters + jobs loaded in {took:?}");
    // Generous for debug builds on a busy machine; the release figure is far lower.
    assert!(took.as_secs_f64() < 5.0, "took {took:?}");

    // Growing tenfold keeps it linear (well under 100x).
    let text = big_spec(100);
    let start = Instant::now();
    spec::load_str("big.yaml", &text, &LoadOptions::default()).unwrap();
    let small = start.elapsed();
    eprintln!("100 loaded in {small:?}");
    assert!(took < small * 40 + std::time::Duration::from_millis(200));
}

const VALID: &str = include_str!("../testdata/specs/valid/sim.yaml");

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Replace(usize, char),
    Insert(usize, char),
}

fn mutate(text: &str, muts: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in muts {
        if lines.is_empty() {
            break;
        }
        match m {
            Mutation::Delete(i) => {
                lines.remove(i % lines.len());
            }
            Mutation::Duplicate(i) => {
                let i = i % lines.len();
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            Mutation::Replace(i, c) | Mutation::Insert(i, c) => {
                // Work on the whole text so that newlines can change too.
                let mut chars: Vec<char> = lines.join("\n").chars().collect();
                if chars.is_empty() {
                    continue;
                }
                let at = i % chars.len();
                if matches!(m, Mutation::Replace(..)) {
                    chars[at] = *c;
                } else {
                    chars.insert(at, *c);
                }
                let s: String = chars.into_iter().collect();
                lines = s.lines().map(str::to_string).collect();
            }
        }
    }
    lines.join("\n")
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop::sample::select(vec![
        ':', '-', ' ', '\n', '{', '}', '[', ']', '&', '*', '!', '"', '\'', '#', '$', '|', '>', '0',
        'x', '\t', '%', '@', '?', ',',
    ]);
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), interesting.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<usize>(), interesting).prop_map(|(i, c)| Mutation::Insert(i, c)),
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Mutation::Replace(i, c)),
    ]
}

fn opts_strategy() -> impl Strategy<Value = LoadOptions> {
    (
        prop::option::of("[a-z]{0,4}"),
        prop::collection::vec(("[a-z_]{0,6}", ".{0,6}"), 0..3),
    )
        .prop_map(|(target, vars)| LoadOptions { target, vars })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}", opts in opts_strategy()) {
        let _ = spec::load_str("prop.yaml", &text, &opts);
    }

    #[test]
    fn yaml_like_text_never_panics(text in "[a-z_:{}\\[\\],\\-&*!|>\"' \n$.0-9~#<]{0,300}") {
        let _ = spec::load_str("prop.yaml", &text, &LoadOptions::default());
    }

    #[test]
    fn mutated_specs_never_panic(muts in prop::collection::vec(mutation(), 1..6), opts in opts_strategy()) {
        let text = mutate(VALID, &muts);
        match spec::load_str("prop.yaml", &text, &opts) {
            Ok(l) => prop_assert!(spec::is_valid_name(&l.spec.project)),
            Err(d) => {
                prop_assert!(!d.is_empty());
                // Every problem has a position, or is about the command line.
                for x in d.iter() {
                    prop_assert!(x.line > 0 || x.is_command_line(), "{x}");
                }
            }
        }
    }
}

// ---- hardening: what a spec can reach, and what a spec file can hold ----

/// A project directory holding `files` (path, content), loaded: every
/// problem as `file-name:line:col: message`, or "valid".
fn load_project(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, content) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(&full, content).expect("write");
    }
    let shown = match spec::load(dir.path(), &LoadOptions::default()) {
        Ok(_) => vec!["valid".to_string()],
        Err(diags) => diags
            .iter()
            .map(|d| {
                let name = d.file.file_name().map(|n| n.to_string_lossy().into_owned());
                format!(
                    "{}:{}:{}: {}",
                    name.unwrap_or_default(),
                    d.line,
                    d.col,
                    d.message
                )
            })
            .collect(),
    };
    (dir, shown)
}

fn has(problems: &[String], at: &str, words: &str) -> bool {
    problems
        .iter()
        .any(|p| p.starts_with(at) && p.contains(words))
}

#[test]
fn mount_paths_that_leave_the_project_or_the_node_directory_are_refused_at_their_position() {
    let spec = b"project: p\nclusters:\n  etl:\n    node_type: small\n    mounts:\n      - { source: ./data, target: \"/../../../../tmp/x\" }\n      - { source: ../../etc, target: /mnt/etc }\n      - { source: ./data, target: /mnt/./ok/../data }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    assert!(
        has(
            &problems,
            "motorpool.yaml:6:35:",
            "leads out of the node's directory"
        ),
        "{problems:#?}"
    );
    assert!(
        has(
            &problems,
            "motorpool.yaml:7:19:",
            "leads out of the project"
        ),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[test]
fn init_scripts_requirements_and_includes_outside_the_project_are_refused_at_their_position() {
    let spec = b"project: p\ninclude: [ \"../*.yaml\", /proc/self/environ ]\nclusters:\n  etl:\n    node_type: small\n    init_scripts: [ ok.sh, ../outside.sh, /etc/passwd, \"a/../../b.sh\" ]\n    libraries: [ { requirements: ../reqs.txt } ]\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec), ("ok.sh", b"true\n")]);
    for (at, words) in [
        ("motorpool.yaml:2:12:", "leads out of the project"),
        ("motorpool.yaml:2:25:", "is absolute"),
        ("motorpool.yaml:6:28:", "leads out of the project"),
        ("motorpool.yaml:6:43:", "is absolute"),
        ("motorpool.yaml:6:56:", "leads out of the project"),
        ("motorpool.yaml:7:34:", "leads out of the project"),
    ] {
        assert!(has(&problems, at, words), "{at} {words}: {problems:#?}");
    }
    assert_eq!(problems.len(), 6, "{problems:#?}");
}

#[test]
fn a_missing_init_script_is_refused_at_its_position() {
    let spec = b"project: p\nclusters:\n  etl: { node_type: small, init_scripts: [ setup.sh ] }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    assert!(
        has(
            &problems,
            "motorpool.yaml:3:44:",
            "`setup.sh` is not a file"
        ),
        "{problems:#?}"
    );
}

#[test]
fn an_init_script_name_with_a_control_character_is_refused() {
    let spec = b"project: p\nclusters:\n  etl: { node_type: small, init_scripts: [ \"x.sh\\ntouch PWNED #\" ] }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    assert!(
        has(&problems, "motorpool.yaml:3:44:", "control character"),
        "{problems:#?}"
    );
}

#[test]
fn a_nul_byte_anywhere_in_a_spec_file_is_an_error_at_its_position() {
    // In a comment of the root file: not "valid with nothing in it".
    let spec = b"project: p\n# a comment \0 here\nclusters:\n  etl: { node_type: small }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        has(
            &problems,
            "motorpool.yaml:2:13:",
            "non-printable character '\\0'"
        ),
        "{problems:#?}"
    );
    // In an included file too.
    let spec = b"project: p\ninclude: [ more.yaml ]\n";
    let more = b"clusters:\n  etl: { node_type: small }\n\0";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec), ("more.yaml", more)]);
    assert!(
        has(&problems, "more.yaml:3:1:", "non-printable"),
        "{problems:#?}"
    );
}

#[test]
fn a_utf8_bom_at_the_start_of_a_spec_is_skipped() {
    let spec = "\u{feff}project: p\nclusters:\n  etl: { node_type: small }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec.as_bytes())]);
    assert_eq!(problems, ["valid"]);
}

#[test]
fn env_names_and_values_no_process_can_carry_are_refused_at_their_position() {
    let spec = b"project: p\nclusters:\n  etl:\n    node_type: small\n    env: { \"A=B\": x, \"has space\": x, 1ST: x, OK_1: \"nul \\0 here\", _fine: \"multi\\nline\" }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    for (at, words) in [
        (
            "motorpool.yaml:5:12:",
            "invalid environment variable name \"A=B\"",
        ),
        (
            "motorpool.yaml:5:22:",
            "invalid environment variable name \"has space\"",
        ),
        (
            "motorpool.yaml:5:38:",
            "invalid environment variable name \"1ST\"",
        ),
        ("motorpool.yaml:5:52:", "holds a NUL byte"),
    ] {
        assert!(has(&problems, at, words), "{at} {words}: {problems:#?}");
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

#[test]
fn tags_cannot_set_motorpool_own_keys() {
    let spec = b"project: p\nclusters:\n  etl: { node_type: small, tags: { team: data, motorpool-project: other, Motorpool-Role: x } }\n";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    assert!(
        has(&problems, "motorpool.yaml:3:48:", "motorpool's own"),
        "{problems:#?}"
    );
    assert!(
        has(&problems, "motorpool.yaml:3:74:", "motorpool's own"),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

/// The spec below, with its line:col positions spelled out.
const SYMLINKED: &str = "project: p
include: [ \"inc/*.yaml\" ]
clusters:
  etl:
    node_type: small
    init_scripts: [ scripts/leak.sh ]
    libraries: [ { requirements: reqs.txt } ]
    mounts: [ { source: ./data, target: /mnt/data } ]
jobs:
  wc:
    cluster: etl
    tasks:
      count:
        map: { input: \"in/*.txt\", command: cat }
        output: out/wc
";

#[test]
fn paths_a_symlink_takes_out_of_the_project_are_refused_at_their_position() {
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("x.sh"), "true\n").expect("write");
    std::fs::write(outside.path().join("environ.yaml"), "pools: {}\n").expect("write");
    std::fs::create_dir(outside.path().join("dir")).expect("mkdir");
    let (dir, problems) = load_project(&[
        ("motorpool.yaml", SYMLINKED.as_bytes()),
        ("in/ok.txt", b"fine\n"),
        (
            "inc/ok.yaml",
            b"pools:\n  gp: { node_type: small, max_capacity: 2 }\n",
        ),
        ("scripts/leak.sh", b"true\n"),
        ("reqs.txt", b"requests\n"),
        ("data/a", b"a\n"),
    ]);
    assert_eq!(problems, vec!["valid"], "with files in place it is valid");
    // The same paths, now symlinks that lead out of the project.
    for path in ["scripts/leak.sh", "reqs.txt"] {
        std::fs::remove_file(dir.path().join(path)).expect("rm");
    }
    std::fs::remove_dir_all(dir.path().join("data")).expect("rm");
    let link = |from: &Path, to: &str| {
        let to = dir.path().join(to);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(from, to).expect("symlink");
    };
    link(&outside.path().join("x.sh"), "scripts/leak.sh");
    link(&outside.path().join("environ.yaml"), "inc/leak.yaml");
    link(&outside.path().join("x.sh"), "reqs.txt");
    link(&outside.path().join("dir"), "data");
    link(&outside.path().join("x.sh"), "in/leak.txt");
    link(&outside.path().join("dir"), "out");
    let shown = match spec::load(dir.path(), &LoadOptions::default()) {
        Ok(_) => vec!["valid".to_string()],
        Err(diags) => diags
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
            .collect(),
    };
    for (at, what) in [
        ("2:12:", "inc/leak.yaml"),
        ("6:21:", "scripts/leak.sh"),
        ("7:34:", "reqs.txt"),
        ("8:25:", "data"),
        ("14:23:", "in/leak.txt"),
        ("15:17:", "out"),
    ] {
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with(at) && p.contains(what) && p.contains("symlink")),
            "{at} {what}: {shown:#?}"
        );
    }
    assert_eq!(shown.len(), 6, "{shown:#?}");
}

#[test]
fn job_inputs_and_outputs_outside_the_project_are_refused_at_their_position() {
    let spec = b"project: p
clusters:
  etl: { node_type: small }
jobs:
  wc:
    cluster: etl
    tasks:
      a:
        map: { input: \"../secrets/*.txt\", command: cat }
        output: /tmp/out
      b:
        map: { input: \"in/../../x\", command: cat }
        output: \"out/../..\"
      c:
        map: { input: \"s3://bucket/in/*.txt\", command: cat }
        output: \"./data/../out/c\"
";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    for (at, words) in [
        ("motorpool.yaml:9:23:", "leads out of the project"),
        ("motorpool.yaml:10:17:", "is absolute"),
        ("motorpool.yaml:12:23:", "leads out of the project"),
        ("motorpool.yaml:13:17:", "leads out of the project"),
    ] {
        assert!(has(&problems, at, words), "{at} {words}: {problems:#?}");
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

#[test]
fn secret_env_values_need_a_source_that_is_there_at_their_position() {
    let spec = b"project: p
clusters:
  etl:
    node_type: small
    env:
      A: { secret: true, from_env: MOTORPOOL_TEST_NEVER_SET_VARIABLE }
      B: { from_file: ./secrets/missing }
      C: { from_file: ../outside }
      D: { from_env: X, value: y }
      E: { secret: false, from_env: HOME }
      F: { from_file: ./secrets/db }
      G: { secret: true, value: inline }
";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec), ("secrets/db", b"pw\n")]);
    for (at, words) in [
        (
            "motorpool.yaml:6:36:",
            "environment variable `MOTORPOOL_TEST_NEVER_SET_VARIABLE`, which is not set",
        ),
        ("motorpool.yaml:7:23:", "is not a file"),
        ("motorpool.yaml:8:23:", "leads out of the project"),
        ("motorpool.yaml:9:", "choose one of"),
        ("motorpool.yaml:10:20:", "always secret"),
    ] {
        assert!(has(&problems, at, words), "{at} {words}: {problems:#?}");
    }
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert!(!problems.iter().any(|p| p.contains("pw")), "{problems:#?}");
}

#[test]
fn a_jobs_own_env_is_checked_like_a_clusters_secrets_included() {
    let spec = b"project: p
clusters:
  etl: { node_type: small, workers: 1 }
jobs:
  report:
    cluster: etl
    env:
      API_TOKEN: { secret: true, from_env: MOTORPOOL_TEST_NEVER_SET_VARIABLE }
      KEY_FILE: { from_file: ../outside }
      \"BAD NAME\": x
      PLAIN: text
    tasks: { t: { command: \"true\" } }
";
    let (_dir, problems) = load_project(&[("motorpool.yaml", spec)]);
    for (at, words) in [
        (
            "motorpool.yaml:8:",
            "environment variable `MOTORPOOL_TEST_NEVER_SET_VARIABLE`, which is not set",
        ),
        ("motorpool.yaml:9:", "leads out of the project"),
        (
            "motorpool.yaml:10:7:",
            "invalid environment variable name \"BAD NAME\" in job `report`",
        ),
    ] {
        assert!(has(&problems, at, words), "{at} {words}: {problems:#?}");
    }
    assert_eq!(problems.len(), 3, "{problems:#?}");
}
