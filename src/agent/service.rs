//! The `motorpool.agent.v1.Agent` service.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::proto::{self, agent_server::Agent};
use super::runtime_host::RuntimeHost;
use super::steps::StepRunner;

/// What the agent knows about itself.
#[derive(Debug, Clone)]
pub(crate) struct AgentInfo {
    pub instance_id: String,
    pub pid: u32,
    pub version: String,
    pub started_at_unix: u64,
    pub started: Instant,
    pub dir: PathBuf,
}

/// How the runtime the agent hosts speaks: the node's TLS settings and where it listens.
#[derive(Debug, Clone)]
pub struct RuntimeTls {
    /// The node's certificate, for the driver's or executor's server.
    pub server: Option<crate::tls::ServerTls>,
    /// The project CA, for the executor's clients (of the driver, of its peers).
    pub trust: Option<crate::tls::Trust>,
    /// The agent's listen IP; the runtime listens on the same one.
    pub listen_ip: std::net::IpAddr,
    /// The runtime's port on that IP (0: any free one).
    pub runtime_port: u16,
}

#[derive(Clone)]
pub(crate) struct AgentService {
    info: Arc<AgentInfo>,
    steps: Arc<StepRunner>,
    runtime: Arc<RuntimeHost>,
}

impl AgentService {
    pub(crate) fn new(
        info: AgentInfo,
        on_idle: Option<super::runtime_host::OnIdle>,
        on_broken: Option<super::runtime_host::OnBroken>,
        tls: RuntimeTls,
    ) -> Self {
        let steps = Arc::new(StepRunner::new(&info.dir));
        let mut runtime = RuntimeHost::new(info.dir.clone(), steps.clone(), tls);
        if let Some(on_idle) = on_idle {
            runtime = runtime.with_on_idle(on_idle);
        }
        if let Some(on_broken) = on_broken {
            runtime = runtime.with_on_broken(on_broken);
        }
        let runtime = Arc::new(runtime);
        AgentService {
            info: Arc::new(info),
            steps,
            runtime,
        }
    }

    /// The runtime this agent hosts (stopped with the agent).
    pub(crate) fn runtime(&self) -> Arc<RuntimeHost> {
        self.runtime.clone()
    }

    pub(crate) fn steps(&self) -> Arc<StepRunner> {
        self.steps.clone()
    }
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::StepEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn identity(
        &self,
        _request: Request<proto::IdentityRequest>,
    ) -> Result<Response<proto::IdentityResponse>, Status> {
        let info = &self.info;
        Ok(Response::new(proto::IdentityResponse {
            instance_id: info.instance_id.clone(),
            pid: info.pid,
            version: info.version.clone(),
            started_at_unix: info.started_at_unix,
            dir: info.dir.to_string_lossy().into_owned(),
            protocol_version: super::PROTOCOL_VERSION,
            capabilities: vec!["steps".into(), "runtime".into()],
        }))
    }

    async fn health(
        &self,
        _request: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        let uptime = self.info.started.elapsed();
        Ok(Response::new(proto::HealthResponse {
            ok: true,
            uptime_ms: u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
            detail: String::new(),
        }))
    }

    type RunStepStream = EventStream;

    async fn run_step(
        &self,
        request: Request<proto::RunStepRequest>,
    ) -> Result<Response<Self::RunStepStream>, Status> {
        let request = request.into_inner();
        if request.step.is_empty() {
            return Err(Status::invalid_argument("a step needs a name"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let steps = self.steps.clone();
        // The step runs to its end even if the caller goes away.
        tokio::spawn(async move { steps.run(request, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_state(
        &self,
        _request: Request<proto::GetStateRequest>,
    ) -> Result<Response<proto::NodeState>, Status> {
        let state = self.steps.snapshot().await;
        let (engine, engine_info) = self.runtime.describe().await;
        Ok(Response::new(proto::NodeState {
            steps: state.steps.iter().map(Into::into).collect(),
            runtime_role: state.runtime_role,
            driver_address: state.driver_address,
            engine,
            engine_info: engine_info.into_iter().collect(),
        }))
    }

    async fn step_log(
        &self,
        request: Request<proto::StepLogRequest>,
    ) -> Result<Response<proto::StepLogResponse>, Status> {
        let path = self.steps.log_path(&request.into_inner().step);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(Response::new(proto::StepLogResponse { text })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Status::not_found("no such step on this node"))
            }
            Err(e) => Err(Status::internal(format!("cannot read the step log: {e}"))),
        }
    }

    async fn start_runtime(
        &self,
        request: Request<proto::StartRuntimeRequest>,
    ) -> Result<Response<proto::StartRuntimeResponse>, Status> {
        // Where the caller reached this agent: the runtime is reachable there too.
        let local_ip = request.local_addr().map(|a| a.ip());
        let address = self.runtime.start(request.into_inner(), local_ip).await?;
        Ok(Response::new(proto::StartRuntimeResponse { address }))
    }

    async fn driver_status(
        &self,
        _request: Request<proto::DriverStatusRequest>,
    ) -> Result<Response<proto::DriverStatusResponse>, Status> {
        Ok(Response::new(self.runtime.driver_status().await?))
    }

    async fn stop_runtime(
        &self,
        _request: Request<proto::StopRuntimeRequest>,
    ) -> Result<Response<proto::StopRuntimeResponse>, Status> {
        self.runtime.stop().await;
        Ok(Response::new(proto::StopRuntimeResponse {}))
    }
}
