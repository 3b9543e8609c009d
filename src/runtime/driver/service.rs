//! The `motorpool.runtime.v1.Driver` service: moves bytes (bundles, inputs,
//! outputs, logs) and turns calls into scheduler events.

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::scheduler::{Event, NewRun};
use super::store::{self, JobRecord};
use super::{RunFiles, Shared, StagedInput};
use crate::runtime::bundle::{self, MAX_BUNDLE_BYTES};
use crate::runtime::plan::{self, DEFAULT_PARTITION_MB};
use crate::runtime::proto::{self, driver_server::Driver};
use crate::runtime::{CHUNK, read_chunk, safe_id, safe_relative};
use crate::runtime::{jobdef, local};
use crate::spec::Job;

pub(crate) struct DriverService {
    shared: Arc<Shared>,
}

impl DriverService {
    pub(crate) fn new(shared: Arc<Shared>) -> DriverService {
        DriverService { shared }
    }

    fn event(&self, ev: Event) -> Result<(), Status> {
        self.shared
            .events
            .send(ev)
            .map_err(|_| Status::unavailable("the driver is stopping"))
    }
}

/// Writes one file on a blocking thread; chunks are handed over, not copied.
struct FileWriter {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    path: PathBuf,
}

impl FileWriter {
    fn create(path: PathBuf) -> FileWriter {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let p = path.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::create(&p)?;
            while let Some(buf) = rx.blocking_recv() {
                f.write_all(&buf)?;
            }
            Ok(())
        });
        FileWriter {
            tx: Some(tx),
            done,
            path,
        }
    }

    async fn write(&mut self, data: Vec<u8>) -> Result<(), Status> {
        let sent = match &self.tx {
            Some(tx) => tx.send(data).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        self.tx = None;
        // The writer stopped: its error says why.
        match (&mut self.done).await {
            Ok(Err(e)) => Err(Status::internal(format!(
                "cannot write {}: {e}",
                self.path.display()
            ))),
            _ => Err(Status::internal(format!(
                "cannot write {}",
                self.path.display()
            ))),
        }
    }

    async fn finish(mut self) -> Result<(), Status> {
        self.tx = None;
        match self.done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Status::internal(format!(
                "cannot write {}: {e}",
                self.path.display()
            ))),
            Err(e) => Err(internal(e)),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn check_bundle_id(id: &str) -> Result<(), Status> {
    if bundle::is_bundle_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "not a bundle id (64 hex digits): {:?}",
            id.chars().take(70).collect::<String>()
        )))
    }
}

fn relative(path: &str) -> Result<PathBuf, Status> {
    safe_relative(path).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Driver for DriverService {
    async fn has_bundle(
        &self,
        request: Request<proto::HasBundleRequest>,
    ) -> Result<Response<proto::HasBundleResponse>, Status> {
        let id = request.into_inner().bundle_id;
        check_bundle_id(&id)?;
        Ok(Response::new(proto::HasBundleResponse {
            present: self.shared.bundle_path(&id).exists(),
        }))
    }

    async fn put_bundle(
        &self,
        request: Request<Streaming<proto::BundleChunk>>,
    ) -> Result<Response<proto::PutBundleResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty bundle upload"))?;
        let id = first.bundle_id.clone();
        check_bundle_id(&id)?;
        let size = first.total_size;
        if size > MAX_BUNDLE_BYTES {
            return Err(Status::invalid_argument(format!(
                "a bundle of {size} bytes is over the {MAX_BUNDLE_BYTES}-byte limit"
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        bytes.extend_from_slice(&first.data);
        while let Some(chunk) = stream.message().await? {
            bytes.extend_from_slice(&chunk.data);
            if bytes.len() as u64 > size {
                return Err(Status::invalid_argument(
                    "the bundle is longer than its declared size",
                ));
            }
        }
        if bytes.len() as u64 != size {
            return Err(Status::invalid_argument(format!(
                "the bundle ended after {} of {size} bytes",
                bytes.len()
            )));
        }
        let path = self.shared.bundle_path(&id);
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            if bundle::sha256_hex(&bytes) != id2 {
                return Err(Status::invalid_argument(
                    "the bundle's content does not match its id",
                ));
            }
            if !path.exists() {
                let tmp = path.with_extension(format!("tmp-{:08x}", fastrand::u32(..)));
                std::fs::write(&tmp, &bytes).map_err(internal)?;
                std::fs::rename(&tmp, &path).map_err(internal)?;
            }
            Ok(())
        })
        .await
        .map_err(internal)??;
        Ok(Response::new(proto::PutBundleResponse {
            bundle_id: id,
            size,
        }))
    }

    async fn submit_job(
        &self,
        request: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let mut r = request.into_inner();
        let submitted = Instant::now();
        if r.name.is_empty() || r.name.len() > 200 {
            return Err(Status::invalid_argument(
                "the job needs a name (at most 200 characters)",
            ));
        }
        let job: Job = match r.job.take() {
            Some(def) => {
                jobdef::from_proto(def).map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            // A submitter from before `job`: JSON of the spec type.
            None => serde_json::from_str(&r.job_json).map_err(|e| {
                Status::invalid_argument(format!("the job is not valid JSON of a job: {e}"))
            })?,
        };
        let job_plan =
            plan::plan_job(&job).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        check_bundle_id(&r.bundle_id)?;
        let bundle_path = self.shared.bundle_path(&r.bundle_id);
        if !bundle_path.exists() {
            return Err(Status::failed_precondition(format!(
                "the driver has no bundle {}: upload it first (PutBundle)",
                r.bundle_id
            )));
        }
        let mut staging = HashMap::new();
        let mut uploaded = Vec::new();
        let mut in_place = BTreeMap::new();
        for input in &r.inputs {
            let rel = relative(&input.path)?;
            let key = rel.to_string_lossy().into_owned();
            if let Some(local) = &input.local
                && local.size == input.size
                && local::open_same(local).is_some()
            {
                // The very file the submitter sees: read where it lies.
                if in_place.insert(rel, local.clone()).is_some() {
                    return Err(Status::invalid_argument(format!(
                        "input {key} is declared twice"
                    )));
                }
                continue;
            }
            if in_place.contains_key(&rel)
                || staging
                    .insert(
                        key.clone(),
                        StagedInput {
                            size: input.size,
                            done: false,
                        },
                    )
                    .is_some()
            {
                return Err(Status::invalid_argument(format!(
                    "input {key} is declared twice"
                )));
            }
            uploaded.push(rel);
        }
        let run_id = crate::runtime::new_id("run");
        let run_dir = self.shared.run_dir(&run_id);
        let work = run_dir.join("work");
        let mut env: BTreeMap<String, String> = r.env.into_iter().collect();
        // A definition from the wire holds text only (secrets come in `r.env`).
        env.extend(job.env.iter().filter_map(|(k, v)| match v {
            crate::spec::EnvValue::Text(text) => Some((k.clone(), text.clone())),
            crate::spec::EnvValue::Secret(_) => None,
        }));
        let record = JobRecord {
            run_id: run_id.clone(),
            name: r.name.clone(),
            bundle_id: r.bundle_id.clone(),
            submitted_at_unix_ms: crate::runtime::unix_ms(),
            env: env.clone(),
            job: job.clone(),
        };
        {
            let work = work.clone();
            let run_dir = run_dir.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                std::fs::create_dir_all(&work)?;
                let bytes = std::fs::read(&bundle_path)?;
                bundle::unpack(&bytes, &work)?;
                store::write_json(&run_dir.join("job.json"), &record)?;
                Ok(())
            })
            .await
            .map_err(internal)?
            .map_err(|e| Status::internal(format!("cannot prepare the run: {e:#}")))?;
        }
        let default_partition_mb = r
            .options
            .map(|o| o.default_partition_mb)
            .filter(|&m| m > 0)
            .unwrap_or(DEFAULT_PARTITION_MB);
        let new = Box::new(NewRun {
            run_id: run_id.clone(),
            name: r.name,
            bundle_id: r.bundle_id,
            plan: job_plan,
            timeout_minutes: job.timeout_minutes,
            env,
            default_partition_mb,
            work: work.clone(),
            run_dir,
            uploaded,
            in_place: in_place.clone(),
            submitted,
            submitted_unix_ms: crate::runtime::unix_ms(),
        });
        // With no inputs to wait for, the run starts at once.
        let (pending_start, start_now) = if staging.is_empty() {
            (None, Some(new))
        } else {
            (Some(new), None)
        };
        self.shared.lock_runs().insert(
            run_id.clone(),
            RunFiles {
                work,
                staging,
                pending_start,
                outputs: HashMap::new(),
                in_place: in_place.clone(),
            },
        );
        if let Some(new) = start_now {
            self.event(Event::Start(new))?;
        }
        Ok(Response::new(proto::SubmitJobResponse {
            run_id,
            in_place: in_place
                .keys()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        }))
    }

    async fn upload_input(
        &self,
        request: Request<Streaming<proto::InputChunk>>,
    ) -> Result<Response<proto::UploadInputResponse>, Status> {
        let mut stream = request.into_inner();
        let mut run_id: Option<String> = None;
        let mut work = PathBuf::new();
        let mut current: Option<(String, FileWriter, u64)> = None;
        let mut bytes = 0u64;
        let mut files = 0u32;
        let finish = |shared: &Shared, run: &str, key: &str, written: u64| -> Result<(), Status> {
            let mut runs = shared.lock_runs();
            let Some(st) = runs.get_mut(run).and_then(|f| f.staging.get_mut(key)) else {
                return Err(Status::not_found("the run is gone"));
            };
            if written != st.size {
                return Err(Status::invalid_argument(format!(
                    "input {key}: got {written} of {} bytes",
                    st.size
                )));
            }
            st.done = true;
            Ok(())
        };
        while let Some(chunk) = stream.message().await? {
            let run = match &run_id {
                Some(r) => {
                    if *r != chunk.run_id {
                        return Err(Status::invalid_argument("one upload is for one run"));
                    }
                    r.clone()
                }
                None => {
                    safe_id(&chunk.run_id)?;
                    let runs = self.shared.lock_runs();
                    let Some(f) = runs.get(&chunk.run_id) else {
                        return Err(Status::not_found(format!("no run {}", chunk.run_id)));
                    };
                    work = f.work.clone();
                    drop(runs);
                    run_id = Some(chunk.run_id.clone());
                    chunk.run_id.clone()
                }
            };
            let switch = current.as_ref().is_none_or(|(p, _, _)| *p != chunk.path);
            if switch {
                if let Some((key, f, written)) = current.take() {
                    f.finish().await?;
                    finish(&self.shared, &run, &key, written)?;
                }
                let rel = relative(&chunk.path)?;
                let key = rel.to_string_lossy().into_owned();
                {
                    let runs = self.shared.lock_runs();
                    match runs.get(&run).and_then(|f| f.staging.get(&key)) {
                        Some(st) if !st.done => {}
                        Some(_) => {
                            return Err(Status::invalid_argument(format!(
                                "input {key} was already uploaded"
                            )));
                        }
                        None => {
                            return Err(Status::invalid_argument(format!(
                                "input {key} was not declared in SubmitJob"
                            )));
                        }
                    }
                }
                let path = work.join(&rel);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(internal)?;
                }
                let f = FileWriter::create(path);
                files += 1;
                current = Some((key, f, 0));
            }
            let Some((key, f, written)) = current.as_mut() else {
                continue;
            };
            if chunk.offset != *written {
                return Err(Status::invalid_argument(format!(
                    "input {key}: a chunk at offset {} after {} bytes",
                    chunk.offset, written
                )));
            }
            let n = chunk.data.len() as u64;
            f.write(chunk.data).await?;
            *written += n;
            bytes += n;
        }
        let Some(run) = run_id else {
            return Ok(Response::new(proto::UploadInputResponse {
                bytes: 0,
                files: 0,
            }));
        };
        if let Some((key, f, written)) = current.take() {
            f.finish().await?;
            finish(&self.shared, &run, &key, written)?;
        }
        let start = {
            let mut runs = self.shared.lock_runs();
            match runs.get_mut(&run) {
                Some(f) if f.staging.values().all(|s| s.done) => f.pending_start.take(),
                _ => None,
            }
        };
        if let Some(new) = start {
            self.event(Event::Start(new))?;
        }
        Ok(Response::new(proto::UploadInputResponse { bytes, files }))
    }

    type WatchJobStream = UnboundedReceiverStream<Result<proto::JobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let run_id = request.into_inner().run_id;
        safe_id(&run_id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, found) = oneshot::channel();
        self.event(Event::Watch {
            run_id: run_id.clone(),
            tx: tx.clone(),
            reply,
        })?;
        if found.await.unwrap_or(false) {
            return Ok(Response::new(UnboundedReceiverStream::new(rx)));
        }
        let run_dir = self.shared.run_dir(&run_id);
        if let Some(summary) = store::read_summary(&run_dir) {
            let fin = proto::JobFinished {
                ok: summary.ok,
                error: summary.error.clone().unwrap_or_default(),
                summary_json: serde_json::to_string(&summary).map_err(internal)?,
            };
            let _ = tx.send(Ok(proto::JobEvent {
                event: Some(proto::job_event::Event::Finished(fin)),
            }));
            drop(tx);
            return Ok(Response::new(UnboundedReceiverStream::new(rx)));
        }
        if self.shared.lock_runs().contains_key(&run_id) {
            return Err(Status::failed_precondition(format!(
                "run {run_id} is still waiting for its inputs (UploadInput)"
            )));
        }
        Err(Status::not_found(format!("no run {run_id}")))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        let run_id = request.into_inner().run_id;
        safe_id(&run_id)?;
        let (reply, found) = oneshot::channel();
        self.event(Event::Cancel {
            run_id: run_id.clone(),
            reply,
        })?;
        let mut cancelled = found.await.unwrap_or(false);
        if !cancelled {
            // Still staging: forget it.
            let mut runs = self.shared.lock_runs();
            if runs.get(&run_id).is_some_and(|f| f.pending_start.is_some()) {
                runs.remove(&run_id);
                cancelled = true;
            }
        }
        Ok(Response::new(proto::CancelJobResponse { cancelled }))
    }

    type FetchOutputStream = ReceiverStream<Result<proto::FileChunk, Status>>;

    async fn fetch_output(
        &self,
        request: Request<proto::FetchOutputRequest>,
    ) -> Result<Response<Self::FetchOutputStream>, Status> {
        let r = request.into_inner();
        safe_id(&r.run_id)?;
        let run_dir = self.shared.run_dir(&r.run_id);
        let record = store::read_job(&run_dir)
            .map_err(|_| Status::not_found(format!("no run {}", r.run_id)))?;
        let Some(task) = record.job.tasks.get(&r.task) else {
            return Err(Status::not_found(format!(
                "run {} has no task `{}`",
                r.run_id, r.task
            )));
        };
        let Some(output) = &task.output else {
            return Err(Status::failed_precondition(format!(
                "task `{}` has no `output`",
                r.task
            )));
        };
        let dir = run_dir.join("work").join(relative(output)?);
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let send = |c: Result<proto::FileChunk, Status>| tx.blocking_send(c).is_ok();
            let mut names: Vec<String> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| n.starts_with("part-"))
                    .collect(),
                Err(e) => {
                    send(Err(Status::not_found(format!(
                        "no output at {}: {e}",
                        dir.display()
                    ))));
                    return;
                }
            };
            names.sort();
            for name in names {
                let mut f = match std::fs::File::open(dir.join(&name)) {
                    Ok(f) => f,
                    Err(e) => {
                        send(Err(internal(e)));
                        return;
                    }
                };
                loop {
                    let buf = match read_chunk(&mut f, CHUNK) {
                        Ok(b) => b,
                        Err(e) => {
                            send(Err(internal(e)));
                            return;
                        }
                    };
                    let last = buf.len() < CHUNK;
                    if !send(Ok(proto::FileChunk {
                        path: name.clone(),
                        data: buf,
                        last,
                    })) {
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

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let r = request.into_inner();
        let runs_dir = self.shared.dir.join("runs");
        let runs = tokio::task::spawn_blocking(move || {
            store::list_runs(&runs_dir, &r.name, r.limit as usize)
        })
        .await
        .map_err(internal)?;
        Ok(Response::new(proto::ListRunsResponse { runs }))
    }

    async fn fetch_logs(
        &self,
        request: Request<proto::FetchLogsRequest>,
    ) -> Result<Response<proto::FetchLogsResponse>, Status> {
        let r = request.into_inner();
        let runs_dir = self.shared.dir.join("runs");
        let max = if r.max_bytes_per_file == 0 {
            64 << 10
        } else {
            r.max_bytes_per_file as usize
        };
        let reply = tokio::task::spawn_blocking(move || {
            let run_id = if r.run_id.is_empty() {
                if r.name.is_empty() {
                    return Err(Status::invalid_argument("name a run or a job"));
                }
                match store::list_runs(&runs_dir, &r.name, 1).into_iter().next() {
                    Some(info) => info.run_id,
                    None => {
                        return Err(Status::not_found(format!("job `{}` has no runs", r.name)));
                    }
                }
            } else {
                safe_id(&r.run_id)?;
                r.run_id
            };
            let run_dir = runs_dir.join(&run_id);
            if !run_dir.exists() {
                return Err(Status::not_found(format!("no run {run_id}")));
            }
            let files = store::read_logs(&run_dir, &r.task, max).map_err(internal)?;
            Ok(proto::FetchLogsResponse { run_id, files })
        })
        .await
        .map_err(internal)??;
        Ok(Response::new(reply))
    }

    async fn cluster_status(
        &self,
        _request: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.event(Event::Status { reply })?;
        let mut status = answer
            .await
            .map_err(|_| Status::unavailable("the driver is stopping"))?;
        if let Some(engine) = &self.shared.engine {
            status.engine = engine.describe().await.into_iter().collect();
        }
        Ok(Response::new(status))
    }

    async fn register_executor(
        &self,
        request: Request<proto::RegisterExecutorRequest>,
    ) -> Result<Response<proto::RegisterExecutorResponse>, Status> {
        let req = request.into_inner();
        if req.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "not an executor address: {:?}",
                req.address
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.event(Event::Register { req, reply })?;
        let resp = answer
            .await
            .map_err(|_| Status::unavailable("the driver is stopping"))?;
        Ok(Response::new(resp))
    }

    type TaskStreamStream = UnboundedReceiverStream<Result<proto::DriverMessage, Status>>;

    async fn task_stream(
        &self,
        request: Request<Streaming<proto::ExecutorMessage>>,
    ) -> Result<Response<Self::TaskStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the task stream closed before Hello"))?;
        let Some(proto::executor_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("a task stream starts with Hello"));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.event(Event::Connected {
            executor_id: hello.executor_id,
            tx,
            reply,
        })?;
        let id = answer
            .await
            .map_err(|_| Status::unavailable("the driver is stopping"))?
            .map_err(Status::failed_precondition)?;
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let ev = Event::FromExecutor {
                            executor_id: id.clone(),
                            msg,
                        };
                        if events.send(ev).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "it closed its task stream".to_string(),
                    Err(e) => break format!("its task stream broke ({})", e.message()),
                }
            };
            let _ = events.send(Event::Disconnected {
                executor_id: id,
                reason,
            });
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    type FetchBundleStream = ReceiverStream<Result<proto::BundleChunk, Status>>;

    async fn fetch_bundle(
        &self,
        request: Request<proto::FetchBundleRequest>,
    ) -> Result<Response<Self::FetchBundleStream>, Status> {
        let id = request.into_inner().bundle_id;
        check_bundle_id(&id)?;
        let path = self.shared.bundle_path(&id);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|_| Status::not_found(format!("no bundle {id}")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let total = bytes.len() as u64;
            let mut first = true;
            let mut chunks = bytes.chunks(CHUNK).peekable();
            if chunks.peek().is_none() {
                let _ = tx
                    .send(Ok(proto::BundleChunk {
                        bundle_id: id.clone(),
                        total_size: 0,
                        data: Vec::new(),
                    }))
                    .await;
            }
            for c in chunks {
                let msg = proto::BundleChunk {
                    bundle_id: if first { id.clone() } else { String::new() },
                    total_size: if first { total } else { 0 },
                    data: c.to_vec(),
                };
                first = false;
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReadInputStream = ReceiverStream<Result<proto::DataChunk, Status>>;

    async fn read_input(
        &self,
        request: Request<proto::ReadInputRequest>,
    ) -> Result<Response<Self::ReadInputStream>, Status> {
        let r = request.into_inner();
        safe_id(&r.run_id)?;
        let (work, in_place) = match self.shared.lock_runs().get(&r.run_id) {
            Some(f) => (f.work.clone(), f.in_place.clone()),
            None => return Err(Status::not_found(format!("no active run {}", r.run_id))),
        };
        let mut ranges = Vec::with_capacity(r.ranges.len());
        for range in r.ranges {
            if range.end < range.start {
                return Err(Status::invalid_argument(
                    "a byte range ends before it starts",
                ));
            }
            let rel = relative(&range.path)?;
            let path = work.join(&rel);
            // A file in the work directory (uploaded, or written by an
            // earlier task) wins over the submitter's file of that name.
            let source = match in_place.get(&rel) {
                Some(local) if !path.exists() => Source::InPlace(local.clone()),
                _ => Source::Path(path),
            };
            ranges.push((source, range.start, range.end));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            for (source, start, end) in ranges {
                let file = match source {
                    Source::Path(path) => std::fs::File::open(&path).map_err(|e| {
                        Status::not_found(format!("cannot read {}: {e}", path.display()))
                    }),
                    Source::InPlace(local) => local::open_same(&local).ok_or_else(|| {
                        Status::data_loss(format!(
                            "the input {} changed or went away during the run",
                            local.path
                        ))
                    }),
                };
                if let Err(e) = file.and_then(|f| send_range(&tx, f, start, end)) {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn put_output(
        &self,
        request: Request<Streaming<proto::OutputChunk>>,
    ) -> Result<Response<proto::PutOutputResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty output upload"))?;
        safe_id(&first.run_id)?;
        let dir = {
            let runs = self.shared.lock_runs();
            runs.get(&first.run_id)
                .and_then(|f| f.outputs.get(&first.stage_id).cloned())
        };
        let Some(dir) = dir else {
            return Err(Status::failed_precondition(format!(
                "run {} takes no output for stage {} (has it ended?)",
                first.run_id, first.stage_id
            )));
        };
        let tmp = dir.join(format!(
            ".part-{:05}.{}.tmp",
            first.partition, first.attempt_id
        ));
        let mut w = FileWriter::create(tmp);
        let mut bytes = first.data.len() as u64;
        w.write(first.data).await?;
        while let Some(chunk) = stream.message().await? {
            bytes += chunk.data.len() as u64;
            w.write(chunk.data).await?;
        }
        w.finish().await?;
        Ok(Response::new(proto::PutOutputResponse { bytes }))
    }
}

/// Where ReadInput reads a file of a run.
enum Source {
    Path(PathBuf),
    InPlace(proto::LocalFile),
}

/// Streams one byte range; a range that ends a file without a newline gets one,
/// so lines of consecutive files never run together.
fn send_range(
    tx: &mpsc::Sender<Result<proto::DataChunk, Status>>,
    mut f: std::fs::File,
    start: u64,
    end: u64,
) -> Result<(), Status> {
    if start == end {
        return Ok(());
    }
    f.seek(SeekFrom::Start(start)).map_err(internal)?;
    let mut left = end - start;
    let mut last = b'\n';
    while left > 0 {
        let buf = read_chunk(&mut f, (left as usize).min(CHUNK)).map_err(internal)?;
        let n = buf.len();
        if n == 0 {
            return Err(Status::data_loss("an input file is shorter than expected"));
        }
        last = buf[n - 1];
        left -= n as u64;
        if tx
            .blocking_send(Ok(proto::DataChunk { data: buf }))
            .is_err()
        {
            return Ok(());
        }
    }
    if last != b'\n' {
        let _ = tx.blocking_send(Ok(proto::DataChunk {
            data: b"\n".to_vec(),
        }));
    }
    Ok(())
}
