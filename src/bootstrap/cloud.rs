//! What a cloud node is told at launch, so that it starts itself.
//!
//! The engine cannot reach a cloud node (its address is private), so
//! everything the node needs travels in its user data: the provider's
//! user-data template (EC2: `providers/aws/templates/user-data.sh`, a
//! cloud-init shell script) that installs the motorpool runtime from
//! `runtime_url` (refused unless its SHA-256 is `runtime_sha256`), writes the
//! agent's config (JSON, mode 0600) and starts the agent under systemd. The
//! agent config carries a pool instance's warm-up, or a directly launched
//! cluster node's startup ([`crate::agent::node::ClusterBoot`]); the node
//! renders the step scripts itself and reports each step it finishes in its
//! own `motorpool-step` tag, which apply waits on.
//!
//! This module owns the settings ([`CloudNodes`]) and rendering the user
//! data within the provider's limit (EC2: 16 KiB).

use serde_json::json;

use super::template::Templates;
use crate::words::NodeProvider;

pub use motorpool_provider::{CLOUD_AGENT_PORT, CLOUD_RUNTIME_PORT};

/// How cloud nodes get their runtime and reach their provider (from the
/// spec's provider block and the provider's plugin).
#[derive(Debug, Clone)]
pub struct CloudNodes {
    pub runtime_url: String,
    pub runtime_sha256: String,
    /// How the node's agent reaches its own provider (to tag itself).
    pub provider: NodeProvider,
    /// The provider's user-data template (its node-side bootstrap).
    pub template: &'static str,
    /// The provider's limit on user data, if it has one.
    pub user_data_limit: Option<usize>,
}

/// Why user data could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("cannot render the provider's user-data template: {0}")]
    Render(#[from] minijinja::Error),
    #[error(
        "the node's user data is {size} bytes, over the provider's limit of {limit} bytes; most \
         of it is the cluster's init scripts, requirements and env: make them smaller (e.g. \
         download a larger script from an init script)"
    )]
    TooLarge { size: usize, limit: usize },
}

/// The user data for a node whose agent config is `agent_config` (JSON).
pub fn user_data(
    templates: &Templates,
    settings: &CloudNodes,
    agent_config: &str,
) -> Result<String, UserDataError> {
    let script = templates.render_source(
        settings.template,
        json!({
            "runtime_url": settings.runtime_url,
            "runtime_sha256": settings.runtime_sha256.to_ascii_lowercase(),
            "agent_config": agent_config,
            "port": CLOUD_AGENT_PORT,
            "runtime_port": CLOUD_RUNTIME_PORT,
            // How the node reaches its provider (an endpoint override, ...).
            "node": settings.provider.settings,
        }),
    )?;
    if let Some(limit) = settings.user_data_limit
        && script.len() > limit
    {
        return Err(UserDataError::TooLarge {
            size: script.len(),
            limit,
        });
    }
    Ok(script)
}

/// The agent config (JSON) inside user data made by [`user_data`] (tests,
/// tools): the one word after `printf '%s\n'` on the line that writes it
/// (to `/var/lib/motorpool/agent-config.json`, under `"$root"` or not).
pub fn agent_config_of(user_data: &str) -> Option<String> {
    const TARGETS: [&str; 2] = [
        "' > /var/lib/motorpool/agent-config.json",
        "' > \"$root/var/lib/motorpool/agent-config.json\"",
    ];
    user_data.lines().find_map(|line| {
        let word = line.strip_prefix("printf '%s\\n' '")?;
        let word = TARGETS.iter().find_map(|t| word.strip_suffix(t))?;
        Some(word.replace(r"'\''", "'"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentConfig;
    use crate::bootstrap::{BootSpec, MountSpec, NamedFile};
    use crate::words::ClusterBoot;

    const HOSTILE: &str = "it's $(touch PWNED) `touch PWNED` ; touch PWNED\n\"x\" ${HOME} \\";

    fn hostile_spec() -> BootSpec {
        BootSpec {
            runtime: HOSTILE.into(),
            engine: HOSTILE.into(),
            pip: vec![HOSTILE.into(), "-r /etc/passwd".into()],
            requirements: vec![],
            init_scripts: vec![NamedFile {
                name: HOSTILE.into(),
                content: format!("echo {HOSTILE}\n").repeat(20),
            }],
            env: [(HOSTILE.to_string(), HOSTILE.to_string())].into(),
            secret_env: Default::default(),
            mounts: vec![MountSpec {
                source: format!("s3://{HOSTILE}"),
                target: HOSTILE.into(),
                read_only: true,
            }],
            autotermination_minutes: Some(30),
            workers: 2,
            startup_timeout_minutes: Some(45),
            engine_version: HOSTILE.into(),
            engine_conf: [(HOSTILE.to_string(), HOSTILE.to_string())].into(),
            worker_cores: 2,
            worker_memory_mb: 2048,
        }
    }

    /// A minimal user-data template in the shape every provider's follows.
    const PLAIN_TEMPLATE: &str = "#!/bin/sh\nset -eu\ncurl -fsSL -o /opt/motorpool/motorpool -- {{ runtime_url }}\nprintf '%s  %s\\n' {{ runtime_sha256 }} /opt/motorpool/motorpool | sha256sum -c -\nprintf '%s\\n' {{ agent_config }} > /var/lib/motorpool/agent-config.json\nexec /opt/motorpool/motorpool agent --listen 0.0.0.0:{{ port }}\n";

    /// Every registered provider's user-data template (and the plain one).
    fn templates() -> Vec<(&'static str, &'static str, Option<usize>)> {
        let mut all = vec![("plain", PLAIN_TEMPLATE, Some(16 * 1024))];
        for p in crate::registry::Registry::builtin().providers() {
            if let Some(template) = p.user_data_template() {
                all.push((p.kind(), template, p.capabilities().user_data_limit));
            }
        }
        all
    }

    #[test]
    fn user_data_with_hostile_values_stays_safe_and_small() {
        for (kind, template, limit) in templates() {
            let settings = CloudNodes {
                runtime_url: format!("https://example.com/{HOSTILE}"),
                runtime_sha256: "'; touch PWNED; '".into(),
                provider: NodeProvider {
                    kind: HOSTILE.into(),
                    settings: serde_json::json!({ "region": HOSTILE, "endpoint": HOSTILE }),
                },
                template,
                user_data_limit: limit,
            };
            let config = AgentConfig {
                credential: HOSTILE.into(),
                project: HOSTILE.into(),
                provider: Some(settings.provider.clone()),
                cluster: Some(ClusterBoot {
                    cluster: HOSTILE.into(),
                    credential: HOSTILE.into(),
                    spec: hostile_spec(),
                    ready_timeout_seconds: 120,
                }),
                ..AgentConfig::default()
            };
            let json = serde_json::to_string(&config).expect("encode");
            let script = user_data(&Templates::new(), &settings, &json).expect("renders");
            if let Some(limit) = limit {
                assert!(script.len() <= limit, "{kind}: {} bytes", script.len());
            }
            // The config comes back out of the script intact: it was one shell word.
            let back = agent_config_of(&script)
                .and_then(|c| AgentConfig::from_json(&c))
                .expect("the config is in the script");
            assert_eq!(back.credential, HOSTILE, "{kind}");
            assert_eq!(back.cluster.map(|c| c.spec), Some(hostile_spec()), "{kind}");
            // `sh -n` parses it; and every hostile value sits inside single quotes:
            // outside them, no `$(`, backtick or `;` from a value remains.
            let parsed = std::process::Command::new("sh")
                .arg("-n")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("sh");
            assert!(
                parsed.status.success(),
                "{kind}: {}",
                String::from_utf8_lossy(&parsed.stderr)
            );
            let mut outside = String::new();
            let mut quoted = false;
            let mut chars = script.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\'' => quoted = !quoted,
                    // `\'` outside quotes is a literal quote (from `'\''`).
                    '\\' if !quoted => {
                        chars.next();
                    }
                    _ if !quoted => outside.push(c),
                    _ => {}
                }
            }
            assert!(
                !outside.contains("PWNED"),
                "{kind}: unquoted value in:\n{outside}"
            );
        }
    }

    #[test]
    fn user_data_over_the_providers_limit_is_refused_with_a_clear_message() {
        const LIMIT: usize = 16 * 1024;
        let settings = CloudNodes {
            runtime_url: "https://example.com/motorpool".into(),
            runtime_sha256: "0".repeat(64),
            provider: NodeProvider {
                kind: "plain".into(),
                settings: serde_json::Value::Null,
            },
            template: PLAIN_TEMPLATE,
            user_data_limit: Some(LIMIT),
        };
        let mut spec = hostile_spec();
        spec.init_scripts[0].content = "x".repeat(LIMIT);
        let config = AgentConfig {
            credential: "c".into(),
            cluster: Some(ClusterBoot {
                cluster: "etl".into(),
                credential: "k".into(),
                spec,
                ready_timeout_seconds: 120,
            }),
            ..AgentConfig::default()
        };
        let json = serde_json::to_string(&config).expect("encode");
        let err = user_data(&Templates::new(), &settings, &json).expect_err("too large");
        assert!(
            err.to_string()
                .contains("over the provider's limit of 16384 bytes"),
            "{err}"
        );
    }
}
