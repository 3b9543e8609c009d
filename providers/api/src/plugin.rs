//! What a provider crate registers with the engine: its kind, its settings
//! block in the spec, its capabilities, its catalog, how to connect from the
//! machine running the CLI and from a node, and its node-side bootstrap.
//!
//! The engine never names a provider: where clouds differ, it asks a
//! [`Capabilities`] field or calls a [`ProviderPlugin`] method. A new cloud
//! is a crate that implements this trait plus one line in the engine's
//! registry. This module owns the contract only; it knows no spec file, no
//! YAML and no cloud SDK (settings arrive as JSON values, already checked
//! against the JSON Schema the plugin itself provides).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::{NodeType, Provider, Result};

/// How a cluster's nodes run their startup steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStartup {
    /// The engine reaches every node's agent (its address is reachable from
    /// the machine running the CLI) and drives the steps over gRPC (local).
    EngineDriven,
    /// Nodes start themselves from their user data and report each step in
    /// their own tags; the engine only watches (clouds, private addresses).
    SelfStarting,
    /// Nothing runs on a node: it counts as started once it is running (sim).
    Simulated,
}

/// What differs between providers, as the engine asks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// How cluster startup reaches the nodes.
    pub node_startup: NodeStartup,
    /// Most bytes of user data one launch may carry (EC2: 16 KiB before
    /// base64); `None`: no limit worth checking.
    pub user_data_limit: Option<usize>,
    /// Whether instances can be stopped and started again (`warm: stopped`,
    /// autotermination of a driver).
    pub stop_start: bool,
}

impl Capabilities {
    /// The machine running the CLI reaches the nodes' agents directly.
    pub fn nodes_are_reachable(&self) -> bool {
        self.node_startup == NodeStartup::EngineDriven
    }

    /// Nodes start themselves and need the motorpool runtime from
    /// `runtime_url`/`runtime_sha256` (the settings every cloud shares).
    pub fn needs_runtime_download(&self) -> bool {
        self.node_startup == NodeStartup::SelfStarting
    }
}

/// One problem in a provider's settings, found by [`ProviderPlugin::check_settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingProblem {
    /// Where in the provider block: `["subnet_ids", "1"]` is the second
    /// subnet id; empty for the block itself. The spec loader turns it into
    /// `file:line:col`.
    pub path: Vec<String>,
    /// The problem is the key itself (a reserved tag name), not its value.
    pub on_key: bool,
    pub message: String,
}

impl SettingProblem {
    /// A problem with the value at `path`.
    pub fn at(path: &[&str], message: impl Into<String>) -> Self {
        SettingProblem {
            path: path.iter().map(|s| s.to_string()).collect(),
            on_key: false,
            message: message.into(),
        }
    }

    /// A problem with the last key of `path`.
    pub fn key(path: &[&str], message: impl Into<String>) -> Self {
        SettingProblem {
            on_key: true,
            ..SettingProblem::at(path, message)
        }
    }
}

/// What connecting from the machine running the CLI may use.
#[derive(Debug, Clone)]
pub struct ConnectEnv {
    /// `$MOTORPOOL_HOME`: where providers that keep local state keep it.
    pub home: PathBuf,
    /// The motorpool executable that local nodes run as their agent.
    pub agent_program: PathBuf,
}

/// A provider crate's registration: everything the engine and the agent
/// need to know about one cloud, without naming it.
pub trait ProviderPlugin: Send + Sync {
    /// The `kind:` of the spec's provider block (`local`, `sim`, `aws`, ...).
    fn kind(&self) -> &'static str;

    /// One line for the spec's JSON Schema and for `validate`'s messages.
    fn description(&self) -> &'static str;

    /// The JSON Schema (an object schema, as schemars generates it) of the
    /// provider's own settings: every key of the block except `kind` and the
    /// settings all providers share. Its own `$defs`, if any, are merged into
    /// the spec schema's.
    fn settings_schema(&self) -> Value;

    /// Checks beyond the schema (ranges, id formats, reserved tags), each
    /// with the path of the setting it is about. `settings` passed the
    /// schema, but a value may still be a `${var.NAME}` reference's result.
    fn check_settings(&self, settings: &Value) -> Vec<SettingProblem> {
        let _ = settings;
        Vec::new()
    }

    /// The node types the spec may name, for `validate`.
    fn catalog(&self) -> Vec<NodeType>;

    fn capabilities(&self) -> Capabilities;

    /// Connect from the machine running the CLI.
    fn connect(&self, settings: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>>;

    /// What a node is told about its provider (in its agent config), so that
    /// it can call [`ProviderPlugin::connect_from_node`]: by default the
    /// settings themselves. A cloud keeps only what a node needs (region,
    /// endpoint) and leaves credentials to the node's own identity.
    fn node_settings(&self, settings: &Value, env: &ConnectEnv) -> Result<Value> {
        let _ = env;
        Ok(settings.clone())
    }

    /// Connect from a node, with what [`ProviderPlugin::node_settings`] gave it
    /// (a cloud node uses its instance identity: role, service account).
    fn connect_from_node(
        &self,
        node_settings: &Value,
        env: &ConnectEnv,
    ) -> Result<Arc<dyn Provider>>;

    /// The node-side bootstrap of a [`NodeStartup::SelfStarting`] provider:
    /// a minijinja template of the user data (cloud-init, startup-script,
    /// custom data) that installs the runtime from `runtime_url` (checked
    /// against `runtime_sha256`), writes `agent_config` with the line
    /// `printf '%s\n' {{ agent_config }} > /var/lib/motorpool/agent-config.json`
    /// (tools read the config back from that line) and starts
    /// `motorpool agent` on `port` with the instance's own id. Every value is
    /// shell-quoted by the renderer.
    fn user_data_template(&self) -> Option<&'static str> {
        None
    }

    /// Whether these settings name a place this provider publishes the
    /// runtime to ([`crate::Provider::publish_runtime`]), so the spec need
    /// not give `runtime_url`.
    fn publishes_runtime(&self, _settings: &Value) -> bool {
        false
    }

    /// Whether these settings give a cluster's driver node a public address
    /// that the machine running the CLI may dial (opened by the provider
    /// only to the address ranges the settings list). When true, the CLI
    /// dials a driver's agent and driver at the public IP the provider
    /// reports ([`crate::NodeIps::public`]) instead of the private address
    /// the agent published.
    fn public_driver(&self, _settings: &Value) -> bool {
        false
    }

    /// What to tell a user whose machine cannot reach a node at the address
    /// its agent published (a cloud's private network): the setting to use.
    fn reach_hint(&self) -> Option<&'static str> {
        None
    }
}

/// What a node of a provider that keeps its state under `$MOTORPOOL_HOME`
/// (local, sim) is told: the home and the settings. Read back with
/// [`node_home_settings`].
pub fn with_home(settings: &Value, env: &ConnectEnv) -> Result<Value> {
    Ok(serde_json::json!({ "home": env.home, "settings": settings }))
}

/// The connect environment and settings of what [`with_home`] gave a node.
pub fn node_home_settings(node: &Value, env: &ConnectEnv) -> Result<(ConnectEnv, Value)> {
    let home = node
        .get("home")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| {
            crate::ProviderError::invalid(
                None,
                "the node's provider settings name no home directory",
            )
        })?;
    let env = ConnectEnv {
        home,
        agent_program: env.agent_program.clone(),
    };
    Ok((env, node.get("settings").cloned().unwrap_or(Value::Null)))
}

/// The settings block as a JSON object, for plugins that read it with serde.
pub fn settings_from<T: serde::de::DeserializeOwned>(kind: &str, settings: &Value) -> Result<T> {
    serde_json::from_value(settings.clone()).map_err(|e| {
        crate::ProviderError::invalid(
            Some("provider".to_string()),
            format!("the {kind} provider's settings are not valid: {e}"),
        )
    })
}
