//! The JSON Schema of the spec (generated from the Rust types by schemars),
//! a validator that checks a spanned tree against it and reports every
//! problem with its position, and the editor flavour of the schema written
//! to `specs/motorpool.schema.json`.
//!
//! The validator understands what schemars emits for the model: `$ref` into
//! `$defs`, `type` (a name or a list), `properties`, `additionalProperties`,
//! `required`, `items`, `const`, `enum`, `anyOf`/`oneOf` (nullable options,
//! unit enums as lists of consts, and internally tagged enums selected by a
//! const discriminator such as the provider's `kind`), `minimum`/`maximum`
//! and integer `format`s (`uint32` means 0..=4294967295).

use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::diag::Span;
use super::model::Spec;
use super::yaml::{Kind, Node};

/// The pattern a variable reference matches, as accepted by the editor schema.
pub const VAR_REF_PATTERN: &str = r"^\$\{var\.[A-Za-z_][A-Za-z0-9_-]*\}$";

/// The schema generated from [`Spec`] (draft 2020-12), with the provider
/// block made of the registered providers' own schemas.
pub fn spec_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let schema = schemars::schema_for!(Spec);
        let mut schema = serde_json::to_value(&schema).unwrap_or(Value::Bool(true));
        compose_provider_block(&mut schema, crate::registry::Registry::global());
        schema
    })
}

/// Replaces the `ProviderBlock` placeholder with one branch per provider,
/// selected by its `kind` (as schemars writes an internally tagged enum):
/// the provider's own settings schema, plus `kind` and the shared settings
/// that apply to it. A provider's own `$defs` join the spec's.
fn compose_provider_block(schema: &mut Value, registry: &crate::registry::Registry) {
    let shared = serde_json::to_value(schemars::schema_for!(super::model::SharedProviderSettings))
        .ok()
        .and_then(|s| s.get("properties").cloned())
        .and_then(|p| p.as_object().cloned())
        .unwrap_or_default();
    let mut branches = Vec::new();
    let mut more_defs = Map::new();
    for plugin in registry.providers() {
        let Value::Object(mut branch) = plugin.settings_schema() else {
            continue;
        };
        // The provider's own types, under names of its own (`aws_Tags`),
        // so that two providers' `$defs` never take each other's place.
        if let Some(Value::Object(defs)) = branch.remove("$defs") {
            let renamed: Vec<(String, String)> = defs
                .keys()
                .map(|name| (name.clone(), format!("{}_{name}", plugin.kind())))
                .collect();
            let mut defs = Value::Object(defs);
            let mut body = Value::Object(std::mem::take(&mut branch));
            for (old, new) in &renamed {
                rename_ref(&mut defs, old, new);
                rename_ref(&mut body, old, new);
            }
            if let Value::Object(body) = body {
                branch = body;
            }
            if let Value::Object(defs) = defs {
                for (old, new) in renamed {
                    if let Some(def) = defs.get(&old) {
                        more_defs.insert(new, def.clone());
                    }
                }
            }
        }
        branch.remove("$schema");
        branch.remove("title");
        branch.insert("type".into(), Value::String("object".into()));
        branch.insert("additionalProperties".into(), Value::Bool(false));
        branch.insert(
            "description".into(),
            Value::String(plugin.description().to_string()),
        );
        let properties = branch
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(properties) = properties {
            properties.insert(
                "kind".into(),
                serde_json::json!({ "type": "string", "const": plugin.kind() }),
            );
            let runtime = plugin.capabilities().needs_runtime_download();
            for (key, property) in &shared {
                let runtime_key =
                    super::model::SharedProviderSettings::RUNTIME_KEYS.contains(&key.as_str());
                if runtime || !runtime_key {
                    properties.insert(key.clone(), property.clone());
                }
            }
        }
        let required = branch
            .entry("required")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(required) = required {
            required.insert(0, Value::String("kind".into()));
        }
        branches.push(Value::Object(branch));
    }
    if let Some(Value::Object(defs)) = schema.get_mut("$defs") {
        defs.extend(more_defs);
        defs.insert(
            "ProviderBlock".into(),
            serde_json::json!({
                "description": "The provider and its own settings, selected by `kind`.",
                "oneOf": branches,
            }),
        );
    }
}

/// The schema for editors (`specs/motorpool.schema.json`): the generated
/// schema, where every integer, number and boolean also accepts a variable
/// reference such as `${var.workers}`.
pub fn editor_schema() -> Value {
    let mut schema = spec_schema().clone();
    allow_var_refs(&mut schema);
    if let Value::Object(root) = &mut schema {
        root.insert(
            "title".to_string(),
            Value::String("motorpool spec".to_string()),
        );
        let defs = root
            .entry("$defs")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(defs) = defs {
            defs.insert(
                "VarRef".to_string(),
                serde_json::json!({
                    "description": "A variable reference, `${var.NAME}`: replaced by the variable's value, with its type.",
                    "type": "string",
                    "pattern": VAR_REF_PATTERN,
                }),
            );
        }
    }
    schema
}

/// Every `$ref` to `#/$defs/{old}` in `schema` made to point at `{new}`.
fn rename_ref(schema: &mut Value, old: &str, new: &str) {
    let target = format!("#/$defs/{old}");
    match schema {
        Value::Object(obj) => {
            for (key, child) in obj.iter_mut() {
                if key == "$ref" && child.as_str() == Some(target.as_str()) {
                    *child = Value::String(format!("#/$defs/{new}"));
                } else {
                    rename_ref(child, old, new);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rename_ref(i, old, new)),
        _ => {}
    }
}

fn allow_var_refs(schema: &mut Value) {
    match schema {
        Value::Object(obj) => {
            for (key, child) in obj.iter_mut() {
                // `const`, `enum` and `default` hold values, not schemas.
                if key != "const" && key != "enum" && key != "default" {
                    allow_var_refs(child);
                }
            }
            let typed = match obj.get("type") {
                Some(Value::String(t)) => is_scalar_type(t),
                Some(Value::Array(ts)) => ts.iter().any(|t| t.as_str().is_some_and(is_scalar_type)),
                _ => false,
            };
            if typed {
                let mut inner = std::mem::take(obj);
                let mut outer = Map::new();
                for annotation in ["description", "default", "title"] {
                    if let Some(v) = inner.remove(annotation) {
                        outer.insert(annotation.to_string(), v);
                    }
                }
                outer.insert(
                    "anyOf".to_string(),
                    Value::Array(vec![
                        Value::Object(inner),
                        serde_json::json!({ "$ref": "#/$defs/VarRef" }),
                    ]),
                );
                *obj = outer;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(allow_var_refs),
        _ => {}
    }
}

fn is_scalar_type(t: &str) -> bool {
    matches!(t, "integer" | "number" | "boolean")
}

/// One step of the path to a value: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A problem found by the validator.
#[derive(Debug, Clone)]
pub(crate) struct Issue {
    pub span: Span,
    pub message: String,
    /// Where the problem is (to know which resource is broken).
    pub path: Vec<Seg>,
    /// Already reported elsewhere (an invalid value): marks the resource
    /// broken without a message.
    pub silent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Ok,
    /// The value's own type does not match (a string where a mapping goes).
    WrongType,
    /// The type matches but something inside does not.
    Bad,
}

/// Describes the resource a path is in, and the rest of the path.
fn resource(path: &[Seg]) -> (Option<String>, &[Seg]) {
    use Seg::Key;
    match path {
        [Key(s), Key(j), Key(t), Key(task), rest @ ..] if s == "jobs" && t == "tasks" => {
            (Some(format!("task `{task}` of job `{j}`")), rest)
        }
        [Key(s), Key(j), Key(c), rest @ ..] if s == "jobs" && c == "new_cluster" => {
            (Some(format!("the new_cluster of job `{j}`")), rest)
        }
        [Key(s), Key(name), rest @ ..] => {
            let what = match s.as_str() {
                "pools" => "pool",
                "clusters" => "cluster",
                "policies" => "policy",
                "jobs" => "job",
                "variables" => "variable",
                "targets" => "target",
                _ => return (None, path),
            };
            (Some(format!("{what} `{name}`")), rest)
        }
        _ => (None, path),
    }
}

fn dotted(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// "`workers` in cluster `etl`", "pool `general`", "`project`", "the spec".
pub(crate) fn describe_path(path: &[Seg]) -> String {
    match resource(path) {
        (Some(r), []) => r,
        (Some(r), rest) => format!("`{}` in {}", dotted(rest), r),
        (None, []) => "the spec".to_string(),
        (None, rest) => format!("`{}`", dotted(rest)),
    }
}

/// The closest of `candidates` to `word`, when close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = match word.chars().count() {
        0..=3 => 1,
        4..=8 => 2,
        _ => 3,
    };
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            let d = if c.to_lowercase() == lower {
                0
            } else {
                osa_distance(word, c)
            };
            (d, c)
        })
        .filter(|(d, c)| *d <= limit && *d < c.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A list of names for a message, cut short when long.
pub(crate) fn name_list(names: &[&str]) -> String {
    const MAX: usize = 12;
    if names.len() <= MAX {
        names.join(", ")
    } else {
        format!("{}, ... ({} in all)", names[..MAX].join(", "), names.len())
    }
}

/// `head`, then ", did you mean `x`?" for a likely typo, then
/// " ({label}: a, b)" (or " ({none})" when there are no names).
pub(crate) fn unknown_name(
    head: &str,
    word: &str,
    known: &[&str],
    label: &str,
    none: &str,
) -> String {
    let mut msg = head.to_string();
    if let Some(d) = did_you_mean(word, known.iter().copied()) {
        msg.push_str(&format!(", did you mean `{d}`?"));
    }
    if known.is_empty() {
        if !none.is_empty() {
            msg.push_str(&format!(" ({none})"));
        }
    } else {
        msg.push_str(&format!(" ({label}: {})", name_list(known)));
    }
    msg
}

/// Optimal string alignment distance (Levenshtein plus transpositions).
fn osa_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > 3 {
        return a.len().abs_diff(b.len());
    }
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

fn type_phrase(t: &str) -> &'static str {
    match t {
        "integer" => "an integer",
        "number" => "a number",
        "string" => "a string",
        "boolean" => "true or false",
        "object" => "a mapping",
        "array" => "a list",
        "null" => "nothing",
        _ => "a value",
    }
}

fn node_matches_type(node: &Node, t: &str) -> bool {
    matches!(
        (&node.kind, t),
        (Kind::Null, "null")
            | (Kind::Bool(..), "boolean")
            | (Kind::Int(..), "integer" | "number")
            | (Kind::Float(..), "number")
            | (Kind::Str(_), "string")
            | (Kind::Seq(_), "array")
            | (Kind::Map(_), "object")
    )
}

/// Bounds of an integer `format` as schemars writes it.
fn format_bounds(format: &str) -> Option<(i128, i128)> {
    Some(match format {
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" | "uint" => (0, u32::MAX.into()),
        "uint64" => (0, u64::MAX.into()),
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "int32" | "int" => (i32::MIN.into(), i32::MAX.into()),
        "int64" => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    })
}

fn json_bound(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

fn json_eq(node: &Node, v: &Value) -> bool {
    match (&node.kind, v) {
        (Kind::Str(s), Value::String(c)) => s == c,
        (Kind::Bool(b, _), Value::Bool(c)) => b == c,
        (Kind::Int(i, _), Value::Number(n)) => {
            n.as_i64().map(i128::from) == Some(*i) || n.as_u64().map(i128::from) == Some(*i)
        }
        (Kind::Float(f, _), Value::Number(n)) => n.as_f64() == Some(*f),
        (Kind::Null, Value::Null) => true,
        _ => false,
    }
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Validates spanned trees against a JSON Schema, collecting every problem.
pub(crate) struct Validator<'s> {
    root: &'s Value,
}

impl<'s> Validator<'s> {
    pub fn new(root: &'s Value) -> Self {
        Validator { root }
    }

    /// Checks `node` against the root schema. Plain scalars standing where
    /// only a string goes become strings (`runtime: 1` is "1").
    pub fn validate(&self, node: &mut Node) -> Vec<Issue> {
        let mut out = Vec::new();
        let mut path = Vec::new();
        self.check(self.root, node, None, &mut path, &mut out, true);
        out
    }

    fn resolve(&self, reference: &str) -> Option<&'s Value> {
        let pointer = reference.strip_prefix('#')?;
        self.root.pointer(pointer)
    }

    /// Follows `$ref`s to the schema object that says what a value is.
    fn target(&self, mut schema: &'s Value) -> &'s Value {
        for _ in 0..16 {
            match schema.get("$ref").and_then(Value::as_str) {
                Some(r) => match self.resolve(r) {
                    Some(t) => schema = t,
                    None => return schema,
                },
                None => return schema,
            }
        }
        schema
    }

    fn issue(out: &mut Vec<Issue>, span: Span, path: &[Seg], message: String) {
        out.push(Issue {
            span,
            message,
            path: path.to_vec(),
            silent: false,
        });
    }

    /// What a value is, for messages; a variable's value is never shown (it
    /// may be a secret given with `--var`), only its kind and name.
    fn found(node: &Node) -> String {
        match &node.var {
            Some(var) => format!("{} (from `${{var.{var}}}`)", node.describe_kind()),
            None => node.describe(),
        }
    }

    fn check(
        &self,
        schema: &'s Value,
        node: &mut Node,
        key_span: Option<Span>,
        path: &mut Vec<Seg>,
        out: &mut Vec<Issue>,
        apply: bool,
    ) -> Fit {
        if matches!(node.kind, Kind::Invalid) {
            out.push(Issue {
                span: node.span,
                message: String::new(),
                path: path.clone(),
                silent: true,
            });
            return Fit::Ok;
        }
        let obj = match schema {
            Value::Object(o) => o,
            Value::Bool(false) => {
                Self::issue(
                    out,
                    node.span,
                    path,
                    format!("no value is allowed for {}", describe_path(path)),
                );
                return Fit::Bad;
            }
            _ => return Fit::Ok,
        };
        let mut fit = Fit::Ok;
        if let Some(r) = obj.get("$ref").and_then(Value::as_str)
            && let Some(t) = self.resolve(r)
        {
            let f = self.check(t, node, key_span, path, out, apply);
            if f != Fit::Ok {
                return f;
            }
        }
        for alternatives in ["anyOf", "oneOf"] {
            if let Some(Value::Array(branches)) = obj.get(alternatives) {
                let f = self.alternatives(branches, node, key_span, path, out, apply);
                if f != Fit::Ok {
                    return f;
                }
            }
        }
        if let Some(Value::Array(all)) = obj.get("allOf") {
            for s in all {
                let f = self.check(s, node, key_span, path, out, apply);
                if f != Fit::Ok {
                    return f;
                }
            }
        }
        if let Some(c) = obj.get("const")
            && !json_eq(node, c)
        {
            Self::issue(
                out,
                node.span,
                path,
                format!(
                    "expected `{}`, found {} for {}",
                    json_text(c),
                    Self::found(node),
                    describe_path(path)
                ),
            );
            return Fit::Bad;
        }
        if let Some(Value::Array(values)) = obj.get("enum")
            && !values.iter().any(|v| json_eq(node, v))
        {
            let allowed: Vec<String> = values.iter().map(json_text).collect();
            self.enum_issue(node, &allowed, path, out);
            return Fit::Bad;
        }
        if let Some(t) = obj.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !types.is_empty() && !types.iter().any(|t| node_matches_type(node, t)) {
                let coercible = types.contains(&"string")
                    && matches!(node.kind, Kind::Bool(..) | Kind::Int(..) | Kind::Float(..))
                    && obj.get(super::model::TEXT_ONLY) != Some(&Value::Bool(true));
                if coercible {
                    if apply {
                        let text = node.scalar_text().unwrap_or_default();
                        node.kind = Kind::Str(text);
                    }
                } else {
                    let mut wanted: Vec<&str> = types
                        .iter()
                        .copied()
                        .filter(|t| *t != "null")
                        .map(type_phrase)
                        .collect();
                    if wanted.is_empty() {
                        wanted.push("nothing");
                    }
                    Self::issue(
                        out,
                        node.span,
                        path,
                        format!(
                            "expected {}, found {} for {}",
                            wanted.join(" or "),
                            Self::found(node),
                            describe_path(path)
                        ),
                    );
                    return Fit::WrongType;
                }
            }
        }
        match &mut node.kind {
            Kind::Int(v, _) => {
                let v = *v;
                let (mut lo, mut hi) = obj
                    .get("format")
                    .and_then(Value::as_str)
                    .and_then(format_bounds)
                    .map(|(lo, hi)| (Some(lo), Some(hi)))
                    .unwrap_or((None, None));
                if let Some(m) = json_bound(obj.get("minimum")) {
                    let m = m.ceil() as i128;
                    lo = Some(lo.map_or(m, |l| l.max(m)));
                }
                if let Some(m) = json_bound(obj.get("maximum")) {
                    let m = m.floor() as i128;
                    hi = Some(hi.map_or(m, |h| h.min(m)));
                }
                let what = describe_path(path);
                if let Some(lo) = lo.filter(|lo| v < *lo) {
                    let msg = if lo == 0 {
                        format!("expected a non-negative integer, found {v} for {what}")
                    } else {
                        format!("expected at least {lo}, found {v} for {what}")
                    };
                    Self::issue(out, node.span, path, msg);
                    fit = Fit::Bad;
                } else if let Some(hi) = hi.filter(|hi| v > *hi) {
                    Self::issue(
                        out,
                        node.span,
                        path,
                        format!("{v} is too large for {what} (at most {hi})"),
                    );
                    fit = Fit::Bad;
                }
            }
            Kind::Float(v, raw) => {
                let v = *v;
                let what = describe_path(path);
                if !v.is_finite() {
                    let msg = format!("expected a finite number, found {raw} for {what}");
                    Self::issue(out, node.span, path, msg);
                    fit = Fit::Bad;
                } else if let Some(m) = json_bound(obj.get("minimum")).filter(|m| v < *m) {
                    Self::issue(
                        out,
                        node.span,
                        path,
                        format!("expected at least {m}, found {v} for {what}"),
                    );
                    fit = Fit::Bad;
                } else if let Some(m) = json_bound(obj.get("maximum")).filter(|m| v > *m) {
                    Self::issue(
                        out,
                        node.span,
                        path,
                        format!("expected at most {m}, found {v} for {what}"),
                    );
                    fit = Fit::Bad;
                }
            }
            Kind::Map(entries) => {
                let props = obj.get("properties").and_then(Value::as_object);
                let additional = obj.get("additionalProperties");
                for e in entries.iter_mut() {
                    let sub = props.and_then(|p| p.get(&e.key));
                    let sub = match (sub, additional) {
                        (Some(s), _) => s,
                        (None, Some(Value::Bool(false))) => {
                            let known: Vec<&str> = props
                                .map(|p| p.keys().map(String::as_str).collect())
                                .unwrap_or_default();
                            let owner = match describe_path(path).as_str() {
                                "the spec" => "at the top level of the spec".to_string(),
                                d => format!("in {d}"),
                            };
                            let msg = match did_you_mean(&e.key, known.iter().copied()) {
                                Some(s) => format!(
                                    "unknown field `{}` {}, did you mean `{}`?",
                                    e.key, owner, s
                                ),
                                None if known.is_empty() => {
                                    format!("unknown field `{}` {}", e.key, owner)
                                }
                                None => format!(
                                    "unknown field `{}` {}; expected one of: {}",
                                    e.key,
                                    owner,
                                    known.join(", ")
                                ),
                            };
                            Self::issue(out, e.key_span, path, msg);
                            fit = Fit::Bad;
                            continue;
                        }
                        (None, Some(s)) => s,
                        (None, None) => continue,
                    };
                    path.push(Seg::Key(e.key.clone()));
                    if self.check(sub, &mut e.value, Some(e.key_span), path, out, apply) != Fit::Ok
                    {
                        fit = Fit::Bad;
                    }
                    path.pop();
                }
                if let Some(Value::Array(required)) = obj.get("required") {
                    for r in required.iter().filter_map(Value::as_str) {
                        if !entries.iter().any(|e| e.key == r) {
                            let owner = match describe_path(path).as_str() {
                                "the spec" => "at the top level of the spec".to_string(),
                                d => format!("in {d}"),
                            };
                            Self::issue(
                                out,
                                key_span.unwrap_or(node.span),
                                path,
                                format!("missing field `{r}` {owner}"),
                            );
                            fit = Fit::Bad;
                        }
                    }
                }
            }
            Kind::Seq(items) => {
                if let Some(item_schema) = obj.get("items") {
                    for (i, item) in items.iter_mut().enumerate() {
                        path.push(Seg::Index(i));
                        if self.check(item_schema, item, None, path, out, apply) != Fit::Ok {
                            fit = Fit::Bad;
                        }
                        path.pop();
                    }
                }
            }
            _ => {}
        }
        fit
    }

    fn enum_issue(&self, node: &Node, allowed: &[String], path: &[Seg], out: &mut Vec<Issue>) {
        let what = describe_path(path);
        let msg = match &node.kind {
            Kind::Str(s) => {
                let mut m = format!(
                    "unknown value `{}` for {}, expected one of: {}",
                    s,
                    what,
                    allowed.join(", ")
                );
                if let Some(d) = did_you_mean(s, allowed.iter().map(String::as_str)) {
                    m.push_str(&format!(" (did you mean `{d}`?)"));
                }
                m
            }
            _ => format!(
                "expected one of: {}, found {} for {}",
                allowed.join(", "),
                Self::found(node),
                what
            ),
        };
        Self::issue(out, node.span, path, msg);
    }

    fn alternatives(
        &self,
        branches: &'s [Value],
        node: &mut Node,
        key_span: Option<Span>,
        path: &mut Vec<Seg>,
        out: &mut Vec<Issue>,
        apply: bool,
    ) -> Fit {
        let resolved: Vec<&'s Value> = branches.iter().map(|b| self.target(b)).collect();
        let is_null = |s: &Value| s.get("type").and_then(Value::as_str) == Some("null");

        // Option<T>: `anyOf: [T, {type: null}]`.
        if resolved.iter().any(|s| is_null(s)) {
            if matches!(node.kind, Kind::Null) {
                return Fit::Ok;
            }
            let others: Vec<&'s Value> = branches
                .iter()
                .zip(&resolved)
                .filter(|(_, r)| !is_null(r))
                .map(|(b, _)| b)
                .collect();
            if let [only] = others.as_slice() {
                return self.check(only, node, key_span, path, out, apply);
            }
        }

        // A unit enum: every branch a const.
        if resolved.iter().all(|s| s.get("const").is_some()) {
            let consts: Vec<&Value> = resolved.iter().filter_map(|s| s.get("const")).collect();
            if consts.iter().any(|c| json_eq(node, c)) {
                return Fit::Ok;
            }
            let allowed: Vec<String> = consts.iter().map(|c| json_text(c)).collect();
            self.enum_issue(node, &allowed, path, out);
            return Fit::Bad;
        }

        // An internally tagged enum: every branch an object with a const tag.
        if let Some(tag) = discriminator(&resolved) {
            return self.tagged(&tag, branches, &resolved, node, key_span, path, out, apply);
        }

        // In general: the first branch that fits; else the closest one's problems.
        let mut best: Option<(Fit, Vec<Issue>)> = None;
        for branch in branches {
            let mut trial = Vec::new();
            let f = self.check(branch, node, key_span, path, &mut trial, false);
            if f == Fit::Ok {
                if apply {
                    self.check(branch, node, key_span, path, out, true);
                } else {
                    out.extend(trial);
                }
                return Fit::Ok;
            }
            let better = match &best {
                None => true,
                Some((bf, bi)) => {
                    (f != Fit::WrongType && *bf == Fit::WrongType)
                        || ((f == Fit::WrongType) == (*bf == Fit::WrongType)
                            && trial.len() < bi.len())
                }
            };
            if better {
                best = Some((f, trial));
            }
        }
        match best {
            Some((f, issues)) => {
                out.extend(issues);
                f
            }
            None => Fit::Ok,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn tagged(
        &self,
        tag: &str,
        branches: &'s [Value],
        resolved: &[&'s Value],
        node: &mut Node,
        key_span: Option<Span>,
        path: &mut Vec<Seg>,
        out: &mut Vec<Issue>,
        apply: bool,
    ) -> Fit {
        let kinds: Vec<&str> = resolved
            .iter()
            .filter_map(|s| s.pointer(&format!("/properties/{tag}/const"))?.as_str())
            .collect();
        let noun = match path.last() {
            Some(Seg::Key(k)) => k.clone(),
            _ => "value".to_string(),
        };
        let what = describe_path(path);
        if !matches!(node.kind, Kind::Map(_)) {
            Self::issue(
                out,
                node.span,
                path,
                format!(
                    "expected a mapping with `{tag}: {}`, found {} for {}",
                    kinds.join(" | "),
                    Self::found(node),
                    what
                ),
            );
            return Fit::WrongType;
        }
        let Some(tag_node) = node.get(tag) else {
            Self::issue(
                out,
                key_span.unwrap_or(node.span),
                path,
                format!(
                    "missing field `{tag}` in {what}; expected one of: {}",
                    kinds.join(", ")
                ),
            );
            return Fit::Bad;
        };
        let chosen = match &tag_node.kind {
            Kind::Str(s) => match kinds.iter().position(|k| k == s) {
                Some(i) => i,
                None => {
                    let mut msg = format!(
                        "unknown {noun} {tag} `{s}`, expected one of: {}",
                        kinds.join(", ")
                    );
                    if let Some(d) = did_you_mean(s, kinds.iter().copied()) {
                        msg.push_str(&format!(" (did you mean `{d}`?)"));
                    }
                    Self::issue(out, tag_node.span, path, msg);
                    return Fit::Bad;
                }
            },
            Kind::Invalid => return Fit::Ok,
            _ => {
                let msg = format!(
                    "expected one of: {}, found {} for `{tag}` in {what}",
                    kinds.join(", "),
                    Self::found(tag_node)
                );
                Self::issue(out, tag_node.span, path, msg);
                return Fit::Bad;
            }
        };
        let branch = branches
            .iter()
            .zip(resolved)
            .filter(|(_, r)| r.pointer(&format!("/properties/{tag}/const")).is_some())
            .nth(chosen)
            .map(|(b, _)| b);
        match branch {
            Some(b) => self.check(b, node, key_span, path, out, apply),
            None => Fit::Ok,
        }
    }
}

/// The property every branch fixes with a string const (`kind`), if any.
fn discriminator(branches: &[&Value]) -> Option<String> {
    let first = branches.first()?.get("properties")?.as_object()?;
    first
        .iter()
        .filter(|(_, s)| s.get("const").and_then(Value::as_str).is_some())
        .map(|(k, _)| k)
        .find(|k| {
            branches.iter().all(|b| {
                b.pointer(&format!("/properties/{k}/const"))
                    .and_then(Value::as_str)
                    .is_some()
            })
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::diag::Sink;
    use crate::spec::yaml::parse;

    fn issues(text: &str) -> Vec<(u32, u32, String)> {
        let mut sink = Sink::default();
        let f = sink.add_file("t.yaml".into());
        let mut node = parse(text, f, &mut sink).expect("valid yaml");
        assert!(sink.diags.is_empty());
        let v = Validator::new(spec_schema());
        v.validate(&mut node)
            .into_iter()
            .filter(|i| !i.silent)
            .map(|i| (i.span.line, i.span.col, i.message))
            .collect()
    }

    #[test]
    fn a_valid_tree_has_no_issues() {
        let text = "project: p\nprovider: { kind: sim, throttle_rate: 0.1 }\npools:\n  general: { node_type: small, max_capacity: 10, warm: stopped }\nclusters:\n  etl: { pool: general, workers: 2, runtime: 1 }\n";
        assert_eq!(issues(text), vec![]);
    }

    #[test]
    fn unknown_fields_suggest_the_closest() {
        let got = issues("project: p\npools:\n  general:\n    max_capacity: 3\n    min_idel: 2\n");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (5, 5));
        assert_eq!(
            got[0].2,
            "unknown field `min_idel` in pool `general`, did you mean `min_idle`?"
        );
        let got = issues("project: p\nfoo: 1\n");
        assert!(got[0].2.contains("unknown field `foo` at the top level"));
        assert!(got[0].2.contains("expected one of: clusters, include"));
    }

    #[test]
    fn wrong_types_and_ranges() {
        let got = issues(
            "project: p\nclusters:\n  a: { node_type: small, workers: many }\n  b: { node_type: small, workers: -1 }\n  c: { node_type: small, workers: 5000000000 }\n  d: { node_type: small, workers: 1.5 }\n",
        );
        let msgs: Vec<&str> = got.iter().map(|g| g.2.as_str()).collect();
        assert!(
            msgs[0].starts_with(
                "expected an integer, found a string (\"many\") for `workers` in cluster `a`"
            ),
            "{msgs:?}"
        );
        assert!(msgs[1].contains("expected a non-negative integer, found -1"));
        assert!(
            msgs[2].contains(
                "5000000000 is too large for `workers` in cluster `c` (at most 4294967295)"
            )
        );
        assert!(msgs[3].contains("expected an integer, found a number (1.5)"));
    }

    #[test]
    fn missing_required_fields_point_at_the_key() {
        let got = issues("project: p\npools:\n  general:\n    node_type: small\n");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (3, 3));
        assert_eq!(got[0].2, "missing field `max_capacity` in pool `general`");
    }

    #[test]
    fn enums_list_their_values() {
        let got =
            issues("project: p\npools:\n  g: { node_type: small, max_capacity: 1, warm: hot }\n");
        assert_eq!(
            got[0].2,
            "unknown value `hot` for `warm` in pool `g`, expected one of: running, stopped"
        );
    }

    #[test]
    fn the_provider_is_chosen_by_kind() {
        let got = issues("project: p\nprovider: { kind: openstack }\n");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].2.starts_with(
                "unknown provider kind `openstack`, expected one of: local, sim, aws, gcp"
            ),
            "{}",
            got[0].2
        );
        assert_eq!((got[0].0, got[0].1), (2, 19));
        let got = issues("project: p\nprovider: { kind: local, latency_ms: 3 }\n");
        assert!(
            got[0]
                .2
                .contains("unknown field `latency_ms` in `provider`"),
            "{got:?}"
        );
        let got = issues("project: p\nprovider: { page_size: 3 }\n");
        assert!(
            got[0]
                .2
                .contains("missing field `kind` in `provider`; expected one of: local, sim")
        );
        let got = issues("project: p\nprovider: { kind: sim, error_rate: .nan }\n");
        assert!(got[0].2.contains("expected a finite number"));
    }

    #[test]
    fn options_accept_null_and_lists_check_items() {
        let got =
            issues("project: p\nclusters:\n  a: { node_type: ~, init_scripts: [a, {b: 1}] }\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].2.contains(
                "expected a string, found a mapping for `init_scripts[1]` in cluster `a`"
            )
        );
    }

    #[test]
    fn plain_scalars_become_strings_where_strings_go() {
        let mut sink = Sink::default();
        let f = sink.add_file("t.yaml".into());
        let mut node = parse(
            "project: 123\nclusters: { a: { runtime: 1.10, env: { X: true } } }\n",
            f,
            &mut sink,
        )
        .unwrap();
        let issues = Validator::new(spec_schema()).validate(&mut node);
        assert!(issues.is_empty());
        assert_eq!(node.get("project").unwrap().as_str(), Some("123"));
        let a = node.get("clusters").unwrap().get("a").unwrap();
        assert_eq!(a.get("runtime").unwrap().as_str(), Some("1.10"));
        assert_eq!(
            a.get("env").unwrap().get("X").unwrap().as_str(),
            Some("true")
        );
    }

    #[test]
    fn did_you_mean_is_conservative() {
        assert_eq!(
            did_you_mean("min_idel", ["min_idle", "max_capacity"]),
            Some("min_idle")
        );
        assert_eq!(did_you_mean("genral", ["general"]), Some("general"));
        assert_eq!(did_you_mean("zzz", ["general"]), None);
        assert_eq!(did_you_mean("x", ["y"]), None);
    }

    #[test]
    fn the_editor_schema_accepts_var_refs_for_scalars() {
        let s = editor_schema();
        let workers = s.pointer("/$defs/Cluster/properties/workers").unwrap();
        let any = workers.get("anyOf").unwrap().as_array().unwrap();
        assert_eq!(any[1], serde_json::json!({"$ref": "#/$defs/VarRef"}));
        assert_eq!(any[0].get("format").unwrap(), "uint32");
        assert!(workers.get("description").is_some());
        assert_eq!(s.pointer("/$defs/VarRef/pattern").unwrap(), VAR_REF_PATTERN);
        // Strings are untouched.
        assert_eq!(
            s.pointer("/$defs/Cluster/properties/pool/type").unwrap(),
            &serde_json::json!(["string", "null"])
        );
    }
}
