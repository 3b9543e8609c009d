//! Rendering `templates/` with every value shell-quoted by construction.
//!
//! The environment's auto-escape is a custom `shell` mode for every template,
//! and its formatter writes each `{{ value }}` as one single-quoted shell word
//! (a list as several words, each quoted). Nobody has to remember a filter:
//! a spec value — quotes, `$(...)`, backticks, newlines and all — can only
//! ever be a word, never shell syntax. The templates are compiled into the
//! binary, so a node needs nothing but the motorpool executable.

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
            // The templates are part of the binary: a syntax error is caught by the tests below.
            if let Err(e) = env.add_template(name, source) {
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
    fn a_missing_value_is_an_error_not_an_empty_word() {
        let t = Templates::new();
        assert!(
            t.render("steps/runtime.sh", json!({ "runtime": "1" }))
                .is_err()
        );
    }
}
