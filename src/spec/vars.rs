//! Targets and variables: `--target T` overrides, then `${var.NAME}`
//! substituted everywhere in the spec's values.
//!
//! A value that is exactly `${var.x}` takes the variable's value with its
//! type (`workers: ${var.workers}` is an integer); inside a longer string
//! the value is interpolated as text. `$${` is a literal `${`.

use std::collections::HashMap;

use super::LoadOptions;
use super::diag::{Sink, Span};
use super::schema::unknown_name;
use super::yaml::{Entry, Kind, Node, resolve_plain};

/// Sections that are not substituted: they define the variables.
const NOT_SUBSTITUTED: [&str; 3] = ["variables", "targets", "include"];

/// Selects `--target`: merges its `provider` over the spec's and returns its
/// variable values. An unknown target is a command-line error.
pub(crate) fn select_target(root: &mut Node, opts: &LoadOptions, sink: &mut Sink) -> Vec<Entry> {
    let Some(name) = opts.target.as_deref() else {
        return Vec::new();
    };
    let known: Vec<String> = root
        .get("targets")
        .and_then(Node::entries)
        .map(|es| es.iter().map(|e| e.key.clone()).collect())
        .unwrap_or_default();
    let Some(target) = root
        .get("targets")
        .and_then(|t| t.entry(name))
        .map(|e| e.value.clone())
    else {
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        let msg = unknown_name(
            &format!("unknown target `{name}` (--target)"),
            name,
            &known,
            "known targets",
            "the spec defines no targets",
        );
        sink.error(Span::cmdline(), msg);
        return Vec::new();
    };
    if let Some(provider) = target.entry("provider")
        && let Some(overrides) = provider.value.entries()
    {
        merge_provider(root, provider, overrides);
    }
    target
        .get("variables")
        .and_then(Node::entries)
        .map(<[Entry]>::to_vec)
        .unwrap_or_default()
}

/// The target's provider settings, key by key over the spec's provider block
/// (which is `{kind: local}` when the spec has none).
fn merge_provider(root: &mut Node, provider: &Entry, overrides: &[Entry]) {
    let Some(entries) = root.entries_mut() else {
        return;
    };
    if !entries.iter().any(|e| e.key == "provider") {
        let span = provider.value.span;
        entries.push(Entry {
            key: "provider".to_string(),
            key_span: provider.key_span,
            value: Node::new(
                Kind::Map(vec![Entry {
                    key: "kind".to_string(),
                    key_span: span,
                    value: Node::new(Kind::Str(super::DEFAULT_PROVIDER.to_string()), span),
                }]),
                span,
            ),
        });
    }
    let Some(block) = entries
        .iter_mut()
        .find(|e| e.key == "provider")
        .and_then(|e| e.value.entries_mut())
    else {
        return; // not a mapping: the schema check reports it
    };
    for o in overrides {
        match block.iter_mut().find(|e| e.key == o.key) {
            Some(existing) => *existing = o.clone(),
            None => block.push(o.clone()),
        }
    }
}

/// `[A-Za-z_][A-Za-z0-9_-]*`
pub(crate) fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Splits a string into text and `${var.NAME}` references.
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i..];
        if after.starts_with("$${") {
            out.push(Piece::Text(&rest[..i]));
            out.push(Piece::Text("${"));
            rest = &rest[i + 3..];
        } else if let Some(body) = after.strip_prefix("${") {
            out.push(Piece::Text(&rest[..i]));
            let Some(end) = body.find('}') else {
                return Err(format!(
                    "unterminated `${{` in {}: write `${{var.NAME}}`, or `$${{` for a literal `${{`",
                    super::yaml::preview(s)
                ));
            };
            let inner = &body[..end];
            match inner.strip_prefix("var.") {
                Some(name) if is_var_name(name) => out.push(Piece::Var(name)),
                _ => {
                    return Err(format!(
                        "unsupported expression `${{{inner}}}`: only `${{var.NAME}}` is supported (write `$${{` for a literal `${{`)"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push(Piece::Text(&rest[..=i]));
            rest = &rest[i + 1..];
        }
    }
    out.push(Piece::Text(rest));
    out.retain(|p| !matches!(p, Piece::Text("")));
    Ok(out)
}

/// Whether a string uses `${...}` (not counting `$${` escapes).
fn has_reference(s: &str) -> bool {
    s.contains("${") && pieces(s).map_or(true, |ps| ps.iter().any(|p| matches!(p, Piece::Var(_))))
}

struct Vars {
    /// name -> value (`Invalid` when it has none).
    values: HashMap<String, Node>,
    names: Vec<String>,
}

/// Resolves every variable's value (default < target < `--var`) and
/// substitutes `${var.NAME}` through the spec.
pub(crate) fn apply_variables(
    root: &mut Node,
    target_vars: &[Entry],
    opts: &LoadOptions,
    sink: &mut Sink,
) {
    let mut vars = Vars {
        values: HashMap::new(),
        names: Vec::new(),
    };
    let mut declared_at: HashMap<String, Span> = HashMap::new();
    if let Some(decls) = root.get("variables").and_then(Node::entries) {
        for d in decls {
            if !is_var_name(&d.key) {
                sink.error(
                    d.key_span,
                    format!(
                        "invalid variable name `{}`: use letters, digits, `_` and `-`, starting with a letter or `_`",
                        d.key
                    ),
                );
            }
            vars.names.push(d.key.clone());
            declared_at.insert(d.key.clone(), d.key_span);
            let value = match &d.value.kind {
                Kind::Map(_) => d.value.get("default").cloned(),
                // Not a mapping: the schema check reports it.
                _ => Some(Node::new(Kind::Invalid, d.value.span)),
            };
            if let Some(v) = value {
                check_no_refs(&v, sink);
                vars.values.insert(d.key.clone(), v);
            }
        }
    }

    // Every target's variables must be declared (not only the selected one's).
    if let Some(targets) = root.get("targets").and_then(Node::entries) {
        for t in targets {
            if let Some(tv) = t.value.get("variables").and_then(Node::entries) {
                for v in tv {
                    check_no_refs(&v.value, sink);
                    if !declared_at.contains_key(&v.key) {
                        let msg = unknown_name(
                            &format!("unknown variable `{}` in target `{}`", v.key, t.key),
                            &v.key,
                            &names(&vars),
                            "declared variables",
                            "the spec declares no variables",
                        );
                        sink.error(v.key_span, msg);
                    }
                }
            }
        }
    }
    for v in target_vars {
        if declared_at.contains_key(&v.key) {
            vars.values.insert(v.key.clone(), v.value.clone());
        }
    }
    for (k, v) in &opts.vars {
        if !declared_at.contains_key(k) {
            let msg = unknown_name(
                &format!("unknown variable `{k}` (--var {k}=...)"),
                k,
                &names(&vars),
                "declared variables",
                "the spec declares no variables",
            );
            sink.error(Span::cmdline(), msg);
            continue;
        }
        let kind = if v.is_empty() {
            Kind::Str(String::new())
        } else {
            resolve_plain(v)
        };
        vars.values
            .insert(k.clone(), Node::new(kind, Span::cmdline()));
    }
    for name in &vars.names {
        if !vars.values.contains_key(name) {
            if let Some(&span) = declared_at.get(name) {
                sink.error(
                    span,
                    format!(
                        "variable `{name}` has no default and no value: set it with `--var {name}=VALUE` or in a target"
                    ),
                );
            }
            vars.values
                .insert(name.clone(), Node::new(Kind::Invalid, Span::cmdline()));
        }
    }

    if let Some(entries) = root.entries_mut() {
        for e in entries
            .iter_mut()
            .filter(|e| !NOT_SUBSTITUTED.contains(&e.key.as_str()))
        {
            substitute(&mut e.value, &vars, sink);
        }
    }
}

fn names(vars: &Vars) -> Vec<&str> {
    vars.names.iter().map(String::as_str).collect()
}

/// Variable values are plain values: they cannot refer to other variables.
fn check_no_refs(node: &Node, sink: &mut Sink) {
    match &node.kind {
        Kind::Str(s) if has_reference(s) => sink.error(
            node.span,
            "a variable's value cannot refer to variables (`${...}`)",
        ),
        Kind::Seq(items) => items.iter().for_each(|n| check_no_refs(n, sink)),
        Kind::Map(entries) => entries.iter().for_each(|e| check_no_refs(&e.value, sink)),
        _ => {}
    }
}

fn substitute(node: &mut Node, vars: &Vars, sink: &mut Sink) {
    match &mut node.kind {
        Kind::Seq(items) => items.iter_mut().for_each(|n| substitute(n, vars, sink)),
        Kind::Map(entries) => entries
            .iter_mut()
            .for_each(|e| substitute(&mut e.value, vars, sink)),
        Kind::Str(s) if s.contains('$') => {
            let span = node.span;
            let replacement = match pieces(s) {
                Err(msg) => {
                    sink.error(span, msg);
                    Node::new(Kind::Invalid, span)
                }
                Ok(ps) => match ps.as_slice() {
                    [Piece::Var(name)] => match vars.values.get(*name) {
                        Some(v) => {
                            let mut v = v.clone().relocated(span);
                            v.var = Some((*name).into());
                            v
                        }
                        None => {
                            sink.error(span, unknown_var(name, vars));
                            Node::new(Kind::Invalid, span)
                        }
                    },
                    _ => interpolate(&ps, span, vars, sink),
                },
            };
            *node = replacement;
        }
        _ => {}
    }
}

fn unknown_var(name: &str, vars: &Vars) -> String {
    unknown_name(
        &format!("unknown variable `{name}`"),
        name,
        &names(vars),
        "declared variables",
        "the spec declares no variables; declare it under `variables:`",
    )
}

fn interpolate(ps: &[Piece<'_>], span: Span, vars: &Vars, sink: &mut Sink) -> Node {
    let mut out = String::new();
    let mut ok = true;
    for p in ps {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(name) => match vars.values.get(*name) {
                None => {
                    sink.error(span, unknown_var(name, vars));
                    ok = false;
                }
                Some(v) => match (&v.kind, v.scalar_text()) {
                    (Kind::Invalid, _) => ok = false,
                    (_, Some(text)) => out.push_str(&text),
                    (_, None) => {
                        sink.error(
                            span,
                            format!(
                                "variable `{name}` holds {} and cannot be part of a string",
                                v.describe()
                            ),
                        );
                        ok = false;
                    }
                },
            },
        }
    }
    if ok {
        Node::new(Kind::Str(out), span)
    } else {
        Node::new(Kind::Invalid, span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::yaml::parse;

    fn run(text: &str, opts: &LoadOptions) -> (Node, Vec<(Span, String)>) {
        let mut sink = Sink::default();
        let f = sink.add_file("t.yaml".into());
        let mut root = parse(text, f, &mut sink).unwrap();
        let tv = select_target(&mut root, opts, &mut sink);
        apply_variables(&mut root, &tv, opts, &mut sink);
        (root, sink.diags)
    }

    fn opts(target: Option<&str>, vars: &[(&str, &str)]) -> LoadOptions {
        LoadOptions {
            target: target.map(str::to_string),
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const SPEC: &str = "\
variables:
  workers: { default: 2 }
  team: { default: data }
  flag: { default: true }
  region: {}
targets:
  prod:
    variables: { workers: 8, region: eu }
    provider: { kind: sim, latency_ms: 5 }
  dev:
    variables: { region: local }
clusters:
  etl:
    workers: ${var.workers}
    tags: { team: \"${var.team}\", label: \"w-${var.workers}-${var.flag}\", lit: \"$${var.team}\" }
    runtime: \"${var.region}\"
";

    #[test]
    fn typed_substitution_and_interpolation() {
        let (root, d) = run(SPEC, &opts(Some("dev"), &[]));
        assert!(d.is_empty(), "{d:?}");
        let etl = root.get("clusters").unwrap().get("etl").unwrap();
        let w = etl.get("workers").unwrap();
        assert!(matches!(w.kind, Kind::Int(2, _)));
        assert_eq!((w.span.line, w.span.col), (14, 14));
        let tags = etl.get("tags").unwrap();
        assert_eq!(tags.get("team").unwrap().as_str(), Some("data"));
        assert_eq!(tags.get("label").unwrap().as_str(), Some("w-2-true"));
        assert_eq!(tags.get("lit").unwrap().as_str(), Some("${var.team}"));
        assert_eq!(etl.get("runtime").unwrap().as_str(), Some("local"));
    }

    #[test]
    fn targets_override_defaults_and_merge_the_provider() {
        let (root, d) = run(SPEC, &opts(Some("prod"), &[]));
        assert!(d.is_empty(), "{d:?}");
        let etl = root.get("clusters").unwrap().get("etl").unwrap();
        assert!(matches!(etl.get("workers").unwrap().kind, Kind::Int(8, _)));
        let p = root.get("provider").unwrap();
        assert_eq!(p.get("kind").unwrap().as_str(), Some("sim"));
        assert!(matches!(p.get("latency_ms").unwrap().kind, Kind::Int(5, _)));
    }

    #[test]
    fn command_line_vars_win_and_are_typed() {
        let (root, d) = run(
            SPEC,
            &opts(Some("prod"), &[("workers", "12"), ("region", "us")]),
        );
        assert!(d.is_empty(), "{d:?}");
        let etl = root.get("clusters").unwrap().get("etl").unwrap();
        assert!(matches!(etl.get("workers").unwrap().kind, Kind::Int(12, _)));
        assert_eq!(etl.get("runtime").unwrap().as_str(), Some("us"));
    }

    #[test]
    fn unknown_and_missing_variables() {
        let (_, d) = run(SPEC, &opts(None, &[("nope", "1")]));
        let msgs: Vec<String> = d
            .iter()
            .map(|(s, m)| format!("{}:{} {}", s.line, s.col, m))
            .collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("0:0 unknown variable `nope` (--var nope=...)"))
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("5:3 variable `region` has no default"))
        );

        let (root, d) = run("variables: {}\nproject: ${var.nam}\n", &opts(None, &[]));
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].0.line, d[0].0.col), (2, 10));
        assert!(d[0].1.starts_with("unknown variable `nam`"));
        assert!(matches!(root.get("project").unwrap().kind, Kind::Invalid));
    }

    #[test]
    fn unknown_targets_are_command_line_errors() {
        let (_, d) = run(SPEC, &opts(Some("prd"), &[("region", "x")]));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, Span::cmdline());
        assert_eq!(
            d[0].1,
            "unknown target `prd` (--target), did you mean `prod`? (known targets: prod, dev)"
        );
    }

    #[test]
    fn bad_expressions() {
        let (_, d) = run(
            "a: \"${HOME}\"\nb: \"x ${var.y\"\nc: \"$$HOME\"\n",
            &opts(None, &[]),
        );
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].1.contains("unsupported expression `${HOME}`"));
        assert!(d[1].1.contains("unterminated"));
    }

    #[test]
    fn target_variables_must_be_declared() {
        let (_, d) = run(
            "variables: { a: { default: 1 } }\ntargets: { t: { variables: { b: 2 } } }\n",
            &opts(None, &[]),
        );
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].1,
            "unknown variable `b` in target `t` (declared variables: a)"
        );
    }

    #[test]
    fn lists_substitute_whole() {
        let (root, d) = run(
            "variables: { scripts: { default: [a.sh, b.sh] } }\nc: { init_scripts: \"${var.scripts}\", x: \"n=${var.scripts}\" }\n",
            &opts(None, &[]),
        );
        assert_eq!(d.len(), 1);
        assert!(
            d[0].1
                .contains("holds a list and cannot be part of a string")
        );
        let c = root.get("c").unwrap();
        assert!(matches!(&c.get("init_scripts").unwrap().kind, Kind::Seq(v) if v.len() == 2));
    }
}
