//! The local provider's registration with the engine: its settings block
//! (`provider: { kind: local, page_size: 100 }`), its capabilities (the
//! engine reaches every agent on loopback and drives its startup) and how to
//! connect, from the CLI and from a node.

use std::sync::Arc;

use motorpool_provider::{
    Capabilities, ConnectEnv, NodeStartup, NodeType, Provider, ProviderPlugin, Result,
    SettingProblem, node_home_settings, settings_from, with_home,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{LocalConfig, LocalProvider};

/// The kind in the spec.
pub const KIND: &str = "local";

/// Settings of the local provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// Instances listed per page (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
}

/// Every instance is a real `motorpool agent` process on this machine.
pub struct LocalPlugin;

impl LocalPlugin {
    fn provider(settings: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let settings: LocalSettings = if settings.is_null() {
            LocalSettings::default()
        } else {
            settings_from(KIND, settings)?
        };
        let mut config = LocalConfig::new(env.home.clone(), env.agent_program.clone());
        if let Some(n) = settings.page_size {
            config.page_size = n as usize;
        }
        Ok(Arc::new(LocalProvider::new(config)?))
    }
}

impl ProviderPlugin for LocalPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "Every instance is a real `motorpool agent` process on this machine."
    }

    fn settings_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(LocalSettings)).unwrap_or(Value::Bool(true))
    }

    fn check_settings(&self, settings: &Value) -> Vec<SettingProblem> {
        match settings.get("page_size").and_then(Value::as_u64) {
            Some(0) => vec![SettingProblem::at(
                &["page_size"],
                "`page_size` of the provider must be at least 1",
            )],
            _ => Vec::new(),
        }
    }

    fn catalog(&self) -> Vec<NodeType> {
        crate::catalog()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            node_startup: NodeStartup::EngineDriven,
            user_data_limit: None,
            stop_start: true,
        }
    }

    fn connect(&self, settings: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        Self::provider(settings, env)
    }

    /// A local node reaches the provider under the same home as the CLI.
    fn node_settings(&self, settings: &Value, env: &ConnectEnv) -> Result<Value> {
        with_home(settings, env)
    }

    fn connect_from_node(&self, node: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let (env, settings) = node_home_settings(node, env)?;
        Self::provider(&settings, &env)
    }
}
