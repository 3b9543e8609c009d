//! Rendering `templates/` with every value shell-quoted by construction.
//!
//! The environment's auto-escape is a custom `shell` mode for every template,
//! and its formatter writes each `{{ value }}` as one single-quoted shell word
//! (a list as several words, each quoted). Nobody has to remember a filter:
//! a spec value — quotes, `$(...)`, backticks, newlines and all — can only
//! ever be a word, never shell syntax. A quoted word is only a word where
//! the shell reads words, so every template is also checked before use
//! ([`misplaced_values`]): no `{{ value }}` inside a comment (a newline in
//! the value would end the comment and start a command) nor inside quotes
//! of the template's own. The templates are compiled into the binary, so a
//! node needs nothing but the motorpool executable.

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};
use serde::Serialize;

/// The templates, compiled in.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "steps/runtime.sh",
        include_str!("../../templates/steps/runtime.sh"),
    ),
    (
        "steps/libraries.sh",
        include_str!("../../templates/steps/libraries.sh"),
    ),
    (
        "steps/init_script.sh",
        include_str!("../../templates/steps/init_script.sh"),
    ),
    (
        "steps/mounts.sh",
        include_str!("../../templates/steps/mounts.sh"),
    ),
    (
        "engines/spark.sh",
        include_str!("../../templates/engines/spark.sh"),
    ),
];

const SHELL: AutoEscape = AutoEscape::Custom("shell");

/// `it's` -> `'it'\''s'`: one shell word whatever the text.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn shell_formatter(
    out: &mut Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    if value.is_safe() || state.auto_escape() != SHELL {
        return minijinja::escape_formatter(out, state, value);
    }
    let write = |out: &mut Output<'_>, s: &str| {
        out.write_str(s)
            .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
    };
    if value.is_none() || value.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            "a template value is missing (refusing to render an empty shell word)",
        ));
    }
    match value.kind() {
        minijinja::value::ValueKind::Seq => {
            let words: Vec<String> = value
                .try_iter()?
                .map(|item| shell_quote(&item.to_string()))
                .collect();
            write(out, &words.join(" "))
        }
        _ => write(out, &shell_quote(&value.to_string())),
    }
}

/// Where a shell lexer is in a template's text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lexed {
    Code,
    SingleQuoted,
    DoubleQuoted,
    Comment,
}

/// A value the template puts where the shell does not read it as a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MisplacedValue {
    /// 1-based line of the text.
    pub line: usize,
    /// "a comment", "single quotes", "double quotes".
    pub inside: &'static str,
}

impl std::fmt::Display for MisplacedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: a value inside {}; values go only where the shell reads a word",
            self.line, self.inside
        )
    }
}

/// Every value of `text` that is not in a word position of shell code.
/// `value_at` says how long a value starting at the given text is (for a
/// template: `{{ ... }}`); `{% ... %}` and `{# ... #}` are template syntax,
/// skipped. The lexer knows what these templates use: comments, quotes,
/// backslashes, `$#`/`${#x}` (not comments), `$(...)` inside double quotes;
/// no heredocs.
pub fn misplaced_values(
    text: &str,
    value_at: impl Fn(&str) -> Option<usize>,
) -> Vec<MisplacedValue> {
    let mut found = Vec::new();
    let mut state = Lexed::Code;
    // For each `$(` opened inside double quotes: the `(` depth within it.
    let mut substitutions: Vec<u32> = Vec::new();
    let mut line = 1;
    let mut prev: Option<char> = None;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        if let Some(len) = value_at(rest) {
            let inside = match state {
                Lexed::Code => None,
                Lexed::SingleQuoted => Some("single quotes"),
                Lexed::DoubleQuoted => Some("double quotes"),
                Lexed::Comment => Some("a comment"),
            };
            if let Some(inside) = inside {
                found.push(MisplacedValue { line, inside });
            }
            line += rest[..len].matches('\n').count();
            i += len;
            prev = Some('x');
            continue;
        }
        if rest.starts_with("{%") || rest.starts_with("{#") {
            let close = if rest.starts_with("{%") { "%}" } else { "#}" };
            let len = rest.find(close).map_or(rest.len(), |at| at + 2);
            line += rest[..len].matches('\n').count();
            i += len;
            continue;
        }
        let Some(c) = rest.chars().next() else { break };
        let mut step = c.len_utf8();
        match (state, c) {
            (_, '\n') => {
                line += 1;
                if state == Lexed::Comment {
                    state = Lexed::Code;
                }
            }
            (Lexed::Code, '\\') | (Lexed::DoubleQuoted, '\\') => {
                // The escaped character is taken as it is.
                if let Some(next) = rest[1..].chars().next() {
                    step += next.len_utf8();
                    if next == '\n' {
                        line += 1;
                    }
                }
            }
            (Lexed::DoubleQuoted, '$') if rest[1..].starts_with('(') => {
                substitutions.push(0);
                state = Lexed::Code;
                step += 1;
            }
            (Lexed::Code, '(') if !substitutions.is_empty() => {
                if let Some(depth) = substitutions.last_mut() {
                    *depth += 1;
                }
            }
            (Lexed::Code, ')') if !substitutions.is_empty() => match substitutions.last_mut() {
                Some(0) => {
                    substitutions.pop();
                    state = Lexed::DoubleQuoted;
                }
                Some(depth) => *depth -= 1,
                None => {}
            },
            (Lexed::Code, '\'') => state = Lexed::SingleQuoted,
            (Lexed::Code, '"') => state = Lexed::DoubleQuoted,
            (Lexed::Code, '#')
                if prev.is_none_or(|p| p.is_whitespace() || ";&|()<>".contains(p)) =>
            {
                state = Lexed::Comment
            }
            (Lexed::SingleQuoted, '\'') | (Lexed::DoubleQuoted, '"') => state = Lexed::Code,
            _ => {}
        }
        prev = Some(c);
        i += step;
    }
    found
}

/// The length of a `{{ ... }}` at the start of `text`.
fn template_value(text: &str) -> Option<usize> {
    if !text.starts_with("{{") {
        return None;
    }
    Some(text.find("}}").map_or(text.len(), |at| at + 2))
}

/// A template whose values are not all in word positions, as an error.
fn check_placement(name: &str, source: &str) -> Result<(), Error> {
    let misplaced = misplaced_values(source, template_value);
    if misplaced.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = misplaced.iter().map(ToString::to_string).collect();
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template {name} is unsafe: {}", list.join("; ")),
    ))
}

/// The template environment.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Templates::new()
    }
}

impl Templates {
    pub fn new() -> Templates {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| SHELL);
        env.set_formatter(shell_formatter);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, source) in TEMPLATES {
            // The templates are part of the binary: a syntax error, or a
            // value outside a word position, is caught by the tests below.
            if let Err(e) =
                check_placement(name, source).and_then(|()| env.add_template(name, source))
            {
                panic!("built-in template {name} does not parse: {e}");
            }
        }
        Templates { env }
    }

    /// Render template `name` with `context`.
    pub fn render(&self, name: &str, context: impl Serialize) -> Result<String, Error> {
        self.env
            .get_template(name)?
            .render(Value::from_serialize(&context))
    }

    /// Render a template that is not built in (a provider's user data),
    /// with the same shell quoting.
    pub fn render_source(&self, source: &str, context: impl Serialize) -> Result<String, Error> {
        check_placement("user-data", source)?;
        self.env
            .render_named_str("user-data", source, Value::from_serialize(&context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOSTILE: &[&str] = &[
        "it's",
        "$(touch PWNED)",
        "`touch PWNED`",
        "a; touch PWNED",
        "line\ntouch PWNED",
        "\"; touch PWNED; \"",
        "$HOME ${HOME} \\",
        "-rf",
        "",
    ];

    /// Run a rendered script as a step would (`sh -eu`, in `dir`); it must succeed.
    fn run_sh(script: &str, dir: &std::path::Path) -> std::process::Output {
        let out = std::process::Command::new("sh")
            .arg("-eu")
            .arg("-c")
            .arg(script)
            .env("MOTORPOOL_NODE_DIR", dir)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[test]
    fn every_built_in_template_parses() {
        let t = Templates::new();
        for (name, _) in TEMPLATES {
            assert!(t.env.get_template(name).is_ok(), "{name}");
        }
    }

    /// Render a script whose values are hostile, run it, and check that each
    /// value arrived as exactly one word and nothing was executed.
    #[test]
    fn hostile_values_stay_words_when_the_script_runs() {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| SHELL);
        env.set_formatter(shell_formatter);
        env.add_template("t.sh", "printf '<%s>\\n' {{ one }} {{ many }}\n")
            .expect("template");
        let dir = tempfile::tempdir().expect("tempdir");
        for value in HOSTILE {
            let script = env
                .get_template("t.sh")
                .and_then(|t| t.render(json!({ "one": value, "many": [value, value] })))
                .expect("render");
            let out = run_sh(&script, dir.path());
            let expected = format!("<{value}>\n").repeat(3);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "script:\n{script}"
            );
            assert!(
                !dir.path().join("PWNED").exists(),
                "{value:?} ran a command"
            );
        }
    }

    #[test]
    fn hostile_library_names_and_paths_cannot_run_commands() {
        let t = Templates::new();
        let dir = tempfile::tempdir().expect("tempdir");
        for value in HOSTILE.iter().filter(|v| !v.is_empty()) {
            let script = t
                .render(
                    "steps/mounts.sh",
                    json!({ "mounts": [{ "scheme": "path", "source": value, "target": format!("/mnt/{value}") }] }),
                )
                .expect("render");
            run_sh(&script, dir.path());
            assert!(
                !dir.path().join("PWNED").exists(),
                "{value:?} ran a command via mounts.sh"
            );
            let libs = t
                .render(
                    "steps/libraries.sh",
                    json!({ "cache_dir": value, "key": value, "pip": [value], "requirements": [value], "python": value }),
                )
                .expect("render");
            // Every library comes after `--`, quoted: a value never becomes shell syntax nor a pip option.
            let after_dashes = format!(" -- {} ", shell_quote(value));
            assert!(
                libs.contains(&after_dashes),
                "`{after_dashes}` not in:\n{libs}"
            );
        }
    }

    #[test]
    fn no_template_puts_a_value_in_a_comment_or_inside_quotes() {
        let providers = [
            include_str!("../../providers/aws/templates/user-data.sh"),
            include_str!("../../providers/gcp/templates/startup-script.sh"),
            include_str!("../../providers/azure/templates/custom-data.sh"),
        ];
        for (name, source) in TEMPLATES
            .iter()
            .copied()
            .chain(providers.map(|s| ("user data", s)))
        {
            assert_eq!(misplaced_values(source, template_value), vec![], "{name}");
        }
        // The lexer sees what it must refuse.
        let bad = "echo ok # {{ name }}\nx='{{ a }}' y=\"{{ b }}\" z=$#{{ c }}\nw=\"$(f \"a\" {{ d }}) {{ e }}\"\n";
        let found = misplaced_values(bad, template_value);
        let inside: Vec<&str> = found.iter().map(|m| m.inside).collect();
        assert_eq!(
            inside,
            [
                "a comment",
                "single quotes",
                "double quotes",
                "double quotes"
            ]
        );
        assert!(
            Templates::new()
                .render_source("# {{ x }}\n", json!({ "x": "y" }))
                .is_err()
        );
    }

    /// An init script whose name holds a newline and a command: its step
    /// script runs only the script, whatever the name.
    #[test]
    fn an_init_script_name_with_a_newline_cannot_run_a_command() {
        let t = Templates::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = crate::words::BootSpec {
            runtime: "1".into(),
            engine: String::new(),
            pip: vec![],
            requirements: vec![],
            init_scripts: vec![crate::words::NamedFile {
                name: "setup.sh\ntouch PWNED #".into(),
                content: "true\n".into(),
            }],
            env: Default::default(),
            mounts: vec![],
            autotermination_minutes: None,
            workers: 0,
            startup_timeout_minutes: None,
            ..crate::words::BootSpec::default()
        };
        let ctx = crate::bootstrap::steps::StepContext {
            python: "python3".into(),
            motorpool_binary: "motorpool".into(),
            cache_dir: "/tmp".into(),
            timeout_seconds: 60,
            minute: std::time::Duration::from_secs(60),
        };
        // The node refuses the name outright...
        assert!(crate::bootstrap::steps::init_scripts(&t, &ctx, &spec).is_err());
        // ...and the template would not have run it either.
        let script = t
            .render(
                "steps/init_script.sh",
                json!({ "file": "script.sh", "name": "x\ntouch PWNED #" }),
            )
            .expect("render");
        std::fs::write(dir.path().join("script.sh"), "true\n").expect("script");
        let out = std::process::Command::new("sh")
            .arg("-eu")
            .arg("-c")
            .arg(&script)
            .env("MOTORPOOL_NODE_DIR", dir.path())
            .env("MOTORPOOL_STEP_DIR", dir.path())
            .current_dir(dir.path())
            .output()
            .expect("sh");
        assert!(out.status.success(), "{script}");
        assert!(!dir.path().join("PWNED").exists(), "{script}");
    }

    #[test]
    fn a_missing_value_is_an_error_not_an_empty_word() {
        let t = Templates::new();
        assert!(
            t.render("steps/runtime.sh", json!({ "runtime": "1" }))
                .is_err()
        );
    }

    /// Every step template, rendered with arbitrary values: the script
    /// parses (`sh -n`), and it is exactly the script rendered with
    /// placeholder words, each placeholder replaced by its value as one
    /// quoted word, where every placeholder sits in a word position of
    /// code (not in a comment, not inside the template's own quotes).
    mod arbitrary_values {
        use super::*;
        use proptest::prelude::*;

        const PLACEHOLDER: &str = "MPVALUE";

        /// What a mounts.sh context holds apart from its values.
        #[derive(Debug, Clone)]
        struct Shape {
            pip: usize,
            requirements: usize,
            mounts: Vec<(&'static str, bool)>,
        }

        fn shape() -> impl Strategy<Value = Shape> {
            (
                1usize..3,
                0usize..3,
                proptest::collection::vec(
                    (
                        prop::sample::select(vec!["path", "s3", "gs", "az"]),
                        any::<bool>(),
                    ),
                    1..4,
                ),
            )
                .prop_map(|(pip, requirements, mounts)| Shape {
                    pip,
                    requirements,
                    mounts,
                })
        }

        /// Non-empty text of any characters but NUL (which no shell
        /// script can hold; `validate` refuses it in paths and values).
        fn value() -> impl Strategy<Value = String> {
            "[^\\x00]{1,24}"
        }

        /// Each template's context, value number k drawn from `v(k)`.
        fn contexts(
            shape: &Shape,
            v: &dyn Fn(usize) -> String,
        ) -> Vec<(&'static str, serde_json::Value)> {
            let mut k = 0;
            let mut next = || {
                k += 1;
                v(k - 1)
            };
            let runtime =
                json!({ "runtime": next(), "python": next(), "motorpool_binary": next() });
            let libraries = json!({
                "cache_dir": next(), "key": next(), "python": next(),
                "pip": (0..shape.pip).map(|_| next()).collect::<Vec<_>>(),
                "requirements": (0..shape.requirements).map(|_| next()).collect::<Vec<_>>(),
            });
            let init = json!({ "file": next() });
            let mounts: Vec<serde_json::Value> = shape
                .mounts
                .iter()
                .map(|(scheme, read_only)| {
                    json!({
                        "scheme": scheme, "source": next(), "target": next(), "bucket": next(),
                        "prefix": next(), "read_only": read_only,
                    })
                })
                .collect();
            vec![
                ("steps/runtime.sh", runtime),
                ("steps/libraries.sh", libraries),
                ("steps/init_script.sh", init),
                ("steps/mounts.sh", json!({ "mounts": mounts })),
            ]
        }

        /// A quoted placeholder `'MPVALUE<k>'` at the start of `text`: its length.
        fn quoted_placeholder(text: &str) -> Option<usize> {
            let rest = text.strip_prefix('\'')?.strip_prefix(PLACEHOLDER)?;
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            (digits > 0 && rest[digits..].starts_with('\''))
                .then_some(1 + PLACEHOLDER.len() + digits + 1)
        }

        /// `text` with every quoted placeholder replaced by its value, quoted.
        fn substitute(text: &str, values: &[String]) -> String {
            let mut out = String::new();
            let mut i = 0;
            while i < text.len() {
                if let Some(len) = quoted_placeholder(&text[i..]) {
                    let k: usize = text[i + 1 + PLACEHOLDER.len()..i + len - 1]
                        .parse()
                        .expect("k");
                    out.push_str(&shell_quote(&values[k]));
                    i += len;
                } else {
                    let c = text[i..].chars().next().expect("char");
                    out.push(c);
                    i += c.len_utf8();
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn every_step_template_keeps_arbitrary_values_as_quoted_words(
                shape in shape(),
                values in proptest::collection::vec(value(), 40),
            ) {
                let t = Templates::new();
                let real = contexts(&shape, &|k| values[k].clone());
                let placeholders = contexts(&shape, &|k| format!("{PLACEHOLDER}{k}"));
                for ((name, real), (_, marked)) in real.into_iter().zip(placeholders) {
                    let script = t.render(name, &real).expect("render");
                    let skeleton = t.render(name, &marked).expect("render");
                    prop_assert_eq!(
                        misplaced_values(&skeleton, quoted_placeholder),
                        vec![],
                        "{}:\n{}", name, skeleton
                    );
                    prop_assert_eq!(&substitute(&skeleton, &values), &script, "{}", name);
                    let parsed = std::process::Command::new("sh")
                        .arg("-n")
                        .arg("-c")
                        .arg(&script)
                        .output()
                        .expect("sh -n");
                    prop_assert!(
                        parsed.status.success(),
                        "{} does not parse: {}\n{}",
                        name,
                        String::from_utf8_lossy(&parsed.stderr),
                        script
                    );
                }
            }
        }
    }
}
