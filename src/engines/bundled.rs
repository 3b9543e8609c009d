//! The bundled runtime behind the engine seam: the driver role serves
//! [`crate::runtime::driver`], the worker role an executor
//! ([`crate::runtime::executor`]) registered with it, and jobs go through
//! [`crate::runtime::client`]. This module only adapts; the runtime's rules
//! live in `crate::runtime`.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{
    DriverAccess, EngineError, EnginePlugin, LogFile, RoleContext, RoleStart, RunBrief,
    RunningRole, Unsupported,
};
use crate::auth::Credential;
use crate::runtime::client::{self, JobSubmission};
use crate::runtime::{Progress, RunSummary, driver, executor};

/// The engine's kind in the spec: the default engine.
pub const KIND: &str = crate::spec::DEFAULT_ENGINE;

/// motorpool's own driver/executor runtime over gRPC.
pub struct BundledRuntime;

/// Starts the bundled driver for `context`'s cluster, with the engine
/// that runs beside it (Spark) when there is one.
pub(super) async fn start_driver(
    context: &RoleContext,
    engine: Option<Arc<dyn driver::EngineTasks>>,
) -> Result<Driver, EngineError> {
    let mut config = driver::DriverConfig::new(
        context.listen,
        context.credential.clone(),
        context.dir.join("driver"),
    );
    config.minute = context.minute;
    config.tls = context.tls.clone();
    config.engine = engine;
    let handle = driver::serve(config)
        .await
        .map_err(|e| EngineError::Start {
            role: "driver",
            reason: format!("{e:#}"),
        })?;
    Ok(Driver {
        address: handle.address().to_string(),
        handle: Mutex::new(Some(handle)),
        credential: context.credential.clone(),
    })
}

/// The driver, with what its status needs.
pub(super) struct Driver {
    address: String,
    handle: Mutex<Option<driver::DriverHandle>>,
    credential: Credential,
}

struct Executor {
    address: String,
    handle: Mutex<Option<executor::ExecutorHandle>>,
}

#[async_trait]
impl RunningRole for Driver {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn workers(&self) -> Result<Vec<String>, EngineError> {
        let executors = match &*self.handle.lock().await {
            Some(handle) => handle.executors().await,
            None => return Err(EngineError::Unreachable("the driver stopped".into())),
        };
        Ok(executors
            .map_err(|e| EngineError::Unreachable(format!("{e:#}")))?
            .into_iter()
            .map(|e| e.executor_id)
            .collect())
    }

    async fn running_jobs(&self) -> Result<u32, EngineError> {
        let running = client::active_run_count(&self.address, &self.credential)
            .await
            .map_err(|e| EngineError::Unreachable(format!("{e:#}")))?;
        Ok(running as u32)
    }

    async fn load(&self) -> Result<Option<super::ClusterLoad>, EngineError> {
        let status = client::cluster_status(&self.address, &self.credential)
            .await
            .map_err(|e| EngineError::Unreachable(format!("{e:#}")))?;
        Ok(Some(super::ClusterLoad {
            queued_tasks: status.queued_tasks,
            running_tasks: status.executors.iter().map(|e| e.running_tasks).sum(),
            slots: status.executors.iter().map(|e| e.cores).sum(),
        }))
    }

    async fn shutdown(&self) {
        if let Some(handle) = self.handle.lock().await.take() {
            let _ = handle.shutdown().await;
        }
    }
}

#[async_trait]
impl RunningRole for Executor {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn workers(&self) -> Result<Vec<String>, EngineError> {
        Err(super::ask_the_driver("an executor"))
    }

    async fn running_jobs(&self) -> Result<u32, EngineError> {
        Err(super::ask_the_driver("an executor"))
    }

    async fn shutdown(&self) {
        if let Some(handle) = self.handle.lock().await.take() {
            let _ = handle.shutdown().await;
        }
    }
}

#[async_trait]
impl EnginePlugin for BundledRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn description(&self) -> &'static str {
        "motorpool's bundled driver/executor runtime (map/reduce and commands over gRPC)"
    }

    fn check_version(&self, version: &str) -> Result<(), Unsupported> {
        if version == crate::spec::DEFAULT_RUNTIME {
            Ok(())
        } else {
            Err(Unsupported(format!(
                "the motorpool engine has one version, \"{}\"",
                crate::spec::DEFAULT_RUNTIME
            )))
        }
    }

    fn check_task(&self, task: &crate::spec::Task) -> Result<(), Unsupported> {
        if task.spark.is_some() {
            return Err(Unsupported(format!(
                "a `spark:` task needs a cluster with `engine: {{ kind: {}, version: \"{}\" }}`; \
                 this one runs the motorpool engine",
                super::spark::KIND,
                super::spark::DEFAULT_VERSION
            )));
        }
        Ok(())
    }

    async fn start_role(
        &self,
        role: RoleStart,
        context: RoleContext,
    ) -> Result<Arc<dyn RunningRole>, EngineError> {
        match role {
            RoleStart::Driver => Ok(Arc::new(start_driver(&context, None).await?)),
            RoleStart::Worker { driver_address } => {
                let mut config = executor::ExecutorConfig::new(
                    driver_address,
                    context.credential,
                    context.dir.join("executor"),
                );
                if context.cores > 0 {
                    config.cores = context.cores as usize;
                }
                config.listen = context.listen;
                config.tls = context.tls;
                let handle = executor::serve(config)
                    .await
                    .map_err(|e| EngineError::Start {
                        role: "executor",
                        reason: format!("{e:#}"),
                    })?;
                Ok(Arc::new(Executor {
                    address: handle.address().to_string(),
                    handle: Mutex::new(Some(handle)),
                }))
            }
        }
    }

    async fn run_job(
        &self,
        driver: &DriverAccess,
        submission: JobSubmission,
        on_progress: &mut (dyn for<'p> FnMut(&'p Progress) + Send),
    ) -> Result<RunSummary, EngineError> {
        let forward = |p: &Progress| on_progress(p);
        Ok(client::run_job(&driver.address, &driver.credential, submission, forward).await?)
    }

    async fn runs(
        &self,
        driver: &DriverAccess,
        job: Option<&str>,
    ) -> Result<Vec<RunBrief>, EngineError> {
        Ok(client::list_runs(&driver.address, &driver.credential, job)
            .await?
            .into_iter()
            .map(|r| RunBrief {
                run_id: r.run_id,
                job: r.name,
                state: r.state,
            })
            .collect())
    }

    async fn cancel_run(&self, driver: &DriverAccess, run_id: &str) -> Result<bool, EngineError> {
        Ok(client::cancel_run(&driver.address, &driver.credential, run_id).await?)
    }

    async fn logs(&self, driver: &DriverAccess, run_id: &str) -> Result<Vec<LogFile>, EngineError> {
        let logs = client::fetch_logs(
            &driver.address,
            &driver.credential,
            Some(run_id),
            None,
            None,
        )
        .await?;
        Ok(logs
            .files
            .into_iter()
            .map(|f| LogFile {
                task: f.task,
                name: f.name,
                text: f.text,
                truncated: f.truncated,
            })
            .collect())
    }
}
