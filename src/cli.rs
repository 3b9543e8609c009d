//! The `motorpool` command line: parse arguments, call the library, print,
//! and map the outcome to an exit code. No rules live here.
//!
//! One exit-code rule for every command: 0 success, 1 any error (a bad flag
//! or value included: clap's own usage errors would exit 2), and 2 only for
//! "changes present" from `plan --detailed-exitcode`, which CI reads as such.
//!
//! It lives in the library (not in `main.rs`) so that a program embedding
//! motorpool with more providers or engines (a test binary, say) runs the
//! very same CLI after `Registry::install`: see [`main`].

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::apply::{ApplyOptions, ProgressMode};
use crate::engine::{self, Project};
use crate::plan::{self, Plan, PlanMode, render};
use crate::spec::{LoadOptions, ProviderBlock};

#[derive(Parser)]
#[command(
    name = "motorpool",
    version,
    about = "Declarative compute for data jobs: pools, clusters and jobs from checked-in YAML."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec and report every problem as file:line:col.
    Validate(SpecArgs),
    /// Show what apply would change, and why.
    Plan(PlanArgs),
    /// Make the cloud match the spec (or run a saved plan).
    Apply(ApplyArgs),
    /// Remove every pool and cluster of the project.
    Destroy(DestroyArgs),
    /// List the project's nodes with their role, state and address.
    Status(StatusArgs),
    /// Run a job on its cluster (started or made for the run) and wait for it.
    Run(RunArgs),
    /// Show a cluster's startup step outputs, or a job's last run's task output.
    Logs(LogsArgs),
    /// Remove the project's cloud lock whose holder died (its id is in the refusal).
    ForceUnlock(ForceUnlockArgs),
    /// Keep pools filled and trimmed and outlived job clusters removed, between applies.
    Controller(ControllerArgs),
    /// Run a node agent (started by providers, not by people).
    #[command(hide = true)]
    Agent(AgentArgs),
    /// Run a runtime driver (credential in $MOTORPOOL_CREDENTIAL; started by agents and tests).
    #[command(hide = true)]
    Driver(DriverArgs),
    /// Run a runtime executor (credential in $MOTORPOOL_CREDENTIAL; started by agents and tests).
    #[command(hide = true)]
    Executor(ExecutorArgs),
}

#[derive(Args)]
struct SpecArgs {
    /// A spec file, or a directory holding motorpool.yaml.
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Apply the overrides of this target.
    #[arg(long)]
    target: Option<String>,
    /// Set a variable: --var workers=8 (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum PlanOutput {
    Text,
    Json,
    Markdown,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(long, value_enum, default_value = "text")]
    output: PlanOutput,
    /// Exit 0 when there are no changes, 1 on error, 2 when there are changes.
    #[arg(long)]
    detailed_exitcode: bool,
    /// Only drift: heal what changed behind motorpool's back, ignore spec changes.
    #[arg(long)]
    refresh_only: bool,
    /// Save the plan; `motorpool apply FILE` runs exactly it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// What every command that changes the cloud takes.
#[derive(Args)]
struct ChangeArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Most provider operations in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallelism: u32,
}

#[derive(Args)]
struct ApplyArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    change: ChangeArgs,
    /// Only heal drift.
    #[arg(long)]
    refresh_only: bool,
    /// Start this cluster again after it stopped itself (autotermination); repeatable.
    #[arg(long = "start", value_name = "CLUSTER")]
    start: Vec<String>,
}

#[derive(Args)]
struct DestroyArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    change: ChangeArgs,
}

#[derive(Args)]
struct ForceUnlockArgs {
    /// The lock's id, as the refusal that named its holder printed it.
    lock_id: String,
    #[command(flatten)]
    spec: SpecArgs,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Seconds from the start of one reconcile pass to the next.
    #[arg(long, default_value = "30", value_parser = parse_interval)]
    interval: std::time::Duration,
    /// Heal drift too (what `apply --refresh-only` heals); off, only pools
    /// and outlived job clusters are kept.
    #[arg(long)]
    heal: bool,
    /// Run one pass and exit.
    #[arg(long)]
    once: bool,
    /// Where to serve /metrics and /healthz (`off`: nowhere).
    #[arg(long, default_value = "127.0.0.1:9477", value_parser = parse_listen)]
    listen: ListenAt,
    /// Most provider operations in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallelism: u32,
}

/// `--listen`: an address, or `off`.
#[derive(Clone, Copy)]
struct ListenAt(Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<ListenAt, String> {
    if text == "off" {
        return Ok(ListenAt(None));
    }
    text.parse::<SocketAddr>()
        .map(|a| ListenAt(Some(a)))
        .map_err(|_| format!("`{text}` is not an IP:PORT address (or `off`)"))
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.1..=86_400.0).contains(&s) => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(format!(
            "`{text}` is not a number of seconds from 0.1 to 86400"
        )),
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum StatusOutput {
    Text,
    Json,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(long, value_enum, default_value = "text")]
    output: StatusOutput,
}

#[derive(Args)]
struct LogsArgs {
    /// `[PATH] NAME`: the spec (file or directory, default `.`) and a cluster
    /// (its startup step outputs) or a job (its newest run's task output).
    #[arg(num_args = 1..=2, required = true, value_name = "[PATH] NAME")]
    words: Vec<String>,
    /// A job's run to show, instead of its newest.
    #[arg(long = "run", value_name = "RUN_ID")]
    run_id: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum RunOutput {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// `[PATH] JOB`: the spec (file or directory, default `.`) and the job to run.
    #[arg(num_args = 1..=2, required = true, value_name = "[PATH] JOB")]
    words: Vec<String>,
    /// Apply the overrides of this target.
    #[arg(long)]
    target: Option<String>,
    /// Set a variable: --var workers=8 (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// `json`: the run summary (tasks, attempts, durations, bytes shuffled) on stdout.
    #[arg(long, value_enum, default_value = "text")]
    output: RunOutput,
    /// Most provider operations in flight at once (starting the cluster).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallelism: u32,
}

#[derive(Args)]
struct AgentArgs {
    /// The instance's directory.
    #[arg(long)]
    dir: PathBuf,
    /// Where to listen: loopback, or any address when the config has TLS settings.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    instance_id: String,
    /// The agent's JSON config (its credential): the instance's user data.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The port the driver or executor this agent hosts listens on (on the
    /// agent's IP); 0 picks a free one. Cloud nodes use a fixed port, so a
    /// firewall can name it.
    #[arg(long, default_value_t = 0)]
    runtime_port: u16,
}

#[derive(Args)]
struct DriverArgs {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The driver's directory; `driver.json` there says where it listens.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Args)]
struct ExecutorArgs {
    /// The driver's address (127.0.0.1:PORT).
    #[arg(long)]
    driver: String,
    /// The executor's directory.
    #[arg(long)]
    dir: PathBuf,
    /// Tasks run at once (default: the CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    cores: Option<u32>,
    /// Where to serve shuffle data (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// Run the command line with this process's arguments, through the
/// registry in force ([`crate::registry::Registry::global`]).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and succeed; every usage error
            // is an error like any other: exit 1, never clap's 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { ERROR } else { SUCCESS });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Spec diagnostics already read `file:line:col: error: ...`.
            if e.downcast_ref::<engine::InvalidSpec>().is_some() {
                eprintln!("{e}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(ERROR)
        }
    }
}

/// Exit codes: the only three motorpool uses.
const SUCCESS: u8 = 0;
const ERROR: u8 = 1;
/// Only from `plan --detailed-exitcode`: the plan has changes.
const CHANGES_PRESENT: u8 = 2;

async fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Validate(args) => validate(args),
        Command::Plan(args) => plan_cmd(args).await,
        Command::Apply(args) => apply_cmd(args).await,
        Command::Destroy(args) => destroy_cmd(args).await,
        Command::Status(args) => status_cmd(args).await,
        Command::Run(args) => run_cmd(args).await,
        Command::Logs(args) => logs_cmd(args).await,
        Command::ForceUnlock(args) => force_unlock_cmd(args).await,
        Command::Controller(args) => controller_cmd(args).await,
        Command::Agent(args) => {
            crate::agent::run(crate::agent::AgentOptions {
                dir: args.dir,
                listen: args.listen,
                instance_id: args.instance_id,
                config: args.config,
                runtime_port: args.runtime_port,
            })
            .await?;
            Ok(SUCCESS)
        }
        Command::Driver(args) => {
            crate::runtime::run_driver_process(args.listen, args.dir).await?;
            Ok(SUCCESS)
        }
        Command::Executor(args) => {
            let cores = args.cores.map(|c| c as usize);
            crate::runtime::run_executor_process(args.driver, args.dir, cores, args.listen).await?;
            Ok(SUCCESS)
        }
    }
}

fn load_options(args: &SpecArgs) -> Result<LoadOptions> {
    parse_load_options(args.target.clone(), &args.vars)
}

fn parse_load_options(target: Option<String>, raw_vars: &[String]) -> Result<LoadOptions> {
    let mut vars = Vec::new();
    for v in raw_vars {
        match v.split_once('=') {
            Some((k, val)) if !k.trim().is_empty() => {
                vars.push((k.trim().to_string(), val.to_string()))
            }
            // The argument is not echoed: it may be a secret without its name.
            _ => bail!(
                "--var takes NAME=VALUE, got an argument of {} characters without a name and `=`",
                v.chars().count()
            ),
        }
    }
    Ok(LoadOptions { target, vars })
}

fn validate(args: SpecArgs) -> Result<u8> {
    let loaded = engine::load_spec(&args.path, &load_options(&args)?)?;
    let s = &loaded.spec;
    println!(
        "{} is valid: project `{}`, {} pools, {} clusters, {} jobs.",
        loaded.root_file.display(),
        s.project,
        s.pools.len(),
        s.clusters.len(),
        s.jobs.len()
    );
    Ok(SUCCESS)
}

fn print_plan(plan: &Plan, output: PlanOutput) {
    match output {
        PlanOutput::Text => print!("{}", render::text(plan)),
        PlanOutput::Json => println!("{}", render::json(plan)),
        PlanOutput::Markdown => print!("{}", render::markdown(plan)),
    }
}

/// Leave what a command read to the process's exit rather than free it
/// piece by piece just before: the observed state of a large project is
/// millions of small allocations (each instance's id, type, image, tags),
/// and freeing them one by one was a tenth of `plan`'s time at 100,000
/// instances. Only for commands that end the process when they return.
fn free_at_exit<T>(value: T) {
    std::mem::forget(value);
}

async fn plan_cmd(args: PlanArgs) -> Result<u8> {
    let loaded = engine::load_spec(&args.spec.path, &load_options(&args.spec)?)?;
    let spec = &loaded.spec;
    let project = Project::open(&spec.project, &spec.provider)?;
    let mode = if args.refresh_only {
        PlanMode::RefreshOnly
    } else {
        PlanMode::Normal
    };
    if let Some(out) = &args.out {
        plan::file::check_replaceable(out)?;
    }
    // As `Project::plan`, keeping the observed state to leave it to the exit.
    let observed = project.observe().await?;
    let plan = engine::plan_against(
        spec,
        &loaded.base_dir,
        &observed,
        &project.client,
        mode,
        &Default::default(),
        &project.secret_key()?,
    )?;
    free_at_exit(observed);
    print_plan(&plan, args.output);
    if let Some(out) = &args.out {
        let secret = project.home.project_secret(&plan.project)?;
        plan::file::save(&plan, out, &secret)?;
        if args.output == PlanOutput::Text {
            println!(
                "\nSaved the plan to {}. Run `motorpool apply {}` to apply exactly it.",
                out.display(),
                out.display()
            );
        }
    }
    Ok(if args.detailed_exitcode && plan.has_changes() {
        CHANGES_PRESENT
    } else {
        SUCCESS
    })
}

fn progress_mode() -> ProgressMode {
    if std::io::stderr().is_terminal() {
        ProgressMode::Bars
    } else {
        ProgressMode::Lines
    }
}

/// Ask on a terminal; refuse without one unless --yes was given.
fn confirm(yes: bool, what: &str) -> Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to {what} without confirmation: there is no terminal to ask on. Pass --yes to {what} anyway."
        );
    }
    print!("\nDo you want to {what}? Only 'yes' will be accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

async fn run_plan(project: &Project, plan: &Plan, change: &ChangeArgs, what: &str) -> Result<u8> {
    print!("{}", render::text(plan));
    if !plan.has_changes() {
        return Ok(SUCCESS);
    }
    if !confirm(change.yes, what)? {
        println!("Cancelled: nothing was changed.");
        return Ok(ERROR);
    }
    let options = ApplyOptions {
        parallelism: change.parallelism as usize,
        progress: progress_mode(),
        ..ApplyOptions::default()
    };
    let report = project.apply(plan, &options).await?;
    println!();
    for failure in report.failures() {
        println!("  {}: {}", failure.address, failure.outcome);
    }
    println!("{}", report.summary_line());
    Ok(if report.succeeded() { SUCCESS } else { ERROR })
}

/// Take the project lock, finish an interrupted apply, then plan under the lock.
async fn locked(project: &str, provider: &ProviderBlock, command: &str) -> Result<Project> {
    let project = Project::lock_waiting(
        project,
        provider,
        command,
        &|note: &str| println!("{note}"),
        engine::WaitFor::Controller,
    )
    .await?;
    if let Some(note) = project.resume_interrupted().await? {
        println!("{note}\n");
    }
    Ok(project)
}

/// Release the project's cloud lock after `outcome`, whatever it was.
async fn unlocked(mut project: Project, outcome: Result<u8>) -> Result<u8> {
    let released = project.unlock().await;
    let code = outcome?;
    released?;
    Ok(code)
}

async fn apply_cmd(args: ApplyArgs) -> Result<u8> {
    if plan::file::looks_like_plan(&args.spec.path) {
        let plan = plan::file::load(&args.spec.path, &crate::home::Home::from_env()?)?;
        let project = locked(&plan.project, &plan.provider, "apply").await?;
        let outcome = match project.check_not_stale(&plan).await {
            Ok(()) => run_plan(&project, &plan, &args.change, "apply this saved plan").await,
            Err(e) => Err(e),
        };
        return unlocked(project, outcome).await;
    }
    let loaded = engine::load_spec(&args.spec.path, &load_options(&args.spec)?)?;
    let spec = &loaded.spec;
    let project = locked(&spec.project, &spec.provider, "apply").await?;
    let mode = if args.refresh_only {
        PlanMode::RefreshOnly
    } else {
        PlanMode::Normal
    };
    for name in &args.start {
        if !spec.clusters.contains_key(name) {
            bail!("--start {name}: there is no cluster `{name}` in the spec");
        }
    }
    let start = args.start.iter().cloned().collect();
    let outcome = async {
        let plan = project.plan(&loaded, mode, &start).await?;
        run_plan(&project, &plan, &args.change, "apply these changes").await
    }
    .await;
    unlocked(project, outcome).await
}

async fn destroy_cmd(args: DestroyArgs) -> Result<u8> {
    let loaded = engine::load_spec(&args.spec.path, &load_options(&args.spec)?)?;
    let spec = &loaded.spec;
    let project = locked(&spec.project, &spec.provider, "destroy").await?;
    let outcome = async {
        let plan = project
            .plan(&loaded, PlanMode::Destroy, &Default::default())
            .await?;
        let what = "destroy every pool and cluster of this project";
        run_plan(&project, &plan, &args.change, what).await
    }
    .await;
    unlocked(project, outcome).await
}

async fn force_unlock_cmd(args: ForceUnlockArgs) -> Result<u8> {
    let loaded = engine::load_spec(&args.spec.path, &load_options(&args.spec)?)?;
    let spec = &loaded.spec;
    let project = Project::open(&spec.project, &spec.provider)?;
    let what = format!(
        "remove the lock {} of project `{}` (only if its holder is gone: two changes at once can make machines twice)",
        args.lock_id, spec.project
    );
    if !confirm(args.yes, &what)? {
        println!("Cancelled: nothing was changed.");
        return Ok(ERROR);
    }
    let held =
        crate::apply::lock::force_unlock(&project.client, &spec.project, &args.lock_id).await?;
    println!(
        "Removed the lock of project `{}` held by {}.",
        spec.project,
        crate::apply::lock::describe_holder(&held)
    );
    Ok(SUCCESS)
}

async fn controller_cmd(args: ControllerArgs) -> Result<u8> {
    let options = crate::controller::ControllerOptions {
        load: load_options(&args.spec)?,
        path: args.spec.path,
        interval: args.interval,
        heal: args.heal,
        once: args.once,
        listen: args.listen.0,
        parallelism: args.parallelism as usize,
    };
    let log = |line: &str| {
        eprintln!(
            "{} {line}",
            crate::apply::lock::utc_text(engine::unix_now())
        )
    };
    crate::controller::run(options, &log).await?;
    Ok(SUCCESS)
}

async fn status_cmd(args: StatusArgs) -> Result<u8> {
    let loaded = engine::load_spec(&args.spec.path, &load_options(&args.spec)?)?;
    let spec = &loaded.spec;
    let project = Project::open(&spec.project, &spec.provider)?;
    let observed = project.observe().await?;
    let mut status = engine::status_of(&spec.project, spec.provider.kind(), &observed);
    free_at_exit(observed);
    engine::add_steps(&mut status, &project.agent_credential()?).await;
    match args.output {
        StatusOutput::Text => print!("{}", engine::render_status(&status)),
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&status)?),
    }
    Ok(SUCCESS)
}

/// `[PATH] NAME` words: the spec path (default `.`) and a name.
fn path_and_name(words: &[String], usage: &str) -> Result<(PathBuf, String)> {
    match words {
        [name] => Ok((PathBuf::from("."), name.clone())),
        [path, name] => Ok((PathBuf::from(path), name.clone())),
        _ => bail!("{usage}"),
    }
}

async fn run_cmd(args: RunArgs) -> Result<u8> {
    let (path, job) = path_and_name(&args.words, "run takes [PATH] JOB")?;
    let loaded = engine::load_spec(&path, &parse_load_options(args.target, &args.vars)?)?;
    let mode = progress_mode();
    let request = crate::jobs::RunRequest {
        loaded: &loaded,
        job: &job,
        apply: ApplyOptions {
            parallelism: args.parallelism as usize,
            progress: mode,
            ..ApplyOptions::default()
        },
    };
    let mut progress = crate::jobs::progress::RunProgress::new(mode);
    let report =
        crate::jobs::run(request, &|line| eprintln!("{line}"), |p| progress.update(p)).await;
    progress.finish();
    let report = report?;
    match args.output {
        RunOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        RunOutput::Text => print!("{}", crate::jobs::progress::render_report(&report)),
    }
    Ok(if report.summary.ok { SUCCESS } else { ERROR })
}

async fn logs_cmd(args: LogsArgs) -> Result<u8> {
    let (path, name) = path_and_name(&args.words, "logs takes [PATH] NAME")?;
    let loaded = engine::load_spec(&path, &LoadOptions::default())?;
    let spec = &loaded.spec;
    let project = Project::open(&spec.project, &spec.provider)?;
    if spec.jobs.contains_key(&name) {
        let record = crate::jobs::load_record(&project, &name, args.run_id.as_deref())?;
        print!("{}", crate::jobs::render_logs(&record));
        return Ok(SUCCESS);
    }
    if args.run_id.is_some() {
        bail!("--run is for jobs, and the spec has no job `{name}`");
    }
    let observed = project.observe().await?;
    let text = engine::cluster_logs(&observed, &name, &project.agent_credential()?).await?;
    print!("{text}");
    Ok(SUCCESS)
}
