//! What a cloud node is told at launch, so that it starts itself.
//!
//! The engine cannot reach a cloud node (its address is private), so
//! everything the node needs travels in its user data: `templates/user-data.sh`,
//! a cloud-init shell script that installs the motorpool runtime from
//! `runtime_url` (refused unless its SHA-256 is `runtime_sha256`), writes the
//! agent's config (JSON, mode 0600) and starts the agent under systemd. The
//! agent config carries a pool instance's warm-up, or a directly launched
//! cluster node's startup ([`crate::agent::node::ClusterBoot`]); the node
//! renders the step scripts itself and reports each step it finishes in its
//! own `motorpool-step` tag, which apply waits on.
//!
//! This module owns the settings ([`CloudNodes`]), their checks (shared with
//! the spec validator), and rendering the user data within EC2's 16 KB.

use serde_json::json;

use super::template::Templates;
use crate::agent::AgentConfig;
use crate::agent::node::SelfProvider;

/// EC2's limit on user data, in bytes (before base64).
pub const USER_DATA_LIMIT: usize = 16 * 1024;

/// The port the agent listens on, on a cloud node's private address (with TLS).
pub const CLOUD_AGENT_PORT: u16 = 7443;

/// How cloud nodes get their runtime and reach their provider (from the spec's provider block).
#[derive(Debug, Clone)]
pub struct CloudNodes {
    pub runtime_url: String,
    pub runtime_sha256: String,
    /// How the node's agent reaches its own provider (to tag itself).
    pub provider: SelfProvider,
}

/// Why user data could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("cannot render templates/user-data.sh: {0}")]
    Render(#[from] minijinja::Error),
    #[error("cannot encode the agent config: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "the node's user data is {size} bytes, over EC2's limit of {limit} bytes; most of it is \
         the cluster's init scripts, requirements and env: make them smaller (e.g. download a \
         larger script from an init script)"
    )]
    TooLarge { size: usize, limit: usize },
}

/// `runtime_url` must be an http(s) URL without whitespace.
pub fn check_runtime_url(url: &str) -> Result<(), String> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() > "https://".len()
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{url}` is not an https:// or http:// URL of the motorpool executable"
        ))
    }
}

/// `runtime_sha256` must be 64 hex digits.
pub fn check_sha256(sha: &str) -> Result<(), String> {
    if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "`{sha}` is not a SHA-256 (64 hex digits, as `sha256sum` prints)"
        ))
    }
}

/// The cloud-init user data for a node with agent config `config`.
pub fn user_data(
    templates: &Templates,
    settings: &CloudNodes,
    config: &AgentConfig,
) -> Result<String, UserDataError> {
    let agent_config = serde_json::to_string(config)?;
    let script = templates.render(
        "user-data.sh",
        json!({
            "runtime_url": settings.runtime_url,
            "runtime_sha256": settings.runtime_sha256.to_ascii_lowercase(),
            "agent_config": agent_config,
            "port": CLOUD_AGENT_PORT,
        }),
    )?;
    if script.len() > USER_DATA_LIMIT {
        return Err(UserDataError::TooLarge {
            size: script.len(),
            limit: USER_DATA_LIMIT,
        });
    }
    Ok(script)
}

/// The agent config inside user data made by [`user_data`] (tests, tools):
/// the one word after `printf '%s\n'` on the line that writes the config.
pub fn agent_config_of(user_data: &str) -> Option<AgentConfig> {
    let line = user_data
        .lines()
        .find(|l| l.ends_with("> /var/lib/motorpool/agent-config.json"))?;
    let word = line
        .strip_prefix("printf '%s\\n' '")?
        .strip_suffix("' > /var/lib/motorpool/agent-config.json")?;
    serde_json::from_str(&word.replace(r"'\''", "'")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::node::ClusterBoot;
    use crate::bootstrap::{BootSpec, MountSpec, NamedFile};

    const HOSTILE: &str = "it's $(touch PWNED) `touch PWNED` ; touch PWNED\n\"x\" ${HOME} \\";

    fn hostile_spec() -> BootSpec {
        BootSpec {
            runtime: HOSTILE.into(),
            pip: vec![HOSTILE.into(), "-r /etc/passwd".into()],
            requirements: vec![],
            init_scripts: vec![NamedFile {
                name: HOSTILE.into(),
                content: format!("echo {HOSTILE}\n").repeat(20),
            }],
            env: [(HOSTILE.to_string(), HOSTILE.to_string())].into(),
            mounts: vec![MountSpec {
                source: format!("s3://{HOSTILE}"),
                target: HOSTILE.into(),
                read_only: true,
            }],
            autotermination_minutes: Some(30),
            workers: 2,
            startup_timeout_minutes: Some(45),
        }
    }

    #[test]
    fn user_data_with_hostile_values_stays_safe_and_small() {
        let settings = CloudNodes {
            runtime_url: format!("https://example.com/{HOSTILE}"),
            runtime_sha256: "'; touch PWNED; '".into(),
            provider: SelfProvider::Aws {
                region: Some(HOSTILE.into()),
                endpoint: Some(HOSTILE.into()),
            },
        };
        let config = AgentConfig {
            credential: HOSTILE.into(),
            project: HOSTILE.into(),
            provider: Some(settings.provider.clone()),
            cluster: Some(ClusterBoot {
                cluster: HOSTILE.into(),
                credential: HOSTILE.into(),
                spec: hostile_spec(),
            }),
            ..AgentConfig::default()
        };
        let script = user_data(&Templates::new(), &settings, &config).expect("renders");
        assert!(script.len() <= USER_DATA_LIMIT, "{} bytes", script.len());
        // The config comes back out of the script intact: it was one shell word.
        let back = agent_config_of(&script).expect("the config is in the script");
        assert_eq!(back.credential, HOSTILE);
        assert_eq!(back.cluster.map(|c| c.spec), Some(hostile_spec()));
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
            "{}",
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
        assert!(!outside.contains("PWNED"), "unquoted value in:\n{outside}");
    }

    #[test]
    fn user_data_over_the_ec2_limit_is_refused_with_a_clear_message() {
        let settings = CloudNodes {
            runtime_url: "https://example.com/motorpool".into(),
            runtime_sha256: "0".repeat(64),
            provider: SelfProvider::Aws {
                region: None,
                endpoint: None,
            },
        };
        let mut spec = hostile_spec();
        spec.init_scripts[0].content = "x".repeat(USER_DATA_LIMIT);
        let config = AgentConfig {
            credential: "c".into(),
            cluster: Some(ClusterBoot {
                cluster: "etl".into(),
                credential: "k".into(),
                spec,
            }),
            ..AgentConfig::default()
        };
        let err = user_data(&Templates::new(), &settings, &config).expect_err("too large");
        assert!(
            err.to_string().contains("over EC2's limit of 16384 bytes"),
            "{err}"
        );
    }

    #[test]
    fn runtime_settings_are_checked() {
        assert!(check_runtime_url("https://example.com/motorpool").is_ok());
        assert!(check_runtime_url("ftp://example.com/motorpool").is_err());
        assert!(check_runtime_url("https://example.com/a b").is_err());
        assert!(check_sha256(&"ab".repeat(32)).is_ok());
        assert!(check_sha256("abc").is_err());
    }
}
