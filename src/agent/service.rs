//! The `motorpool.agent.v1.Agent` service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::proto::{self, agent_server::Agent};

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

#[derive(Debug, Clone)]
pub(crate) struct AgentService {
    info: Arc<AgentInfo>,
}

impl AgentService {
    pub(crate) fn new(info: AgentInfo) -> Self {
        AgentService {
            info: Arc::new(info),
        }
    }
}

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
            capabilities: Vec::new(),
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
}
