//! The spec: YAML files in, a validated [`Spec`] out, or every problem found
//! reported as `file:line:col: error: message`.
//!
//! [`load`] runs, in order (each step collects all its problems, and later
//! steps still run on what is sound, so one pass reports everything):
//!
//! 1. parse YAML into a spanned tree ([`yaml`]): syntax errors, duplicate keys;
//! 2. `include:` globs, relative to the root file: their `pools`, `clusters`,
//!    `jobs`, `policies` and `variables` merge by name; a name defined twice
//!    is an error at the second definition;
//! 3. `--target T`: its variables override the defaults, its `provider` map
//!    is merged over the provider block key by key;
//! 4. variables: `${var.NAME}` substituted in every value ([`vars`]);
//! 5. shape: the tree checked against the JSON Schema generated from the
//!    model ([`schema`]): unknown fields, types, required fields, enums,
//!    integer ranges, the provider's `kind`;
//! 6. each resource that passed 5 is deserialized into its model type;
//! 7. checks across resources ([`check`]): references, node types, cycles,
//!    policies, impossible numbers, names.
//!
//! Plain scalars where a string is expected are taken as their text
//! (`runtime: 1` is the string "1"); other type mismatches are errors.
//! YAML anchors, aliases and `<<` merge keys work; top-level keys starting
//! with `x-` are ignored, so they can hold anchored defaults.

mod check;
mod diag;
pub mod model;
pub mod schema;
mod vars;
mod yaml;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

pub use check::{MAX_COUNT, is_valid_name};
pub use diag::{COMMAND_LINE, Diagnostic, Diagnostics};
pub use model::*;
pub use schema::editor_schema;

use check::{Parts, Res, Section};
use diag::{FileId, Sink, Span};
use schema::{Seg, Validator, spec_schema};
use yaml::{Entry, Kind, Node};

/// The file a directory given as PATH must hold.
pub const SPEC_FILE_NAME: &str = "motorpool.yaml";

/// Top-level keys starting with this are ignored: a place for YAML anchors
/// (`x-defaults: &defaults {...}`, then `<<: *defaults`).
pub const EXTENSION_PREFIX: &str = "x-";

/// Sections that included files may hold; they merge by name.
pub const MERGED_SECTIONS: [&str; 5] = ["pools", "clusters", "jobs", "policies", "variables"];

/// Command-line inputs to loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--target T`: selects `targets.T`.
    pub target: Option<String>,
    /// `--var k=v`: values are parsed as YAML scalars ("8" is 8, "true" is a
    /// boolean, anything else a string; an empty value is the empty string).
    pub vars: Vec<(String, String)>,
}

/// A spec that loaded without problems.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedSpec {
    pub spec: Spec,
    /// The root spec file.
    pub root_file: PathBuf,
    /// The directory of the root file; relative paths in the spec resolve here.
    pub base_dir: PathBuf,
}

impl LoadedSpec {
    /// `path` resolved against the spec's directory (absolute paths are kept).
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.base_dir.join(path)
    }
}

/// Loads and validates a spec: `path` is a spec file, or a directory holding
/// `motorpool.yaml`. On failure, every problem found.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedSpec, Diagnostics> {
    let root_file = if path.is_dir() {
        path.join(SPEC_FILE_NAME)
    } else {
        path.to_path_buf()
    };
    // `./motorpool.yaml` reads better as `motorpool.yaml` in messages.
    let root_file = match root_file.strip_prefix(".") {
        Ok(rest) if !rest.as_os_str().is_empty() => rest.to_path_buf(),
        _ => root_file,
    };
    let text = match std::fs::read_to_string(&root_file) {
        Ok(t) => t,
        Err(e) => {
            let msg = if path.is_dir() && e.kind() == std::io::ErrorKind::NotFound {
                format!("no {SPEC_FILE_NAME} in directory {}", path.display())
            } else {
                format!("cannot read the spec: {e}")
            };
            return Err(Diagnostics(vec![Diagnostic::file(&root_file, msg)]));
        }
    };
    load_text(root_file, &text, opts)
}

/// Loads a spec from text; `name` is its file name in messages, and includes
/// are resolved relative to its directory.
pub fn load_str(name: &str, text: &str, opts: &LoadOptions) -> Result<LoadedSpec, Diagnostics> {
    load_text(PathBuf::from(name), text, opts)
}

fn base_dir_of(root_file: &Path) -> PathBuf {
    match root_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn load_text(
    root_file: PathBuf,
    text: &str,
    opts: &LoadOptions,
) -> Result<LoadedSpec, Diagnostics> {
    let mut sink = Sink::default();
    let file = sink.add_file(root_file.clone());
    let spec = run(&root_file, file, text, opts, &mut sink);
    match spec {
        Some(spec) if sink.count() == 0 => Ok(LoadedSpec {
            spec,
            base_dir: base_dir_of(&root_file),
            root_file,
        }),
        _ => {
            if sink.count() == 0 {
                sink.error(Span::new(file, 1, 1), "the spec could not be loaded");
            }
            Err(sink.into_diagnostics())
        }
    }
}

fn run(
    root_file: &Path,
    file: FileId,
    text: &str,
    opts: &LoadOptions,
    sink: &mut Sink,
) -> Option<Spec> {
    let mut root = yaml::parse(text, file, sink)?;
    match &root.kind {
        Kind::Map(_) => {}
        Kind::Null => {
            sink.error(
                Span::new(file, 1, 1),
                "the spec is empty; it needs at least `project: NAME`",
            );
            return None;
        }
        _ => {
            sink.error(
                root.span,
                format!(
                    "expected a mapping (`project: ...`, `pools: ...`) at the top of the spec, found {}",
                    root.describe()
                ),
            );
            return None;
        }
    }

    // `x-...` top-level keys hold YAML anchors for reuse; they are not spec.
    // An empty section (`pools:` with everything commented out) is no section.
    if let Some(entries) = root.entries_mut() {
        entries.retain(|e| {
            let extension = e.key.starts_with(EXTENSION_PREFIX);
            let empty = e.key != "project" && matches!(e.value.kind, Kind::Null);
            !extension && !empty
        });
    }

    include(&mut root, root_file, sink);
    let target_vars = vars::select_target(&mut root, opts, sink);
    vars::apply_variables(&mut root, &target_vars, opts, sink);

    // Shape.
    let issues = Validator::new(spec_schema()).validate(&mut root);
    let mut broken_top: HashSet<String> = HashSet::new();
    let mut broken: HashSet<(String, String)> = HashSet::new();
    for issue in issues {
        match issue.path.as_slice() {
            [Seg::Key(section), Seg::Key(name), ..]
                if MERGED_SECTIONS.contains(&section.as_str()) || section == "targets" =>
            {
                broken.insert((section.clone(), name.clone()));
            }
            [Seg::Key(top), ..] => {
                broken_top.insert(top.clone());
            }
            _ => {}
        }
        if !issue.silent {
            sink.error(issue.span, issue.message);
        }
    }

    // Each sound resource into its model type.
    let json = to_json(&root);
    let parts = Parts {
        project: match (root.get("project"), broken_top.contains("project")) {
            (Some(n), false) => n.as_str().map(|s| (s, n.span)),
            _ => None,
        },
        provider_kind: match root.get("provider") {
            None => Some(DEFAULT_PROVIDER),
            Some(p) => p
                .get("kind")
                .and_then(Node::as_str)
                .filter(|k| crate::registry::Registry::global().provider(k).is_some()),
        },
        provider_node: root.get("provider"),
        base_dir: &base_dir_of(root_file),
        pools: section(&root, &json, "pools", &broken, &broken_top, sink),
        policies: section(&root, &json, "policies", &broken, &broken_top, sink),
        clusters: section(&root, &json, "clusters", &broken, &broken_top, sink),
        jobs: section(&root, &json, "jobs", &broken, &broken_top, sink),
    };
    check::check(&parts, sink);

    if sink.count() > 0 {
        return None;
    }
    match Spec::deserialize(&json) {
        Ok(spec) => Some(spec),
        Err(e) => {
            sink.error(
                Span::new(file, 1, 1),
                format!("internal error reading the spec: {e}"),
            );
            None
        }
    }
}

fn section<'a, T: Deserialize<'a>>(
    root: &'a Node,
    json: &'a Value,
    name: &str,
    broken: &HashSet<(String, String)>,
    broken_top: &HashSet<String>,
    sink: &mut Sink,
) -> Section<'a, T> {
    let mut items = Vec::new();
    let mut bad: HashSet<&'a str> = HashSet::new();
    let entries = root.get(name).and_then(Node::entries).unwrap_or_default();
    let values = json.get(name);
    for e in entries {
        if broken.contains(&(name.to_string(), e.key.clone())) {
            bad.insert(e.key.as_str());
            continue;
        }
        let Some(v) = values.and_then(|v| v.get(&e.key)) else {
            bad.insert(e.key.as_str());
            continue;
        };
        match T::deserialize(v) {
            Ok(value) => items.push(Res { entry: e, value }),
            Err(err) => {
                sink.error(
                    e.key_span,
                    format!("internal error reading `{}`: {err}", e.key),
                );
                bad.insert(e.key.as_str());
            }
        }
    }
    Section::new(items, bad, broken_top.contains(name))
}

/// The tree as JSON (after the shape check, so every value fits its type).
pub(crate) fn to_json(node: &Node) -> Value {
    match &node.kind {
        Kind::Null | Kind::Invalid => Value::Null,
        Kind::Bool(b, _) => Value::Bool(*b),
        Kind::Int(i, _) => {
            if let Ok(v) = i64::try_from(*i) {
                Value::from(v)
            } else if let Ok(v) = u64::try_from(*i) {
                Value::from(v)
            } else {
                serde_json::Number::from_f64(*i as f64).map_or(Value::Null, Value::Number)
            }
        }
        Kind::Float(f, _) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Kind::Str(s) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        Kind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|e| (e.key.clone(), to_json(&e.value)))
                .collect(),
        ),
    }
}

fn noun(section: &str) -> &'static str {
    match section {
        "pools" => "pool",
        "clusters" => "cluster",
        "jobs" => "job",
        "policies" => "policy",
        "variables" => "variable",
        _ => "entry",
    }
}

/// Reads the `include:` globs and merges what they hold into `root`.
fn include(root: &mut Node, root_file: &Path, sink: &mut Sink) {
    let patterns: Vec<(String, Span)> = match root.get("include").map(|n| &n.kind) {
        Some(Kind::Seq(items)) => items
            .iter()
            .filter_map(|n| n.as_str().map(|s| (s.to_string(), n.span)))
            .collect(),
        // A single string: the schema check reports that it must be a list.
        _ => return,
    };
    if patterns.is_empty() {
        return;
    }
    let base = root_file.parent().unwrap_or(Path::new(""));
    let mut seen: HashSet<PathBuf> = HashSet::new();
    seen.insert(std::fs::canonicalize(root_file).unwrap_or_else(|_| root_file.to_path_buf()));
    for (pattern, span) in patterns {
        // Only files of the project: never an absolute path, never `..` out of it.
        if let Err(problem) = crate::confine::project_path(&pattern) {
            sink.error(span, format!("include `{pattern}`: {problem}"));
            continue;
        }
        let full = if base.as_os_str().is_empty() {
            pattern.clone()
        } else {
            format!(
                "{}/{}",
                glob::Pattern::escape(&base.to_string_lossy()),
                pattern
            )
        };
        let paths = match glob::glob(&full) {
            Ok(paths) => paths,
            Err(e) => {
                sink.error(
                    span,
                    format!("invalid include pattern `{pattern}`: {}", e.msg),
                );
                continue;
            }
        };
        let mut matched = 0usize;
        for p in paths {
            let path = match p {
                Ok(path) => path,
                Err(e) => {
                    sink.error(
                        span,
                        format!("cannot read {}: {}", e.path().display(), e.error()),
                    );
                    continue;
                }
            };
            if !path.is_file() {
                continue;
            }
            matched += 1;
            // Inside the project through symlinks too; its content is never
            // read, nor shown, when it is not.
            let project = if base.as_os_str().is_empty() {
                Path::new(".")
            } else {
                base
            };
            if let Err(problem) = crate::confine::resolves_inside(project, &path) {
                sink.error(span, format!("include `{pattern}`: {problem}"));
                continue;
            }
            let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if !seen.insert(canonical) {
                continue; // the root file, or matched by an earlier pattern
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    sink.error(
                        span,
                        format!("cannot read included file {}: {e}", path.display()),
                    );
                    continue;
                }
            };
            let file = sink.add_file(path);
            if let Some(node) = yaml::parse(&text, file, sink) {
                merge_included(root, node, file, sink);
            }
        }
        if matched == 0 {
            sink.error(span, format!("include `{pattern}` matched no files"));
        }
    }
}

fn merge_included(root: &mut Node, included: Node, file: FileId, sink: &mut Sink) {
    let entries = match included.kind {
        Kind::Null => return,
        Kind::Map(entries) => entries,
        _ => {
            sink.error(
                Span::new(
                    file,
                    included.span.line as usize,
                    included.span.col as usize,
                ),
                format!(
                    "an included file holds a mapping of {}; found {}",
                    MERGED_SECTIONS.join(", "),
                    included.describe()
                ),
            );
            return;
        }
    };
    for section in entries {
        if section.key.starts_with(EXTENSION_PREFIX) {
            continue;
        }
        if !MERGED_SECTIONS.contains(&section.key.as_str()) {
            sink.error(
                section.key_span,
                format!(
                    "`{}` is not allowed in an included file; it may hold only {}",
                    section.key,
                    MERGED_SECTIONS.join(", ")
                ),
            );
            continue;
        }
        let items = match section.value.kind {
            Kind::Null => continue,
            Kind::Map(items) => items,
            _ => {
                sink.error(
                    section.value.span,
                    format!(
                        "expected a mapping of {} by name, found {} for `{}`",
                        section.key,
                        section.value.describe(),
                        section.key
                    ),
                );
                continue;
            }
        };
        merge_section(
            root,
            &section.key,
            section.key_span,
            section.value.span,
            items,
            sink,
        );
    }
}

fn merge_section(
    root: &mut Node,
    name: &str,
    key_span: Span,
    value_span: Span,
    items: Vec<Entry>,
    sink: &mut Sink,
) {
    let Some(top) = root.entries_mut() else {
        return;
    };
    if !top.iter().any(|e| e.key == name) {
        top.push(Entry {
            key: name.to_string(),
            key_span,
            value: Node::new(Kind::Map(Vec::new()), value_span),
        });
    }
    let Some(target) = top
        .iter_mut()
        .find(|e| e.key == name)
        .and_then(|e| e.value.entries_mut())
    else {
        return; // not a mapping in the root file: the schema check reports it
    };
    let mut index: std::collections::HashMap<String, Span> =
        target.iter().map(|e| (e.key.clone(), e.key_span)).collect();
    for item in items {
        if let Some(first) = index.get(&item.key) {
            let msg = format!(
                "{} `{}` is defined twice; first defined at {}",
                noun(name),
                item.key,
                first.at(sink)
            );
            sink.error(item.key_span, msg);
            continue;
        }
        index.insert(item.key.clone(), item.key_span);
        target.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match load_str("t.yaml", text, &LoadOptions::default()) {
            Ok(_) => Vec::new(),
            Err(d) => d
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
                .collect(),
        }
    }

    #[test]
    fn a_minimal_spec_loads() {
        let l = load_str("dir/t.yaml", "project: demo\n", &LoadOptions::default()).unwrap();
        assert_eq!(l.spec.project, "demo");
        assert_eq!(l.spec.provider, ProviderBlock::default());
        assert_eq!(l.base_dir, PathBuf::from("dir"));
        let l = load_str("t.yaml", "project: demo\n", &LoadOptions::default()).unwrap();
        assert_eq!(l.base_dir, PathBuf::from("."));
    }

    #[test]
    fn the_design_example_loads() {
        let text = r#"
project: quickstart
provider: { kind: local }
variables: { workers: { default: 2 } }
targets:
  prod: { variables: { workers: 8 } }
pools:
  general:
    node_type: small
    min_idle: 2
    max_capacity: 10
    idle_timeout_minutes: 15
    warm: running
    preload: { runtime: "1", libraries: [ { pip: "requests==2.32.3" } ] }
policies:
  small-only: { max_workers: 10, node_types: [small, medium], require_autotermination: true }
clusters:
  etl:
    pool: general
    driver: { node_type: medium }
    workers: ${var.workers}
    autotermination_minutes: 30
    policy: small-only
    runtime: "1"
    libraries: [ { pip: "numpy==2.1.0" } ]
    env: { LOG_LEVEL: info }
    mounts: [ { source: ./data, target: /mnt/data } ]
    tags: { team: data }
jobs:
  wordcount:
    cluster: etl
    retries: 2
    timeout_minutes: 30
    tasks:
      count:
        map:    { input: "data/*.txt", command: "python3 wc.py map" }
        reduce: { partitions: 4,       command: "python3 wc.py reduce" }
        output: out/wordcount
      top:
        depends_on: [count]
        command: "python3 top.py out/wordcount"
"#;
        let l = load_str("t.yaml", text, &LoadOptions::default()).unwrap();
        assert_eq!(l.spec.clusters["etl"].workers, Some(2));
        assert_eq!(l.spec.pools["general"].idle_timeout_minutes, 15);
        let opts = LoadOptions {
            target: Some("prod".into()),
            vars: vec![],
        };
        let l = load_str("t.yaml", text, &opts).unwrap();
        assert_eq!(l.spec.clusters["etl"].workers, Some(8));
        let opts = LoadOptions {
            target: Some("prod".into()),
            vars: vec![("workers".into(), "9".into())],
        };
        let l = load_str("t.yaml", text, &opts).unwrap();
        assert_eq!(l.spec.clusters["etl"].workers, Some(9));
        // 12 workers > policy max 10, and 12 + 0 driver > pool max 10.
        let opts = LoadOptions {
            target: None,
            vars: vec![("workers".into(), "12".into())],
        };
        let e = load_str("t.yaml", text, &opts).unwrap_err();
        assert_eq!(e.len(), 2, "{e}");
    }

    #[test]
    fn errors_in_one_resource_do_not_hide_others() {
        let text = "project: p\npools:\n  a: { node_type: small, max_capacity: x }\n  b: { node_type: tiny, max_capacity: 1 }\nclusters:\n  c: { pool: a, workers: 1 }\n  d: { pool: zz }\n";
        let e = errors(text);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("3:40: expected an integer"), "{e:?}");
        assert!(e[1].starts_with("4:19: unknown node type `tiny`"));
        assert!(
            e[2].starts_with("7:14: unknown pool `zz` in cluster `d`"),
            "{e:?}"
        );
    }

    #[test]
    fn diagnostics_display() {
        let d = Diagnostics(vec![
            Diagnostic {
                file: "b.yaml".into(),
                line: 2,
                col: 3,
                message: "second".into(),
            },
            Diagnostic {
                file: "a.yaml".into(),
                line: 9,
                col: 1,
                message: "first".into(),
            },
            Diagnostic::command_line("flag"),
        ]);
        assert_eq!(
            d.to_string(),
            "<command line>: error: flag\na.yaml:9:1: error: first\nb.yaml:2:3: error: second"
        );
    }

    #[test]
    fn includes_merge_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("motorpool.yaml");
        std::fs::create_dir(dir.path().join("jobs")).unwrap();
        std::fs::write(
            &root,
            "project: p\ninclude: [\"jobs/*.yaml\"]\nclusters:\n  etl: { node_type: small }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("jobs/a.yaml"),
            "jobs:\n  a: { cluster: etl, tasks: { t: { command: x } } }\nvariables:\n  v: { default: 1 }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("jobs/b.yaml"),
            "jobs:\n  b: { cluster: etl, tasks: { t: { command: x } } }\n",
        )
        .unwrap();
        let l = load(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(l.spec.jobs.len(), 2);
        assert!(l.spec.variables.contains_key("v"));
        assert_eq!(l.root_file, root);
        assert_eq!(l.base_dir, dir.path());

        // Defined twice, and a section an included file may not hold.
        std::fs::write(
            dir.path().join("jobs/c.yaml"),
            "jobs:\n  a: { cluster: etl, tasks: { t: { command: x } } }\nproject: q\n",
        )
        .unwrap();
        let e = load(dir.path(), &LoadOptions::default()).unwrap_err();
        let shown: Vec<String> = e.iter().map(|d| d.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        let c = dir.path().join("jobs/c.yaml").display().to_string();
        let a = dir.path().join("jobs/a.yaml").display().to_string();
        assert_eq!(
            shown[0],
            format!("{c}:2:3: error: job `a` is defined twice; first defined at {a}:2:3")
        );
        assert!(shown[1].starts_with(&format!(
            "{c}:3:1: error: `project` is not allowed in an included file"
        )));
    }

    #[test]
    fn includes_that_match_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("motorpool.yaml"),
            "project: p\ninclude: [\"nope/*.yaml\", \"[\"]\n",
        )
        .unwrap();
        let e = load(dir.path(), &LoadOptions::default()).unwrap_err();
        let msgs: Vec<&str> = e.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[0], "include `nope/*.yaml` matched no files");
        assert!(msgs[1].starts_with("invalid include pattern `[`"));
    }

    #[test]
    fn missing_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path(), &LoadOptions::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("error: no motorpool.yaml in directory")
        );
        let e = load(&dir.path().join("x.yaml"), &LoadOptions::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("x.yaml: error: cannot read the spec")
        );
    }

    #[test]
    fn empty_sections_are_no_sections() {
        let l = load_str(
            "t.yaml",
            "project: p\nprovider:\npools:\nclusters:\njobs:\nx-anchors: { a: 1 }\n",
            &LoadOptions::default(),
        )
        .unwrap();
        assert!(l.spec.pools.is_empty());
        assert_eq!(
            errors("project:\n")[0],
            "1:1: expected a string, found nothing (an empty value) for `project`"
        );
    }

    #[test]
    fn empty_and_non_mapping_specs() {
        assert_eq!(
            errors(""),
            vec!["1:1: the spec is empty; it needs at least `project: NAME`"]
        );
        assert!(errors("- a\n")[0].starts_with("1:1: expected a mapping"));
    }
}
