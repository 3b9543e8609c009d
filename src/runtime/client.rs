//! Handing a job to a driver: bundle, upload, submit, follow, download.
//!
//! [`run_job`] is what `motorpool run` calls once a cluster's driver is up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::plan::{self, JobPlan};
use super::proto;
use super::{
    CHUNK, DriverClient, Progress, RunSummary, TaskOutcome, bundle, connect_driver, jobdef,
};
use crate::auth::Credential;
use crate::spec::Job;

/// A job to run.
#[derive(Debug, Clone)]
pub struct JobSubmission {
    /// The job's name (its key under `jobs:`).
    pub name: String,
    pub job: Job,
    /// Where the job's paths resolve: code, `input`, `output` (the spec file's directory).
    pub base_dir: PathBuf,
    /// Environment for every task (e.g. the cluster's `env`), under the job's own `env`.
    pub env: BTreeMap<String, String>,
    /// Paths or globs (relative to `base_dir`) left out of the code bundle, on
    /// top of this job's own inputs and outputs and hidden files: e.g. the
    /// inputs and outputs of the spec's other jobs.
    pub exclude: Vec<String>,
}

fn refused(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", s.message())
}

/// Runs `submission` on the driver at `driver_addr` and waits for it to end.
///
/// Bundles the job's directory (leaving out map inputs, task outputs and
/// hidden files), uploads the bundle unless the driver has it, uploads the
/// map inputs, submits, calls `on_progress` as progress arrives, and writes
/// every succeeded task's `output` under `base_dir`. Inputs and outputs on
/// object storage (`s3://`, `gs://`, `az://`) are neither uploaded nor
/// downloaded: the executors read and write them there. A job that fails is
/// `Ok` with `ok: false` in the summary; `Err` means the run could not be
/// carried out (bad job, unreachable driver, lost connection).
pub async fn run_job(
    driver_addr: &str,
    credential: &Credential,
    submission: JobSubmission,
    mut on_progress: impl FnMut(&Progress),
) -> anyhow::Result<RunSummary> {
    let JobSubmission {
        name,
        job,
        base_dir,
        env,
        exclude,
    } = submission;
    let job_plan = plan::plan_job(&job).with_context(|| format!("job `{name}` cannot run"))?;
    let base = std::path::absolute(&base_dir)
        .with_context(|| format!("cannot resolve {}", base_dir.display()))?;
    if !base.is_dir() {
        bail!("{} is not a directory", base.display());
    }
    let (inputs, outputs) = inputs_and_outputs(&base, &job_plan)?;

    let mut patterns = Vec::with_capacity(exclude.len());
    for e in &exclude {
        super::safe_relative(e).with_context(|| format!("exclude `{e}`"))?;
        patterns.push(
            glob::Pattern::new(e.trim_start_matches("./"))
                .with_context(|| format!("exclude `{e}` is not a valid glob"))?,
        );
    }
    let bundle = {
        let base = base.clone();
        let exclude = bundle::Exclude {
            files: inputs.keys().cloned().collect(),
            dirs: outputs.clone(),
            patterns,
        };
        tokio::task::spawn_blocking(move || bundle::build(&base, &exclude))
            .await
            .context("the bundler failed")??
    };

    let mut client = connect_driver(driver_addr, credential).await?;
    let bundle_id = upload_bundle(&mut client, bundle).await?;
    // `MOTORPOOL_UPLOAD_INPUTS=1`: upload local inputs even to a driver
    // that could read them in place (bench/objectstore.py measures the upload).
    let offer_in_place = std::env::var_os("MOTORPOOL_UPLOAD_INPUTS").is_none_or(|v| v != "1");
    let submitted = client
        .submit_job(proto::SubmitJobRequest {
            name: name.clone(),
            job_json: String::new(),
            bundle_id,
            env: env.into_iter().collect(),
            inputs: inputs
                .iter()
                .map(|(p, size)| proto::InputFile {
                    path: p.to_string_lossy().into_owned(),
                    size: *size,
                    // A driver on this machine reads the file where it lies.
                    local: super::local::identify(&base.join(p))
                        .ok()
                        .filter(|l| offer_in_place && l.size == *size),
                })
                .collect(),
            options: None,
            job: Some(jobdef::to_proto(&job)),
        })
        .await
        .map_err(|s| refused(&format!("the driver refused job `{name}`"), s))?
        .into_inner();
    let run_id = submitted.run_id;
    let in_place: BTreeSet<PathBuf> = submitted.in_place.iter().map(PathBuf::from).collect();
    let inputs: BTreeMap<PathBuf, u64> = inputs
        .into_iter()
        .filter(|(p, _)| !in_place.contains(p))
        .collect();
    if !inputs.is_empty() {
        upload_inputs(&mut client, &run_id, &base, &inputs).await?;
    }
    let mut events = client
        .watch_job(proto::WatchJobRequest {
            run_id: run_id.clone(),
        })
        .await
        .map_err(|s| refused("cannot follow the run", s))?
        .into_inner();
    let finished = loop {
        let ev = events
            .message()
            .await
            .map_err(|s| refused("lost the run's progress stream", s))?;
        match ev.and_then(|e| e.event) {
            Some(proto::job_event::Event::Progress(p)) => on_progress(&Progress::from(p)),
            Some(proto::job_event::Event::Task(_)) => {}
            Some(proto::job_event::Event::Output(o)) => on_progress(&Progress::output(
                &run_id,
                o.task,
                String::from_utf8_lossy(&o.stdout).into_owned(),
            )),
            Some(proto::job_event::Event::Finished(f)) => break f,
            None => bail!("the driver ended run {run_id}'s progress stream before the run ended"),
        }
    };
    let summary: RunSummary = serde_json::from_str(&finished.summary_json)
        .context("the driver sent a summary that is not valid")?;
    for t in &summary.tasks {
        if t.outcome != TaskOutcome::Succeeded {
            continue;
        }
        // Output on object storage stays there: the summary names its URL.
        if let Some(out) = t
            .output
            .as_ref()
            .filter(|o| !motorpool_storage::is_data_url(o))
        {
            // Named by the driver: confined again, and never written
            // through a symlink that leads out of the project.
            let rel = crate::confine::job_path(out).with_context(|| format!("output `{out}`"))?;
            crate::confine::resolved_inside(&base, &rel)
                .with_context(|| format!("output `{out}` of task `{}`", t.name))?;
            download_output(&mut client, &run_id, &t.name, &base.join(rel)).await?;
        }
    }
    Ok(summary)
}

/// The map input files (relative, with sizes) and the task output directories.
fn inputs_and_outputs(
    base: &Path,
    job_plan: &JobPlan,
) -> anyhow::Result<(BTreeMap<PathBuf, u64>, Vec<PathBuf>)> {
    let outputs: Vec<PathBuf> = job_plan
        .tasks
        .iter()
        .filter_map(|t| t.output.clone())
        .collect();
    let mut inputs = BTreeMap::new();
    for t in &job_plan.tasks {
        if let plan::TaskKind::Map { map, .. } = &t.kind {
            // Input on object storage is read there by the executors.
            if motorpool_storage::is_data_url(&map.input) {
                continue;
            }
            for (rel, size) in plan::resolve_input(base, &map.input)? {
                // Stale outputs of earlier runs are not inputs: the tasks that
                // write them run first on the driver.
                if outputs.iter().any(|o| rel.starts_with(o)) {
                    continue;
                }
                inputs.insert(rel, size);
            }
        }
    }
    Ok((inputs, outputs))
}

/// Uploads the bundle unless the driver has it; returns its id.
async fn upload_bundle(
    client: &mut DriverClient,
    bundle: bundle::Bundle,
) -> anyhow::Result<String> {
    let id = bundle.id.clone();
    let present = client
        .has_bundle(proto::HasBundleRequest {
            bundle_id: id.clone(),
        })
        .await
        .map_err(|s| refused("the driver refused HasBundle", s))?
        .into_inner()
        .present;
    if present {
        return Ok(id);
    }
    let total = bundle.bytes.len() as u64;
    let mut chunks: Vec<proto::BundleChunk> = bundle
        .bytes
        .chunks(CHUNK)
        .map(|c| proto::BundleChunk {
            bundle_id: String::new(),
            total_size: 0,
            data: c.to_vec(),
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(proto::BundleChunk::default());
    }
    chunks[0].bundle_id = id.clone();
    chunks[0].total_size = total;
    client
        .put_bundle(tokio_stream::iter(chunks))
        .await
        .map_err(|s| refused("cannot upload the job's code bundle", s))?;
    Ok(id)
}

async fn upload_inputs(
    client: &mut DriverClient,
    run_id: &str,
    base: &Path,
    inputs: &BTreeMap<PathBuf, u64>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<proto::InputChunk>(8);
    let files: Vec<(PathBuf, u64)> = inputs.iter().map(|(p, s)| (p.clone(), *s)).collect();
    let base = base.to_path_buf();
    let run = run_id.to_string();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for (rel, size) in files {
            let path = base.join(&rel);
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let name = rel.to_string_lossy().into_owned();
            let mut offset = 0u64;
            loop {
                let want = (size - offset).min(CHUNK as u64) as usize;
                let buf = super::read_chunk(&mut f, want)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if buf.len() != want {
                    bail!("{} changed while it was being uploaded", path.display());
                }
                let chunk = proto::InputChunk {
                    run_id: run.clone(),
                    path: name.clone(),
                    offset,
                    data: buf,
                };
                offset += want as u64;
                if tx.blocking_send(chunk).is_err() {
                    return Ok(()); // the upload failed; its error says why
                }
                if offset >= size {
                    break;
                }
            }
        }
        Ok(())
    });
    let sent = client.upload_input(ReceiverStream::new(rx)).await;
    reader.await.context("the input reader failed")??;
    sent.map_err(|s| refused("cannot upload the job's input", s))?;
    Ok(())
}

/// Writes a task's `part-NNNNN` files into `dir`, replacing the part files it held.
async fn download_output(
    client: &mut DriverClient,
    run_id: &str,
    task: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut stream = client
        .fetch_output(proto::FetchOutputRequest {
            run_id: run_id.to_string(),
            task: task.to_string(),
        })
        .await
        .map_err(|s| refused(&format!("cannot fetch the output of task `{task}`"), s))?
        .into_inner();
    let mut received = BTreeSet::new();
    let mut current: Option<(String, PathBuf, tokio::fs::File)> = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| refused(&format!("lost the output of task `{task}`"), s))?
    {
        let name = chunk.path;
        if !name.starts_with("part-") || name.contains('/') || name.contains('\\') {
            bail!("the driver sent an output file with a bad name: {name:?}");
        }
        if current.as_ref().is_none_or(|(n, _, _)| *n != name) {
            if current.is_some() {
                bail!("the driver sent output file {name} before the last one ended");
            }
            let tmp = dir.join(format!(".{name}.motorpool-tmp"));
            let f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            current = Some((name.clone(), tmp, f));
        }
        if let Some((_, tmp, f)) = current.as_mut() {
            f.write_all(&chunk.data)
                .await
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        if chunk.last
            && let Some((name, tmp, mut f)) = current.take()
        {
            f.flush().await?;
            drop(f);
            let final_path = dir.join(&name);
            tokio::fs::rename(&tmp, &final_path)
                .await
                .with_context(|| format!("cannot write {}", final_path.display()))?;
            received.insert(name);
        }
    }
    if let Some((name, tmp, _)) = current {
        let _ = tokio::fs::remove_file(&tmp).await;
        bail!("the output file {name} of task `{task}` arrived incomplete");
    }
    // Part files from an earlier run that this run did not write go.
    let mut rd = tokio::fs::read_dir(dir)
        .await
        .with_context(|| format!("cannot read {}", dir.display()))?;
    while let Some(e) = rd.next_entry().await? {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("part-") && !received.contains(&n) {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
    Ok(())
}

/// The runs a driver has seen, newest first (only those of `job` when given).
pub async fn list_runs(
    driver_addr: &str,
    credential: &Credential,
    job: Option<&str>,
) -> anyhow::Result<Vec<proto::RunInfo>> {
    let mut client = connect_driver(driver_addr, credential).await?;
    Ok(client
        .list_runs(proto::ListRunsRequest {
            name: job.unwrap_or_default().to_string(),
            limit: 0,
        })
        .await
        .map_err(|s| refused("cannot list runs", s))?
        .into_inner()
        .runs)
}

/// The task logs of a run: `run_id`, or else the newest run of `job`.
pub async fn fetch_logs(
    driver_addr: &str,
    credential: &Credential,
    run_id: Option<&str>,
    job: Option<&str>,
    task: Option<&str>,
) -> anyhow::Result<proto::FetchLogsResponse> {
    let mut client = connect_driver(driver_addr, credential).await?;
    Ok(client
        .fetch_logs(proto::FetchLogsRequest {
            run_id: run_id.unwrap_or_default().to_string(),
            name: job.unwrap_or_default().to_string(),
            task: task.unwrap_or_default().to_string(),
            max_bytes_per_file: 0,
        })
        .await
        .map_err(|s| refused("cannot fetch logs", s))?
        .into_inner())
}

/// Stops a run; false when it had already ended.
pub async fn cancel_run(
    driver_addr: &str,
    credential: &Credential,
    run_id: &str,
) -> anyhow::Result<bool> {
    let mut client = connect_driver(driver_addr, credential).await?;
    Ok(client
        .cancel_job(proto::CancelJobRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| refused("cannot cancel the run", s))?
        .into_inner()
        .cancelled)
}

/// How many runs the driver has going (staging or running).
pub async fn active_run_count(driver_addr: &str, credential: &Credential) -> anyhow::Result<usize> {
    Ok(cluster_status(driver_addr, credential)
        .await?
        .active_runs
        .len())
}

/// The driver's view of its cluster: executors, active runs, and what an
/// engine beside it says of itself.
pub async fn cluster_status(
    driver_addr: &str,
    credential: &Credential,
) -> anyhow::Result<proto::ClusterStatusResponse> {
    let mut client = connect_driver(driver_addr, credential).await?;
    Ok(client
        .cluster_status(proto::ClusterStatusRequest {})
        .await
        .map_err(|s| refused("cannot read the cluster's status", s))?
        .into_inner())
}
