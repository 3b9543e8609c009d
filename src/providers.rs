//! Connecting to the spec's provider, and calling it politely.
//!
//! [`connect`] turns a spec's `provider:` block into a live provider.
//! [`ProviderClient`] wraps every call the engine makes with a client-side rate
//! limit, retries with exponential backoff and jitter on the provider's typed
//! retryable errors (throttling, 5xx), and counters that apply and the
//! benchmarks report. The engine never calls a `Provider` directly.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use motorpool_provider::{
    Capabilities, ConnectEnv, Instance, LaunchRequest, NodeType, Provider, ProviderError,
    ProviderPlugin, Retag, TagFilter, backoff_delay,
};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::home::Home;
use crate::registry::Registry;
use crate::spec::ProviderBlock;

/// The registered plugin of the spec's provider.
pub fn plugin(block: &ProviderBlock) -> Result<&'static dyn ProviderPlugin, ProviderError> {
    let registry = Registry::global();
    registry.provider(block.kind()).ok_or_else(|| {
        ProviderError::invalid(
            Some("provider.kind".to_string()),
            format!(
                "this motorpool knows no provider `{}` (it has {}; a cloud missing here \
                 was left out of the build: its cargo feature is off)",
                block.kind(),
                registry.provider_kinds().join(", ")
            ),
        )
    })
}

/// What connecting from this machine may use.
pub fn connect_env(home: &Home) -> Result<ConnectEnv, ProviderError> {
    Ok(ConnectEnv {
        home: home.root().to_path_buf(),
        agent_program: agent_program()?,
    })
}

/// Turn the spec's provider block into a provider client.
pub fn connect(block: &ProviderBlock, home: &Home) -> Result<ProviderClient, ProviderError> {
    let plugin = plugin(block)?;
    let provider = plugin.connect(&block.settings_value(), &connect_env(home)?)?;
    Ok(ProviderClient::new(provider, plugin.capabilities()))
}

/// The program local instances run as their agent: `$MOTORPOOL_AGENT_PROGRAM`,
/// or this very binary.
pub fn agent_program() -> Result<PathBuf, ProviderError> {
    if let Some(p) = std::env::var_os("MOTORPOOL_AGENT_PROGRAM") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe().map_err(|e| {
        ProviderError::Internal(format!(
            "cannot find the motorpool binary to run agents: {e}"
        ))
    })
}

/// How often and how long to retry a retryable provider error.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        }
    }
}

/// What the client did, for apply's summary and the benchmarks.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CallStats {
    /// Every request sent, retries included.
    pub calls: u64,
    /// Pages listed.
    pub list_calls: u64,
    /// Requests sent again after a retryable error.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    list_calls: AtomicU64,
    retries: AtomicU64,
}

/// A token bucket: `rate` calls per second, bursts of up to `rate` calls.
struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            50.0
        };
        RateLimiter {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    async fn acquire(&self) {
        let wait = {
            let mut state = self.state.lock().await;
            let (tokens, last) = *state;
            let now = Instant::now();
            let refilled =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
            let left = refilled - 1.0;
            *state = (left, now);
            if left >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-left / self.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A provider behind a rate limit, retries and counters.
pub struct ProviderClient {
    inner: Arc<dyn Provider>,
    capabilities: Capabilities,
    limiter: RateLimiter,
    retry: RetryPolicy,
    counters: Counters,
}

impl ProviderClient {
    pub fn new(inner: Arc<dyn Provider>, capabilities: Capabilities) -> Self {
        let rate = inner.calls_per_second();
        ProviderClient {
            inner,
            capabilities,
            limiter: RateLimiter::new(rate),
            retry: RetryPolicy::default(),
            counters: Counters::default(),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn kind(&self) -> &str {
        self.inner.kind()
    }

    /// What the engine asks instead of the provider's name.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    pub fn catalog(&self) -> &[NodeType] {
        self.inner.catalog()
    }

    pub fn default_image(&self) -> String {
        self.inner.default_image()
    }

    pub fn stats(&self) -> CallStats {
        CallStats {
            calls: self.counters.calls.load(Ordering::Relaxed),
            list_calls: self.counters.list_calls.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }

    /// Run one provider call with the rate limit and retries.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut attempt = 0;
        loop {
            self.limiter.acquire().await;
            self.counters.calls.fetch_add(1, Ordering::Relaxed);
            match f().await {
                Err(e) if e.is_retryable() && attempt + 1 < self.retry.max_attempts => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let delay =
                        backoff_delay(attempt, self.retry.base, self.retry.cap, fastrand::f64());
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Every instance matching `filter`, page by page: one call per page.
    pub async fn list_all(&self, filter: &TagFilter) -> Result<Vec<Instance>, ProviderError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.counters.list_calls.fetch_add(1, Ordering::Relaxed);
            let page = self
                .call(|| self.inner.list_page(filter, token.clone()))
                .await?;
            all.extend(page.instances);
            match page.next_token {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    pub async fn launch(&self, request: &LaunchRequest) -> Result<Vec<Instance>, ProviderError> {
        self.call(|| self.inner.launch(request)).await
    }

    pub async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        self.call(|| self.inner.terminate(ids)).await
    }

    pub async fn stop(&self, ids: &[String]) -> Result<(), ProviderError> {
        self.call(|| self.inner.stop(ids)).await
    }

    pub async fn start(&self, ids: &[String]) -> Result<(), ProviderError> {
        self.call(|| self.inner.start(ids)).await
    }

    pub async fn retag(&self, ids: &[String], change: &Retag) -> Result<(), ProviderError> {
        self.call(|| self.inner.retag(ids, change)).await
    }

    pub async fn put_cluster_boot(&self, name: &str, document: &str) -> Result<(), ProviderError> {
        self.call(|| self.inner.put_cluster_boot(name, document))
            .await
    }

    pub async fn get_cluster_boot(&self, name: &str) -> Result<Option<String>, ProviderError> {
        self.call(|| self.inner.get_cluster_boot(name)).await
    }

    /// The instances among `ids` that exist (a look-up by id, not a list).
    pub async fn describe(&self, ids: &[String]) -> Result<Vec<Instance>, ProviderError> {
        self.call(|| self.inner.describe(ids)).await
    }

    pub async fn delete_cluster_boot(&self, name: &str) -> Result<(), ProviderError> {
        self.call(|| self.inner.delete_cluster_boot(name)).await
    }

    /// Publish the runtime for the nodes; see [`Provider::publish_runtime`].
    pub async fn publish_runtime(
        &self,
        runtime: &motorpool_provider::RuntimeUpload,
    ) -> Result<Option<String>, ProviderError> {
        self.call(|| self.inner.publish_runtime(runtime)).await
    }

    pub async fn try_lock(
        &self,
        project: &str,
        lock: &motorpool_provider::LockInfo,
    ) -> Result<motorpool_provider::LockAttempt, ProviderError> {
        self.call(|| self.inner.try_lock(project, lock)).await
    }

    pub async fn renew_lock(
        &self,
        project: &str,
        lock: &motorpool_provider::LockInfo,
    ) -> Result<(), ProviderError> {
        self.call(|| self.inner.renew_lock(project, lock)).await
    }

    pub async fn read_lock(
        &self,
        project: &str,
    ) -> Result<Option<motorpool_provider::LockInfo>, ProviderError> {
        self.call(|| self.inner.read_lock(project)).await
    }

    pub async fn unlock(&self, project: &str, id: &str) -> Result<(), ProviderError> {
        self.call(|| self.inner.unlock(project, id)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use motorpool_provider::Page;
    use std::sync::atomic::AtomicU32;

    /// Throttles the first `failures` calls, then answers with an empty page.
    struct Flaky {
        failures: AtomicU32,
        error: ProviderError,
    }

    #[async_trait]
    impl Provider for Flaky {
        fn kind(&self) -> &str {
            "flaky"
        }
        fn catalog(&self) -> &[NodeType] {
            &[]
        }
        fn default_image(&self) -> String {
            "img".into()
        }
        fn calls_per_second(&self) -> f64 {
            10_000.0
        }
        async fn list_page(&self, _: &TagFilter, _: Option<String>) -> Result<Page, ProviderError> {
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(self.error.clone());
            }
            Ok(Page::default())
        }
        async fn describe(&self, _: &[String]) -> Result<Vec<Instance>, ProviderError> {
            Ok(vec![])
        }
        async fn launch(&self, _: &LaunchRequest) -> Result<Vec<Instance>, ProviderError> {
            Ok(vec![])
        }
        async fn terminate(&self, _: &[String]) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn stop(&self, _: &[String]) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn start(&self, _: &[String]) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn retag(&self, _: &[String], _: &Retag) -> Result<(), ProviderError> {
            Ok(())
        }
    }

    fn flaky_capabilities() -> Capabilities {
        Capabilities {
            node_startup: motorpool_provider::NodeStartup::Simulated,
            user_data_limit: None,
            stop_start: true,
        }
    }

    fn fast_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(4),
        }
    }

    #[tokio::test]
    async fn throttling_is_retried_and_counted() {
        let client = ProviderClient::new(
            Arc::new(Flaky {
                failures: AtomicU32::new(3),
                error: ProviderError::Throttled("slow down".into()),
            }),
            flaky_capabilities(),
        )
        .with_retry(fast_retry());
        let all = client
            .list_all(&TagFilter::new())
            .await
            .expect("retried to success");
        assert!(all.is_empty());
        assert_eq!(client.stats().retries, 3);
        assert_eq!(client.stats().calls, 4);
        assert_eq!(client.stats().list_calls, 1);
    }

    #[tokio::test]
    async fn errors_that_are_not_retryable_fail_at_once() {
        let client = ProviderClient::new(
            Arc::new(Flaky {
                failures: AtomicU32::new(1),
                error: ProviderError::Auth("expired".into()),
            }),
            flaky_capabilities(),
        )
        .with_retry(fast_retry());
        let err = client
            .list_all(&TagFilter::new())
            .await
            .expect_err("auth is final");
        assert!(matches!(err, ProviderError::Auth(_)));
        assert_eq!(client.stats().retries, 0);
    }

    #[tokio::test]
    async fn retries_give_up_after_max_attempts() {
        let client = ProviderClient::new(
            Arc::new(Flaky {
                failures: AtomicU32::new(100),
                error: ProviderError::Server("503".into()),
            }),
            flaky_capabilities(),
        )
        .with_retry(fast_retry());
        let err = client
            .list_all(&TagFilter::new())
            .await
            .expect_err("gives up");
        assert!(matches!(err, ProviderError::Server(_)));
        assert_eq!(client.stats().calls, 5);
    }
}
