//! The simulated cloud's registration with the engine: its settings block
//! (latency, faults, capacity, page size, boot time), its capabilities
//! (nodes run nothing: a running instance counts as started) and how to
//! connect.

use std::sync::Arc;
use std::time::Duration;

use motorpool_provider::{
    Capabilities, ConnectEnv, NodeStartup, NodeType, Provider, ProviderError, ProviderPlugin,
    Result, SettingProblem, node_home_settings, settings_from, with_home,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{KIND, SimConfig, SimProvider};

/// Settings of the simulated cloud.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimSettings {
    /// Latency of every API call, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Fraction (0..1) of calls refused as throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_rate: Option<f64>,
    /// Fraction (0..1) of calls failing with a server error (some after the change was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Most live (pending or running) instances at once; launches beyond fail with a capacity error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Instances listed per page (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Seconds from launch until an instance reports running (a simulated VM boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_seconds: Option<f64>,
}

impl SimSettings {
    /// The provider's configuration under `home` (`$MOTORPOOL_HOME`).
    pub fn config(&self, home: std::path::PathBuf) -> Result<SimConfig> {
        let defaults = SimConfig::default();
        Ok(SimConfig {
            home,
            latency: self
                .latency_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.latency),
            throttle_rate: self.throttle_rate.unwrap_or(defaults.throttle_rate),
            error_rate: self.error_rate.unwrap_or(defaults.error_rate),
            capacity: self.capacity.or(defaults.capacity),
            page_size: self
                .page_size
                .map(|n| n as usize)
                .unwrap_or(defaults.page_size),
            boot_time: match self.boot_seconds {
                None => defaults.boot_time,
                Some(secs) => Duration::try_from_secs_f64(secs).map_err(|_| {
                    ProviderError::invalid(
                        Some("provider.boot_seconds".to_string()),
                        format!("{secs} is not a number of seconds"),
                    )
                })?,
            },
            seed: defaults.seed,
        })
    }
}

/// A simulated cloud: records in a file, with latency, throttling and errors.
pub struct SimPlugin;

fn settings(value: &Value) -> Result<SimSettings> {
    if value.is_null() {
        return Ok(SimSettings::default());
    }
    settings_from(KIND, value)
}

impl ProviderPlugin for SimPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "A simulated cloud: records in a file, with latency, throttling and errors."
    }

    fn settings_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(SimSettings)).unwrap_or(Value::Bool(true))
    }

    fn check_settings(&self, value: &Value) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        let number = |key: &str| value.get(key).and_then(Value::as_f64);
        if number("page_size") == Some(0.0) {
            problems.push(SettingProblem::at(
                &["page_size"],
                "`page_size` of the provider must be at least 1",
            ));
        }
        for key in ["throttle_rate", "error_rate"] {
            if let Some(v) = number(key).filter(|v| !(0.0..=1.0).contains(v)) {
                problems.push(SettingProblem::at(
                    &[key],
                    format!("`{key}` of the provider must be between 0 and 1, found {v}"),
                ));
            }
        }
        if let Some(v) = number("boot_seconds").filter(|v| *v < 0.0) {
            problems.push(SettingProblem::at(
                &["boot_seconds"],
                format!("`boot_seconds` of the provider must not be negative, found {v}"),
            ));
        }
        problems
    }

    fn catalog(&self) -> Vec<NodeType> {
        crate::catalog()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            node_startup: NodeStartup::Simulated,
            user_data_limit: None,
            stop_start: true,
        }
    }

    fn connect(&self, value: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let config = settings(value)?.config(env.home.clone())?;
        Ok(Arc::new(SimProvider::new(config)?))
    }

    /// A simulated node reaches the same account file as the CLI.
    fn node_settings(&self, value: &Value, env: &ConnectEnv) -> Result<Value> {
        with_home(value, env)
    }

    fn connect_from_node(&self, node: &Value, env: &ConnectEnv) -> Result<Arc<dyn Provider>> {
        let (env, settings) = node_home_settings(node, env)?;
        self.connect(&settings, &env)
    }
}
