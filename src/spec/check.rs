//! Checks that span resources or need the provider: references (pools,
//! policies, clusters, tasks), node types in the provider's catalog, cycles
//! in `depends_on`, policies, impossible numbers, names. All collected.

use std::collections::{BTreeMap, HashMap, HashSet};

use motorpool_provider::{NodeType, ProviderPlugin, cheapest_fit};

use super::diag::{Sink, Span};
use super::model::*;
use super::schema::unknown_name;
use super::yaml::{Entry, Kind, Node};

/// More workers, pool instances or autoscale maximum than this is refused.
pub const MAX_COUNT: u32 = 10_000;

/// The longest `startup_timeout_minutes`: a day.
pub const MAX_STARTUP_TIMEOUT_MINUTES: u32 = 24 * 60;

/// One resource that passed the shape check, with its place in the tree.
pub(crate) struct Res<'a, T> {
    pub entry: &'a Entry,
    pub value: T,
}

impl<T> Res<'_, T> {
    fn name(&self) -> &str {
        &self.entry.key
    }
    fn node(&self) -> &Node {
        &self.entry.value
    }
}

/// The resources of one kind: those that passed the shape check, and the
/// names of those that did not (already reported, so references to them
/// are not reported again).
pub(crate) struct Section<'a, T> {
    pub items: Vec<Res<'a, T>>,
    pub broken: HashSet<&'a str>,
    pub section_broken: bool,
    index: HashMap<&'a str, usize>,
}

impl<'a, T> Section<'a, T> {
    pub fn new(items: Vec<Res<'a, T>>, broken: HashSet<&'a str>, section_broken: bool) -> Self {
        let index = items
            .iter()
            .enumerate()
            .map(|(i, r)| (r.entry.key.as_str(), i))
            .collect();
        Section {
            items,
            broken,
            section_broken,
            index,
        }
    }

    fn get(&self, name: &str) -> Lookup<'_, 'a, T> {
        match self.index.get(name) {
            Some(&i) => Lookup::Found(&self.items[i]),
            None if self.section_broken || self.broken.contains(name) => Lookup::Broken,
            None => Lookup::Unknown,
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .items
            .iter()
            .map(|r| r.entry.key.as_str())
            .chain(self.broken.iter().copied())
            .collect();
        names.sort_unstable();
        names
    }
}

enum Lookup<'s, 'a, T> {
    Found(&'s Res<'a, T>),
    /// Defined, but with errors of its own.
    Broken,
    Unknown,
}

/// Everything the checks look at.
pub(crate) struct Parts<'a> {
    /// The project name and its span, when it is a valid string.
    pub project: Option<(&'a str, Span)>,
    /// The provider's kind, when it is a known one.
    pub provider_kind: Option<&'a str>,
    /// The provider block after `--target`, if the spec has one.
    pub provider_node: Option<&'a Node>,
    /// The root spec file's directory: the project, where its paths resolve.
    pub base_dir: &'a std::path::Path,
    pub pools: Section<'a, Pool>,
    pub policies: Section<'a, Policy>,
    pub clusters: Section<'a, Cluster>,
    pub jobs: Section<'a, Job>,
}

/// The prefix of motorpool's own tags, which a spec's `tags` cannot set.
pub const RESERVED_TAG_PREFIX: &str = "motorpool-";

/// `^[A-Za-z_][A-Za-z0-9_]*$`: a name every shell and `execve` keep as it is.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(ok)
        && b.last().is_some_and(ok)
        && b.iter().all(|c| ok(c) || *c == b'-')
}

fn name_rule() -> &'static str {
    "names use 1 to 63 lowercase letters, digits and `-`, and start and end with a letter or digit"
}

fn value_span(node: &Node, key: &str) -> Span {
    node.get(key).map_or(node.span, |v| v.span)
}

fn key_span(node: &Node, key: &str) -> Span {
    node.entry(key).map_or(node.span, |e| e.key_span)
}

fn path_span(node: &Node, path: &[&str]) -> Span {
    let mut n = node;
    for k in path {
        match n.get(k) {
            Some(next) => n = next,
            None => return n.span,
        }
    }
    n.span
}

/// A setting a check refuses, and why (the message `validate` shows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingError(pub String);

/// `runtime_url` must be an http(s) URL without whitespace.
pub fn check_runtime_url(url: &str) -> Result<(), SettingError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() > "https://".len()
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(SettingError(format!(
            "`{url}` is not an https:// or http:// URL of the motorpool executable"
        )))
    }
}

/// `runtime_sha256` must be 64 hex digits.
pub fn check_sha256(sha: &str) -> Result<(), SettingError> {
    if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(SettingError(format!(
            "`{sha}` is not a SHA-256 (64 hex digits, as `sha256sum` prints)"
        )))
    }
}

struct Checker<'a, 's> {
    parts: &'s Parts<'a>,
    sink: &'s mut Sink,
    /// The spec's provider, when its kind is registered.
    plugin: Option<&'static dyn ProviderPlugin>,
    catalog: Option<Vec<NodeType>>,
}

pub(crate) fn check(parts: &Parts<'_>, sink: &mut Sink) {
    let plugin = parts
        .provider_kind
        .and_then(|kind| crate::registry::Registry::global().provider(kind));
    let mut c = Checker {
        parts,
        sink,
        plugin,
        catalog: plugin.map(|p| p.catalog()),
    };
    c.project();
    c.provider();
    for p in &parts.pools.items {
        c.pool(p);
    }
    for p in &parts.policies.items {
        c.policy(p);
    }
    for cl in &parts.clusters.items {
        c.name("cluster", cl.entry);
        let what = format!("cluster `{}`", cl.name());
        c.cluster(&cl.value, cl.node(), cl.entry.key_span, &what);
    }
    for j in &parts.jobs.items {
        c.job(j);
    }
}

/// The span of the setting at `path` below `node` (keys of mappings,
/// indices of sequences); the deepest node found when the path runs out.
fn setting_span(node: &Node, path: &[String], on_key: bool) -> Span {
    let mut n = node;
    for (depth, k) in path.iter().enumerate() {
        let next = match &n.kind {
            Kind::Seq(items) => k.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ if depth + 1 == path.len() && on_key => return key_span(n, k),
            _ => n.get(k),
        };
        match next {
            Some(next) => n = next,
            None => return n.span,
        }
    }
    n.span
}

impl<'s> Checker<'_, 's> {
    fn error(&mut self, span: Span, msg: impl Into<String>) {
        self.sink.error(span, msg);
    }

    fn kind(&self) -> &'static str {
        self.plugin.map_or("unknown", |p| p.kind())
    }

    /// Whether the provider can stop and start instances (unknown: yes,
    /// its kind is reported already).
    fn can_stop(&self) -> bool {
        self.plugin.is_none_or(|p| p.capabilities().stop_start)
    }

    fn name(&mut self, what: &str, entry: &Entry) {
        if !is_valid_name(&entry.key) {
            let msg = format!("invalid {what} name `{}`: {}", entry.key, name_rule());
            self.error(entry.key_span, msg);
        }
    }

    fn project(&mut self) {
        if let Some((name, span)) = self.parts.project
            && !is_valid_name(name)
        {
            let msg = format!("invalid project name `{name}`: {}", name_rule());
            self.error(span, msg);
        }
    }

    /// Provider settings, checked on the tree so that they are checked even
    /// when another provider setting has the wrong type: the shared ones
    /// here, the provider's own by its crate.
    fn provider(&mut self) {
        let Some(node) = self.parts.provider_node else {
            return;
        };
        let Some(plugin) = self.plugin else {
            return;
        };
        let own = match super::to_json(node) {
            serde_json::Value::Object(mut map) => {
                map.remove("kind");
                for key in SharedProviderSettings::KEYS {
                    map.remove(key);
                }
                serde_json::Value::Object(map)
            }
            _ => return,
        };
        let needs_runtime_url = plugin.capabilities().needs_runtime_download();
        self.shared_provider_settings(node, needs_runtime_url, plugin.publishes_runtime(&own));
        for problem in plugin.check_settings(&own) {
            let span = setting_span(node, &problem.path, problem.on_key);
            self.error(span, problem.message);
        }
    }

    /// What nodes need that every provider shares: the runtime's URL and
    /// checksum (where nodes download it, when the spec launches anything),
    /// and a sane ready timeout.
    fn shared_provider_settings(&mut self, node: &Node, downloads_runtime: bool, publishes: bool) {
        let launches_nodes = !self.parts.pools.items.is_empty()
            || !self.parts.clusters.items.is_empty()
            || !self.parts.jobs.items.is_empty();
        let url = node.get("runtime_url").and_then(Node::as_str);
        let sha = node.get("runtime_sha256").and_then(Node::as_str);
        // A provider that publishes the runtime itself needs neither, or both.
        let required = !publishes || url.is_some() || sha.is_some();
        if launches_nodes && downloads_runtime && required {
            for (key, value) in [("runtime_url", url), ("runtime_sha256", sha)] {
                if value.is_none() && node.get(key).is_none() {
                    self.error(
                        key_span(node, "kind"),
                        format!(
                            "the {} provider needs `{key}`: its nodes install the motorpool runtime \
                             from `runtime_url` and check it against `runtime_sha256` before they start",
                            self.kind()
                        ),
                    );
                }
            }
        }
        if let Some(url) = url
            && let Err(problem) = check_runtime_url(url)
        {
            self.error(
                value_span(node, "runtime_url"),
                format!("`runtime_url`: {problem}"),
            );
        }
        if let Some(sha) = sha
            && let Err(problem) = check_sha256(sha)
        {
            self.error(
                value_span(node, "runtime_sha256"),
                format!("`runtime_sha256`: {problem}"),
            );
        }
        let minutes = match node.get("ready_timeout_minutes").map(|n| &n.kind) {
            Some(Kind::Int(i, _)) => Some(*i as f64),
            Some(Kind::Float(f, _)) => Some(*f),
            _ => None,
        };
        if let Some(m) = minutes.filter(|m| !(m.is_finite() && *m > 0.0 && *m <= 24.0 * 60.0)) {
            self.error(
                value_span(node, "ready_timeout_minutes"),
                format!("`ready_timeout_minutes` must be more than 0 and at most 1440, found {m}"),
            );
        }
    }

    /// An engine named at `engine_node` (`engine: spark` or `{ kind, version }`):
    /// registered, at a version it runs. Its plugin when it is registered.
    fn engine_named(
        &mut self,
        kind: &str,
        version: Option<&str>,
        engine_node: &Node,
        what: &str,
    ) -> Option<&'static dyn crate::engines::EnginePlugin> {
        let registry = crate::registry::Registry::global();
        let kind_span = match &engine_node.kind {
            Kind::Map(_) => value_span(engine_node, "kind"),
            _ => engine_node.span,
        };
        let Some(plugin) = registry.engine(kind) else {
            let msg = unknown_name(
                &format!("unknown engine `{kind}` in {what}"),
                kind,
                &registry.engine_kinds(),
                "engines",
                "no engines are registered",
            );
            self.error(kind_span, msg);
            return None;
        };
        if let Some(version) = version
            && let Err(problem) = plugin.check_version(version)
        {
            self.error(
                value_span(engine_node, "version"),
                format!("engine version `{version}` in {what}: {problem}"),
            );
        }
        Some(plugin)
    }

    /// The cluster's engine: registered, at a version it runs; `runtime`
    /// only with the bundled runtime, and not twice; `spark_conf` only on Spark.
    fn engine(&mut self, c: &Cluster, node: &Node, what: &str) {
        if !c.spark_conf.is_empty() {
            self.spark_conf(&c.spark_conf, node.get("spark_conf").unwrap_or(node), what);
            if c.engine_kind() != crate::engines::spark::KIND {
                self.error(
                    key_span(node, "spark_conf"),
                    format!(
                        "`spark_conf` in {what}: the cluster runs `{}`, not Spark; \
                         add `engine: {{ kind: spark, version: \"{}\" }}` or remove it",
                        c.engine_kind(),
                        crate::engines::spark::DEFAULT_VERSION
                    ),
                );
            }
        }
        let Some(engine) = &c.engine else {
            return;
        };
        let engine_node = node.get("engine").unwrap_or(node);
        let Some(plugin) = self.engine_named(engine.kind(), engine.version(), engine_node, what)
        else {
            return;
        };
        if let Some(runtime) = &c.runtime {
            let span = value_span(node, "runtime");
            if plugin.kind() != DEFAULT_ENGINE {
                self.error(
                    span,
                    format!(
                        "`runtime` in {what} is the version of the motorpool engine, but the \
                         cluster runs `{}`: write `engine: {{ kind: {}, version: \"{runtime}\" }}` \
                         instead",
                        plugin.kind(),
                        plugin.kind()
                    ),
                );
            } else if engine.version().is_some() {
                self.error(
                    span,
                    format!(
                        "{what} sets both `runtime` and `engine.version`; keep only \
                         `engine: {{ kind: motorpool, version: \"{runtime}\" }}`"
                    ),
                );
            }
        }
    }

    /// Reports a node type that is not in the catalog; true when it is known.
    fn node_type(&mut self, name: &str, span: Span, what: &str) -> bool {
        let Some(catalog) = &self.catalog else {
            return true;
        };
        if catalog.iter().any(|t| t.name == name) {
            return true;
        }
        let known: Vec<&str> = catalog.iter().map(|t| t.name.as_str()).collect();
        let msg = unknown_name(
            &format!(
                "unknown node type `{name}` in {what} for the {} provider",
                self.kind()
            ),
            name,
            &known,
            "known node types",
            "",
        );
        self.error(span, msg);
        false
    }

    /// Checks a `resources` block; returns the node type it resolves to.
    fn resources(
        &mut self,
        r: &Resources,
        node: &Node,
        key_span: Span,
        what: &str,
    ) -> Option<String> {
        let mut ok = true;
        if r.cpus == 0 {
            self.error(
                value_span(node, "cpus"),
                format!("`cpus` in {what} must be at least 1"),
            );
            ok = false;
        }
        if r.memory_gb <= 0.0 {
            self.error(
                value_span(node, "memory_gb"),
                format!(
                    "`memory_gb` in {what} must be more than 0, found {}",
                    r.memory_gb
                ),
            );
            ok = false;
        }
        let catalog = self.catalog.as_deref()?;
        if !ok {
            return None;
        }
        match cheapest_fit(catalog, r.cpus, r.memory_gb) {
            Some(t) => Some(t.name.clone()),
            None => {
                let sizes: Vec<String> = catalog
                    .iter()
                    .map(|t| format!("{} ({} cpus, {} GB)", t.name, t.cpus, t.memory_gb))
                    .collect();
                self.error(
                    key_span,
                    format!(
                        "no {} node type has {} cpus and {} GB of memory for {what}; node types: {}",
                        self.kind(),
                        r.cpus,
                        r.memory_gb,
                        sizes.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn libraries(&mut self, libs: &[Library], node: Option<&Node>, what: &str) {
        let Some(Kind::Seq(items)) = node.map(|n| &n.kind) else {
            return;
        };
        for (lib, n) in libs.iter().zip(items) {
            match (&lib.pip, &lib.requirements) {
                (None, None) => self.error(
                    n.span,
                    format!("a library in {what} needs one of `pip` or `requirements`"),
                ),
                (Some(_), Some(_)) => self.error(
                    key_span(n, "requirements"),
                    format!("a library in {what} sets both `pip` and `requirements`; choose one"),
                ),
                (None, Some(file)) => {
                    let span = value_span(n, "requirements");
                    self.project_file(file, span, &format!("requirements file of {what}"));
                }
                _ => {}
            }
        }
    }

    /// Spark properties (a cluster's `spark_conf`, a task's `conf`): names
    /// Spark knows the shape of, none that motorpool sets itself.
    fn spark_conf(&mut self, conf: &BTreeMap<String, String>, node: &Node, what: &str) {
        for key in conf.keys() {
            if let Err(problem) = crate::runtime::plan::check_spark_property(key) {
                self.error(key_span(node, key), format!("{what}: {problem}"));
            }
        }
    }

    /// A `spark:` task: its script and Python files in the project, its
    /// properties Spark's.
    fn spark_task(&mut self, s: &crate::spec::SparkTask, node: &Node, what: &str) {
        self.project_file(
            &s.script,
            value_span(node, "script"),
            &format!("the script of {what}"),
        );
        if let Some(Kind::Seq(items)) = node.get("py_files").map(|n| &n.kind) {
            for (f, n) in s.py_files.iter().zip(items) {
                self.project_file(f, n.span, &format!("a `py_files` entry of {what}"));
            }
        }
        self.spark_conf(&s.conf, node.get("conf").unwrap_or(node), what);
    }

    /// A file the plan reads from the project (an init script, a
    /// requirements file): confined to the project, and there.
    fn project_file(&mut self, path: &str, span: Span, what: &str) {
        match crate::confine::project_path(path) {
            Err(problem) => self.error(span, format!("{what}: {problem}")),
            Ok(relative) => {
                let full = self.parts.base_dir.join(&relative);
                if let Err(problem) =
                    crate::confine::resolved_inside(self.parts.base_dir, &relative)
                {
                    self.error(span, format!("{what}: {problem}"));
                } else if !full.is_file() {
                    self.error(
                        span,
                        format!(
                            "{what}: `{path}` is not a file (looked for {})",
                            full.display()
                        ),
                    );
                }
            }
        }
    }

    /// A job's local input (file or glob) or output: inside the project
    /// after normalising, and (what exists of it) through symlinks too.
    fn job_path(&mut self, path: &str, span: Span, what: &str) {
        match crate::confine::job_path(path) {
            Err(problem) => self.error(span, format!("{what}: {problem}")),
            Ok(relative) => {
                let base = self.parts.base_dir;
                let problem = match glob::glob(&format!(
                    "{}/{}",
                    glob::Pattern::escape(&base.to_string_lossy()),
                    relative.to_string_lossy()
                )) {
                    // A glob: every match it has now.
                    Ok(matches) => matches
                        .flatten()
                        .find_map(|p| crate::confine::resolves_inside(base, &p).err()),
                    Err(_) => None,
                }
                .or_else(|| crate::confine::resolved_inside(base, &relative).err());
                if let Some(problem) = problem {
                    self.error(span, format!("{what}: {problem}"));
                }
            }
        }
    }

    /// Init scripts, mounts, env and tags: what a cluster's nodes start from.
    fn node_inputs(&mut self, c: &Cluster, node: &Node, what: &str) {
        let items = |key: &str| match node.get(key).map(|n| &n.kind) {
            Some(Kind::Seq(items)) => items.as_slice(),
            _ => &[],
        };
        for (path, n) in c.init_scripts.iter().zip(items("init_scripts")) {
            self.project_file(path, n.span, &format!("init script of {what}"));
        }
        for (m, n) in c.mounts.iter().zip(items("mounts")) {
            if !m.source.contains("://")
                && let Err(problem) = crate::confine::project_path(&m.source)
            {
                self.error(
                    value_span(n, "source"),
                    format!("the source of a mount of {what}: {problem}"),
                );
            }
            if !m.source.contains("://")
                && let Ok(relative) = crate::confine::project_path(&m.source)
                && let Err(problem) =
                    crate::confine::resolved_inside(self.parts.base_dir, &relative)
            {
                self.error(
                    value_span(n, "source"),
                    format!("the source of a mount of {what}: {problem}"),
                );
            }
            if let Err(problem) = crate::confine::node_target(&m.target) {
                self.error(
                    value_span(n, "target"),
                    format!("the target of a mount of {what}: {problem}"),
                );
            }
        }
        self.env_entries(node, &c.env, what);
        let entries = |key: &str| node.get(key).and_then(Node::entries).unwrap_or_default();
        for e in entries("tags") {
            if e.key.to_ascii_lowercase().starts_with(RESERVED_TAG_PREFIX) {
                self.error(
                    e.key_span,
                    format!(
                        "tag `{}` in {what}: tags starting with `{RESERVED_TAG_PREFIX}` are \
                         motorpool's own (they say what an instance is); choose another name",
                        e.key
                    ),
                );
            }
        }
    }

    /// The `env` of a cluster or a job: names a process environment can
    /// carry, no NUL in a value, and secrets whose source is there.
    fn env_entries(
        &mut self,
        node: &Node,
        env: &std::collections::BTreeMap<String, crate::spec::EnvValue>,
        what: &str,
    ) {
        let entries = node.get("env").and_then(Node::entries).unwrap_or_default();
        for e in entries {
            if !is_env_name(&e.key) {
                self.error(
                    e.key_span,
                    format!(
                        "invalid environment variable name {:?} in {what}: names use letters, \
                         digits and `_`, and do not start with a digit",
                        e.key
                    ),
                );
            }
            if let Some(crate::spec::EnvValue::Secret(secret)) = env.get(&e.key) {
                self.secret_env(&e.key, secret, &e.value, what);
            }
            if e.value.as_str().is_some_and(|v| v.contains('\0')) {
                self.error(
                    e.value.span,
                    format!(
                        "the value of environment variable `{}` in {what} holds a NUL byte, \
                         which no process environment can carry",
                        e.key
                    ),
                );
            }
        }
    }

    /// A secret env value: exactly one source; the variable set (and a
    /// name), the file in the project (through symlinks too) and there.
    /// Messages name the variable or the file, never a value.
    fn secret_env(&mut self, name: &str, s: &crate::spec::SecretValue, node: &Node, what: &str) {
        let swhat = format!("the secret env `{name}` of {what}");
        let set = [
            ("from_env", s.from_env.is_some()),
            ("from_file", s.from_file.is_some()),
            ("value", s.value.is_some()),
        ];
        if !self.one_of(node, node.span, &swhat, &set, false) {
            return;
        }
        if !s.secret && (s.from_env.is_some() || s.from_file.is_some()) {
            self.error(
                value_span(node, "secret"),
                format!(
                    "{swhat}: a value read from the environment or a file is always secret; \
                     drop `secret: false`"
                ),
            );
        }
        if let Some(var) = &s.from_env {
            let span = value_span(node, "from_env");
            if !is_env_name(var) {
                self.error(
                    span,
                    format!("{swhat}: {var:?} is not an environment variable name"),
                );
            } else {
                match std::env::var_os(var) {
                    None => self.error(
                        span,
                        format!(
                            "{swhat} takes its value from the environment variable `{var}`, \
                             which is not set"
                        ),
                    ),
                    Some(v) if v.as_encoded_bytes().contains(&0) || v.to_str().is_none() => self
                        .error(
                            span,
                            format!("{swhat}: the environment variable `{var}` is not UTF-8 text"),
                        ),
                    Some(_) => {}
                }
            }
        }
        if let Some(path) = &s.from_file {
            self.project_file(path, value_span(node, "from_file"), &swhat);
        }
        if s.value.as_deref().is_some_and(|v| v.contains('\0')) {
            self.error(
                value_span(node, "value"),
                format!(
                    "{swhat}: the value holds a NUL byte, which no process environment can carry"
                ),
            );
        }
    }

    /// Exactly one (or, with `optional`, at most one) of `keys` is set.
    fn one_of(
        &mut self,
        node: &Node,
        at: Span,
        what: &str,
        keys: &[(&str, bool)],
        optional: bool,
    ) -> bool {
        let mut set: Vec<(&str, Span)> = keys
            .iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| (*k, key_span(node, k)))
            .collect();
        let names: Vec<String> = keys.iter().map(|(k, _)| format!("`{k}`")).collect();
        let alternatives = match names.as_slice() {
            [a, b] => format!("{a} or {b}"),
            [init @ .., last] => format!("{}, or {}", init.join(", "), last),
            [] => String::new(),
        };
        match set.len() {
            0 if !optional => {
                self.error(at, format!("{what} needs one of {alternatives}"));
                false
            }
            0 | 1 => true,
            _ => {
                set.sort_by_key(|(_, s)| *s);
                let listed: Vec<String> = set.iter().map(|(k, _)| format!("`{k}`")).collect();
                let both = if listed.len() == 2 {
                    format!("both {} and {}", listed[0], listed[1])
                } else {
                    listed.join(", ")
                };
                let span = set.last().map_or(at, |(_, s)| *s);
                self.error(
                    span,
                    format!("{what} sets {both}; choose one of {alternatives}"),
                );
                false
            }
        }
    }

    /// `startup_timeout_minutes`: at least one minute, at most a day.
    fn startup_timeout(&mut self, minutes: Option<u32>, node: &Node, what: &str) {
        let Some(m) = minutes else { return };
        let span = value_span(node, "startup_timeout_minutes");
        if m == 0 {
            self.error(
                span,
                format!("`startup_timeout_minutes` of {what} must be at least 1"),
            );
        } else if m > MAX_STARTUP_TIMEOUT_MINUTES {
            self.error(
                span,
                format!(
                    "`startup_timeout_minutes` of {what} must be at most {MAX_STARTUP_TIMEOUT_MINUTES} (a day), found {m}"
                ),
            );
        }
    }

    fn count(&mut self, n: u32, span: Span, noun: &str, what: &str) {
        if n > MAX_COUNT {
            self.error(
                span,
                format!("more than {MAX_COUNT} {noun} in {what} is not supported (found {n})"),
            );
        }
    }

    fn pool(&mut self, r: &Res<'_, Pool>) {
        self.name("pool", r.entry);
        let p = &r.value;
        let node = r.node();
        let what = format!("pool `{}`", r.name());
        let set = [
            ("node_type", p.node_type.is_some()),
            ("resources", p.resources.is_some()),
        ];
        if self.one_of(node, r.entry.key_span, &what, &set, false) {
            if let Some(t) = &p.node_type {
                self.node_type(t, value_span(node, "node_type"), &what);
            }
            if let Some(res) = &p.resources {
                let rn = node.get("resources").unwrap_or(node);
                self.resources(res, rn, key_span(node, "resources"), &what);
            }
        }
        if p.max_capacity == 0 {
            self.error(
                value_span(node, "max_capacity"),
                format!("`max_capacity` of {what} must be at least 1"),
            );
        }
        if p.warm == WarmMode::Stopped && !self.can_stop() {
            self.error(
                value_span(node, "warm"),
                format!(
                    "`warm: stopped` in {what}: the {} provider cannot stop and start instances",
                    self.kind()
                ),
            );
        }
        self.count(
            p.max_capacity,
            value_span(node, "max_capacity"),
            "instances",
            &what,
        );
        if p.min_idle > p.max_capacity {
            self.error(
                value_span(node, "min_idle"),
                format!(
                    "`min_idle` ({}) of {what} is more than its `max_capacity` ({})",
                    p.min_idle, p.max_capacity
                ),
            );
        }
        if let Some(pre) = &p.preload {
            let libs = node.get("preload").and_then(|n| n.get("libraries"));
            self.libraries(&pre.libraries, libs, &what);
            if let (Some(engine), Some(en)) = (
                &pre.engine,
                node.get("preload").and_then(|n| n.get("engine")),
            ) {
                let preload_what = format!("the preload of {what}");
                self.engine_named(&engine.kind, engine.version.as_deref(), en, &preload_what);
            }
        }
        self.startup_timeout(p.startup_timeout_minutes, node, &what);
    }

    fn policy(&mut self, r: &Res<'_, Policy>) {
        let what = format!("policy `{}`", r.name());
        if let (Some(types), Some(Kind::Seq(items))) = (
            &r.value.node_types,
            r.node().get("node_types").map(|n| &n.kind),
        ) {
            for (t, n) in types.iter().zip(items) {
                self.node_type(t, n.span, &what);
            }
        }
    }

    /// The node type a pool's instances have, if known.
    fn pool_type(&self, pool: &Pool) -> Option<String> {
        if let Some(t) = &pool.node_type {
            return Some(t.clone());
        }
        let r = pool.resources.as_ref()?;
        cheapest_fit(self.catalog.as_deref()?, r.cpus, r.memory_gb).map(|t| t.name.clone())
    }

    fn pool_ref(&mut self, name: &str, span: Span, what: &str) -> Option<&'s Pool> {
        let parts = self.parts;
        match parts.pools.get(name) {
            Lookup::Found(p) => Some(&p.value),
            Lookup::Broken => None,
            Lookup::Unknown => {
                let msg = unknown_name(
                    &format!("unknown pool `{name}` in {what}"),
                    name,
                    &parts.pools.names(),
                    "defined pools",
                    "no pools are defined",
                );
                self.error(span, msg);
                None
            }
        }
    }

    fn cluster(&mut self, c: &Cluster, node: &Node, at: Span, what: &str) {
        let parts = self.parts;
        // Where the workers come from, and the node types used (type, where).
        let mut types: Vec<(String, Span, String)> = Vec::new();
        let source = [
            ("pool", c.pool.is_some()),
            ("node_type", c.node_type.is_some()),
            ("resources", c.resources.is_some()),
        ];
        let mut pool: Option<&Pool> = None;
        self.startup_timeout(c.startup_timeout_minutes, node, what);
        self.engine(c, node, what);
        if c.autotermination_minutes.is_some() && !self.can_stop() {
            self.error(
                value_span(node, "autotermination_minutes"),
                format!(
                    "`autotermination_minutes` in {what}: the {} provider cannot stop instances, \
                     and an idle cluster stops its driver",
                    self.kind()
                ),
            );
        }
        if self.one_of(node, at, what, &source, false) {
            if let Some(name) = &c.pool {
                let span = value_span(node, "pool");
                pool = self.pool_ref(name, span, what);
                if let Some(t) = pool.and_then(|p| self.pool_type(p)) {
                    types.push((t, span, format!(" (of pool `{name}`)")));
                }
            }
            if let Some(t) = &c.node_type {
                let span = value_span(node, "node_type");
                if self.node_type(t, span, what) {
                    types.push((t.clone(), span, String::new()));
                }
            }
            if let Some(r) = &c.resources {
                let rn = node.get("resources").unwrap_or(node);
                if let Some(t) = self.resources(r, rn, key_span(node, "resources"), what) {
                    types.push((
                        t,
                        key_span(node, "resources"),
                        " (for its resources)".into(),
                    ));
                }
            }
        }

        // The driver.
        let mut driver_elsewhere = false;
        let mut driver_from_same_pool = false;
        if let (Some(d), Some(dn)) = (&c.driver, node.get("driver")) {
            let dwhat = format!("the driver of {what}");
            let set = [
                ("pool", d.pool.is_some()),
                ("node_type", d.node_type.is_some()),
                ("resources", d.resources.is_some()),
            ];
            driver_elsewhere = set.iter().any(|(_, s)| *s);
            if self.one_of(dn, key_span(node, "driver"), &dwhat, &set, true) {
                if let Some(name) = &d.pool {
                    let span = value_span(dn, "pool");
                    driver_from_same_pool = c.pool.as_deref() == Some(name.as_str());
                    if let Some(t) = self
                        .pool_ref(name, span, &dwhat)
                        .and_then(|p| self.pool_type(p))
                    {
                        types.push((t, span, format!(" (of pool `{name}`, for the driver)")));
                    }
                }
                if let Some(t) = &d.node_type {
                    let span = value_span(dn, "node_type");
                    if self.node_type(t, span, &dwhat) {
                        types.push((t.clone(), span, " (for the driver)".into()));
                    }
                }
                if let Some(r) = &d.resources {
                    let rn = dn.get("resources").unwrap_or(dn);
                    if let Some(t) = self.resources(r, rn, key_span(dn, "resources"), &dwhat) {
                        types.push((
                            t,
                            key_span(dn, "resources"),
                            " (for the driver's resources)".into(),
                        ));
                    }
                }
            }
        }

        // Workers.
        if c.workers.is_some() && c.autoscale.is_some() {
            self.error(
                key_span(node, "autoscale"),
                format!("{what} sets both `workers` and `autoscale`; choose one"),
            );
        }
        if let Some(w) = c.workers {
            self.count(w, value_span(node, "workers"), "workers", what);
        }
        if let Some(a) = &c.autoscale {
            if a.min > a.max {
                self.error(
                    path_span(node, &["autoscale", "min"]),
                    format!(
                        "`autoscale.min` ({}) of {what} is more than `autoscale.max` ({})",
                        a.min, a.max
                    ),
                );
            }
            self.count(
                a.max,
                path_span(node, &["autoscale", "max"]),
                "workers",
                what,
            );
        }
        let max_workers = c
            .workers
            .or(c.autoscale.as_ref().map(|a| a.max))
            .unwrap_or(0);
        let workers_span = if c.workers.is_some() {
            value_span(node, "workers")
        } else {
            path_span(node, &["autoscale", "max"])
        };

        // Pool capacity.
        if let (Some(p), Some(name)) = (pool, &c.pool) {
            let driver = u32::from(!driver_elsewhere || driver_from_same_pool);
            let need = u64::from(max_workers) + u64::from(driver);
            if p.max_capacity > 0 && need > u64::from(p.max_capacity) {
                let driver_note = if driver == 1 { " + 1 driver" } else { "" };
                self.error(
                    value_span(node, "pool"),
                    format!(
                        "{what} needs up to {need} instances from pool `{name}` ({max_workers} workers{driver_note}), more than its `max_capacity` of {}",
                        p.max_capacity
                    ),
                );
            }
        }

        self.libraries(&c.libraries, node.get("libraries"), what);
        self.node_inputs(c, node, what);

        // The policy.
        let Some(pname) = &c.policy else {
            return;
        };
        let pspan = value_span(node, "policy");
        let policy = match parts.policies.get(pname) {
            Lookup::Found(p) => &p.value,
            Lookup::Broken => return,
            Lookup::Unknown => {
                let msg = unknown_name(
                    &format!("unknown policy `{pname}` in {what}"),
                    pname,
                    &parts.policies.names(),
                    "defined policies",
                    "no policies are defined",
                );
                self.error(pspan, msg);
                return;
            }
        };
        if let Some(limit) = policy.max_workers
            && max_workers > limit
        {
            let has = if c.workers.is_some() {
                format!("has {max_workers} workers")
            } else {
                format!("may scale to {max_workers} workers")
            };
            self.error(
                workers_span,
                format!("{what} {has}, but policy `{pname}` allows at most {limit}"),
            );
        }
        if let Some(allowed) = &policy.node_types {
            for (t, span, note) in &types {
                if !allowed.iter().any(|a| a == t) {
                    self.error(
                        *span,
                        format!(
                            "policy `{pname}` does not allow node type `{t}`{note} in {what}; allowed: {}",
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }
        if policy.require_autotermination && c.autotermination_minutes.is_none() {
            self.error(
                at,
                format!("{what} must set `autotermination_minutes`: policy `{pname}` requires it"),
            );
        }
        if let (Some(max), Some(m)) = (
            policy.max_autotermination_minutes,
            c.autotermination_minutes,
        ) && m > max
        {
            self.error(
                    value_span(node, "autotermination_minutes"),
                    format!(
                        "`autotermination_minutes` ({m}) of {what} is more than policy `{pname}` allows ({max})"
                    ),
                );
        }
    }

    fn job(&mut self, r: &Res<'_, Job>) {
        self.name("job", r.entry);
        let parts = self.parts;
        let j = &r.value;
        let node = r.node();
        let what = format!("job `{}`", r.name());
        let set = [
            ("cluster", j.cluster.is_some()),
            ("new_cluster", j.new_cluster.is_some()),
        ];
        if self.one_of(node, r.entry.key_span, &what, &set, false) {
            if let Some(name) = &j.cluster
                && let Lookup::Unknown = parts.clusters.get(name)
            {
                let msg = unknown_name(
                    &format!("unknown cluster `{name}` in {what}"),
                    name,
                    &parts.clusters.names(),
                    "defined clusters",
                    "no clusters are defined; a job can also use `new_cluster:`",
                );
                self.error(value_span(node, "cluster"), msg);
            }
            if let (Some(c), Some(cn)) = (&j.new_cluster, node.get("new_cluster")) {
                let cwhat = format!("the new_cluster of {what}");
                self.cluster(c, cn, key_span(node, "new_cluster"), &cwhat);
            }
        }
        self.env_entries(node, &j.env, &what);
        if let (Some(schedule), Some(sn)) = (&j.schedule, node.get("schedule")) {
            if let Err(e) = crate::schedule::Cron::parse(&schedule.cron) {
                self.error(
                    value_span(sn, "cron"),
                    format!("the schedule of {what}: {e}"),
                );
            }
            if let Err(e) = crate::schedule::zone(schedule.timezone()) {
                self.error(
                    value_span(sn, "timezone"),
                    format!("the schedule of {what}: {e}"),
                );
            }
        }
        let tasks_node = node.get("tasks");
        let Some(entries) = tasks_node.and_then(Node::entries) else {
            return;
        };
        if j.tasks.is_empty() {
            self.error(key_span(node, "tasks"), format!("{what} has no tasks"));
            return;
        }
        // Tasks in tree order, with their parsed values.
        let tasks: Vec<(&Entry, &Task)> = entries
            .iter()
            .filter_map(|e| j.tasks.get(&e.key).map(|t| (e, t)))
            .collect();
        let index: HashMap<&str, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, (e, _))| (e.key.as_str(), i))
            .collect();
        // The engine of the job's cluster checks the tasks it will be given.
        let engine = match (&j.cluster, &j.new_cluster) {
            (Some(name), _) => match parts.clusters.get(name) {
                Lookup::Found(c) => Some(c.value.engine_kind()),
                _ => None,
            },
            (None, Some(c)) => Some(c.engine_kind()),
            (None, None) => None,
        }
        .and_then(|kind| crate::registry::Registry::global().engine(kind));
        let mut edges: Vec<Vec<(usize, Span)>> = vec![Vec::new(); tasks.len()];
        for (i, (e, t)) in tasks.iter().enumerate() {
            self.name("task", e);
            let task_what = format!("task `{}` of {what}", e.key);
            self.task(t, &e.value, e.key_span, &task_what);
            if let Some(engine) = engine
                && let Err(problem) = engine.check_task(t)
            {
                self.error(e.key_span, format!("{task_what}: {problem}"));
            }
            let deps = e.value.get("depends_on");
            let spans: Vec<Span> = match deps.map(|d| &d.kind) {
                Some(Kind::Seq(items)) => items.iter().map(|n| n.span).collect(),
                _ => Vec::new(),
            };
            for (k, dep) in t.depends_on.iter().enumerate() {
                let span = spans.get(k).copied().unwrap_or(e.key_span);
                match index.get(dep.as_str()) {
                    Some(&d) => edges[i].push((d, span)),
                    None => {
                        let names: Vec<&str> = tasks.iter().map(|(e, _)| e.key.as_str()).collect();
                        let msg = unknown_name(
                            &format!(
                                "unknown task `{dep}` in `depends_on` of task `{}` of {what}",
                                e.key
                            ),
                            dep,
                            &names,
                            "tasks of this job",
                            "",
                        );
                        self.error(span, msg);
                    }
                }
            }
        }
        let names: Vec<&str> = tasks.iter().map(|(e, _)| e.key.as_str()).collect();
        for (span, cycle) in find_cycles(&edges) {
            let path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
            self.error(
                span,
                format!("cycle in `depends_on` of {what}: {}", path.join(" -> ")),
            );
        }
    }

    fn task(&mut self, t: &Task, node: &Node, at: Span, what: &str) {
        let set = [
            ("command", t.command.is_some()),
            ("map", t.map.is_some()),
            ("spark", t.spark.is_some()),
        ];
        self.one_of(node, at, what, &set, false);
        if let (Some(s), Some(sn)) = (&t.spark, node.get("spark")) {
            self.spark_task(s, sn, what);
        }
        if t.reduce.is_some() && t.map.is_none() {
            self.error(
                key_span(node, "reduce"),
                format!("`reduce` in {what} needs a `map`"),
            );
        }
        match t.output.as_deref() {
            Some(o) if motorpool_storage::is_data_url(o) => {
                if let Err(e) = motorpool_storage::DataUrl::parse_output(o) {
                    self.error(
                        value_span(node, "output"),
                        format!("`output` of {what}: {e}"),
                    );
                }
            }
            Some(output) => self.job_path(
                output,
                value_span(node, "output"),
                &format!("the output of {what}"),
            ),
            None => {}
        }
        if let (Some(m), Some(mn)) = (&t.map, node.get("map")) {
            let mwhat = format!("the map of {what}");
            if !motorpool_storage::is_data_url(&m.input) {
                self.job_path(
                    &m.input,
                    value_span(mn, "input"),
                    &format!("the input of {what}"),
                );
            }
            let set = [
                ("command", m.command.is_some()),
                ("python", m.python.is_some()),
            ];
            self.one_of(mn, key_span(node, "map"), &mwhat, &set, false);
            if motorpool_storage::is_data_url(&m.input)
                && let Err(e) = motorpool_storage::DataUrl::parse(&m.input)
            {
                self.error(value_span(mn, "input"), format!("`input` of {mwhat}: {e}"));
            }
            self.positive(m.partitions, mn, "partitions", &mwhat);
            self.positive(m.partition_mb, mn, "partition_mb", &mwhat);
            if m.partitions.is_some() && m.partition_mb.is_some() {
                self.error(
                    key_span(mn, "partition_mb"),
                    format!("{mwhat} sets both `partitions` and `partition_mb`; choose one"),
                );
            }
        }
        if let (Some(r), Some(rn)) = (&t.reduce, node.get("reduce")) {
            let rwhat = format!("the reduce of {what}");
            let set = [
                ("command", r.command.is_some()),
                ("python", r.python.is_some()),
            ];
            self.one_of(rn, key_span(node, "reduce"), &rwhat, &set, false);
            self.positive(r.partitions, rn, "partitions", &rwhat);
            if let (Some(p), Some(pn)) = (&r.python, rn.get("python"))
                && p.per.is_some()
            {
                self.error(
                    key_span(pn, "per"),
                    format!(
                        "`per` in the python of {rwhat}: a reduce function folds two values; \
                         only a map's function takes a record or a partition"
                    ),
                );
            }
        }
    }

    fn positive(&mut self, v: Option<u32>, node: &Node, key: &str, what: &str) {
        if v == Some(0) {
            self.error(
                value_span(node, key),
                format!("`{key}` of {what} must be at least 1"),
            );
        }
    }
}

/// Every cycle of a dependency graph (one per strongly connected component),
/// as the span of its first edge and the path around it ("a -> b -> a").
fn find_cycles(edges: &[Vec<(usize, Span)>]) -> Vec<(Span, Vec<usize>)> {
    let n = edges.len();
    // Tarjan's algorithm, iterative.
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut comp = vec![usize::MAX; n];
    let mut comps: Vec<Vec<usize>> = Vec::new();
    let mut next = 0usize;
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        let mut call: Vec<(usize, usize)> = vec![(start, 0)];
        index[start] = next;
        low[start] = next;
        next += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut ei)) = call.last_mut() {
            if let Some(&(w, _)) = edges[v].get(*ei) {
                *ei += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                call.pop();
                if let Some(&(parent, _)) = call.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut members = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        comp[w] = comps.len();
                        members.push(w);
                        if w == v {
                            break;
                        }
                    }
                    comps.push(members);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (ci, members) in comps.iter().enumerate() {
        let Some(&s) = members.iter().min() else {
            continue;
        };
        let self_loop = edges[s].iter().find(|(w, _)| *w == s);
        if members.len() == 1 {
            if let Some(&(_, span)) = self_loop {
                out.push((span, vec![s, s]));
            }
            continue;
        }
        // Shortest way back to `s` inside the component (breadth first).
        let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([s]);
        let mut found = false;
        while let Some(v) = queue.pop_front() {
            for &(w, _) in &edges[v] {
                if comp[w] != ci {
                    continue;
                }
                if w == s {
                    prev.insert(usize::MAX, v);
                    found = true;
                    break;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(w) {
                    e.insert(v);
                    queue.push_back(w);
                }
            }
            if found {
                break;
            }
        }
        if !found {
            continue;
        }
        let mut path = vec![s];
        let mut v = prev.get(&usize::MAX).copied().unwrap_or(s);
        let mut guard = 0;
        while v != s && guard <= n {
            path.push(v);
            v = prev.get(&v).copied().unwrap_or(s);
            guard += 1;
        }
        path.push(s);
        let last = path.len() - 1;
        path[1..last].reverse();
        let first = path.get(1).copied().unwrap_or(s);
        let span = edges[s]
            .iter()
            .find(|(w, _)| *w == first)
            .map(|(_, sp)| *sp);
        if let Some(span) = span {
            out.push((span, path));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn runtime_settings_are_checked() {
        use super::{check_runtime_url, check_sha256};
        assert!(check_runtime_url("https://example.com/motorpool").is_ok());
        assert!(check_runtime_url("ftp://example.com/motorpool").is_err());
        assert!(check_runtime_url("https://example.com/a b").is_err());
        assert!(check_sha256(&"ab".repeat(32)).is_ok());
        assert!(check_sha256("abc").is_err());
    }

    use super::*;

    fn sp(i: u32) -> Span {
        Span {
            file: 0,
            line: i,
            col: 1,
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("etl"));
        assert!(is_valid_name("a"));
        assert!(is_valid_name("small-only"));
        assert!(is_valid_name("0x"));
        assert!(!is_valid_name("Etl"));
        assert!(!is_valid_name("-a"));
        assert!(!is_valid_name("a-"));
        assert!(!is_valid_name("a_b"));
        assert!(!is_valid_name(""));
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(&"a".repeat(64)));
    }

    #[test]
    fn cycles_are_named() {
        // 0 -> 1 -> 2 -> 0, 3 -> 3, 4 -> 0
        let edges = vec![
            vec![(1, sp(1))],
            vec![(2, sp(2))],
            vec![(0, sp(3))],
            vec![(3, sp(4))],
            vec![(0, sp(5))],
        ];
        let mut c = find_cycles(&edges);
        c.sort_by_key(|(s, _)| *s);
        assert_eq!(c, vec![(sp(1), vec![0, 1, 2, 0]), (sp(4), vec![3, 3])]);
        assert!(find_cycles(&[vec![(1, sp(1))], vec![]]).is_empty());
    }

    #[test]
    fn long_chains_do_not_overflow() {
        let n = 100_000;
        let mut edges: Vec<Vec<(usize, Span)>> = (0..n).map(|i| vec![(i + 1, sp(1))]).collect();
        edges[n - 1] = vec![(0, sp(2))];
        let c = find_cycles(&edges);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1.len(), n + 1);
    }
}
