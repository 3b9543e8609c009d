//! The one place where providers (and engines) are registered.
//!
//! The engine and the agent build providers from here and nowhere else:
//! [`Registry::builtin`] lists the crates compiled into this binary (each
//! cloud is a cargo feature), and a program embedding motorpool (a test
//! binary, say) may [`Registry::install`] a registry with more before it
//! does anything else. Nothing outside this module names a provider kind.

use std::sync::{Arc, OnceLock};

use motorpool_provider::ProviderPlugin;

use crate::engines::{BundledRuntime, EngineError, EnginePlugin};

/// The providers and engines this process knows.
#[derive(Clone)]
pub struct Registry {
    providers: Vec<Arc<dyn ProviderPlugin>>,
    engines: Vec<Arc<dyn EnginePlugin>>,
}

static INSTALLED: OnceLock<Registry> = OnceLock::new();

pub use crate::spec::DEFAULT_PROVIDER;

impl Registry {
    /// Everything compiled into this binary: local always, sim and each
    /// cloud when its cargo feature is on; the bundled runtime engine.
    pub fn builtin() -> Registry {
        let providers: Vec<Arc<dyn ProviderPlugin>> = vec![
            Arc::new(motorpool_local::LocalPlugin),
            #[cfg(feature = "sim")]
            Arc::new(motorpool_sim::SimPlugin),
            #[cfg(feature = "aws")]
            Arc::new(motorpool_aws::AwsPlugin),
            #[cfg(feature = "gcp")]
            Arc::new(motorpool_gcp::GcpPlugin),
            #[cfg(feature = "azure")]
            Arc::new(motorpool_azure::AzurePlugin),
        ];
        Registry {
            providers,
            engines: vec![Arc::new(BundledRuntime), Arc::new(crate::engines::Spark)],
        }
    }

    /// Add (or replace, by kind) a provider.
    pub fn with_provider(mut self, plugin: Arc<dyn ProviderPlugin>) -> Registry {
        self.providers.retain(|p| p.kind() != plugin.kind());
        self.providers.push(plugin);
        self
    }

    /// Add (or replace, by kind) an engine.
    pub fn with_engine(mut self, plugin: Arc<dyn EnginePlugin>) -> Registry {
        self.engines.retain(|e| e.kind() != plugin.kind());
        self.engines.push(plugin);
        self
    }

    /// Make this the process's registry. Call it first thing: once anything
    /// has used [`Registry::global`], the registry is fixed and this fails.
    pub fn install(self) -> Result<(), Registry> {
        INSTALLED.set(self)
    }

    /// The process's registry: the installed one, else [`Registry::builtin`].
    pub fn global() -> &'static Registry {
        INSTALLED.get_or_init(Registry::builtin)
    }

    pub fn provider(&self, kind: &str) -> Option<&dyn ProviderPlugin> {
        self.providers
            .iter()
            .find(|p| p.kind() == kind)
            .map(|p| p.as_ref())
    }

    pub fn providers(&self) -> impl Iterator<Item = &dyn ProviderPlugin> {
        self.providers.iter().map(|p| p.as_ref())
    }

    /// Every provider kind, for messages (`one of local, sim, aws`).
    pub fn provider_kinds(&self) -> Vec<&'static str> {
        self.providers.iter().map(|p| p.kind()).collect()
    }

    pub fn engine(&self, kind: &str) -> Option<&dyn EnginePlugin> {
        self.engines
            .iter()
            .find(|e| e.kind() == kind)
            .map(|e| e.as_ref())
    }

    /// The registered engine of this kind, or an error naming it.
    pub fn engine_or_error(&self, kind: &str) -> Result<&dyn EnginePlugin, EngineError> {
        self.engine(kind)
            .ok_or_else(|| EngineError::Unknown(kind.to_string()))
    }

    pub fn engines(&self) -> impl Iterator<Item = &dyn EnginePlugin> {
        self.engines.iter().map(|e| e.as_ref())
    }

    pub fn engine_kinds(&self) -> Vec<&'static str> {
        self.engines.iter().map(|e| e.kind()).collect()
    }
}
