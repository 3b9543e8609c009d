//! Submits one job of a spec to a running motorpool driver and prints how it
//! went as JSON: `{"wall_s": ..., "summary": RunSummary}`. Used by
//! bench/runtime.py, which times the runtime alone: a driver and executors it
//! starts itself, without `motorpool run`'s cluster management around them.
//!
//! Usage: MOTORPOOL_CREDENTIAL=... runtime-submit --driver ADDR --spec PATH --job NAME

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use motorpool::auth::Credential;
use motorpool::runtime::client::{JobSubmission, run_job};
use motorpool::spec::LoadOptions;

async fn submit(args: &[String]) -> anyhow::Result<()> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "missing {name}; usage: runtime-submit --driver ADDR --spec PATH --job NAME"
                )
            })
    };
    let driver = flag("--driver")?;
    let spec = PathBuf::from(flag("--spec")?);
    let name = flag("--job")?;
    let credential = Credential::new(
        std::env::var("MOTORPOOL_CREDENTIAL")
            .map_err(|_| anyhow::anyhow!("set MOTORPOOL_CREDENTIAL"))?,
    );
    let loaded = motorpool::engine::load_spec(&spec, &LoadOptions::default())?;
    let job = loaded
        .spec
        .jobs
        .get(&name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the spec has no job `{name}`"))?;
    // As `motorpool run` does: the spec's data stays out of the code bundle.
    let exclude = motorpool::jobs::data_paths(&loaded);
    let started = Instant::now();
    let summary = run_job(
        &driver,
        &credential,
        JobSubmission {
            name,
            job,
            base_dir: loaded.base_dir,
            env: BTreeMap::new(),
            exclude,
        },
        |_| {},
    )
    .await?;
    let wall_s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "wall_s": wall_s, "summary": summary })
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(submit(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
