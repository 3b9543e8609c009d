//! The `motorpool.runtime.v1.Executor` service: map output to reducers.

use std::io::Read;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ExecState;
use crate::runtime::proto::{self, executor_server::Executor};
use crate::runtime::{CHUNK, safe_id, shuffle};

pub(crate) struct ExecutorService {
    state: Arc<ExecState>,
}

impl ExecutorService {
    pub(crate) fn new(state: Arc<ExecState>) -> ExecutorService {
        ExecutorService { state }
    }
}

#[tonic::async_trait]
impl Executor for ExecutorService {
    type FetchShuffleStream = ReceiverStream<Result<proto::ShuffleChunk, Status>>;

    async fn fetch_shuffle(
        &self,
        request: Request<proto::FetchShuffleRequest>,
    ) -> Result<Response<Self::FetchShuffleStream>, Status> {
        let r = request.into_inner();
        safe_id(&r.run_id)?;
        let dir = self.state.shuffle_dir(&r.run_id);
        let partition = r.reduce_partition as usize;
        let (tx, rx) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            for map_attempt in r.map_attempt_ids {
                let mut seg = match shuffle::open_segment(&dir, map_attempt, partition) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::not_found(format!(
                            "map output {map_attempt}: {e:#}"
                        ))));
                        return;
                    }
                };
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let mut n = 0;
                    while n < CHUNK {
                        match seg.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let _ = tx.blocking_send(Err(Status::data_loss(format!(
                                    "map output {map_attempt}: {e}"
                                ))));
                                return;
                            }
                        }
                    }
                    buf.truncate(n);
                    let last = n < CHUNK;
                    let chunk = proto::ShuffleChunk {
                        map_attempt_id: map_attempt,
                        data: buf,
                        last,
                    };
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                    if last {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn executor_info(
        &self,
        _request: Request<proto::ExecutorInfoRequest>,
    ) -> Result<Response<proto::ExecutorInfoResponse>, Status> {
        Ok(Response::new(proto::ExecutorInfoResponse {
            executor_id: self.state.id(),
            pid: std::process::id(),
            cores: self.state.cores as u32,
            version: crate::runtime::VERSION.to_string(),
        }))
    }
}
