//! Each startup step as the `RunStep` request a node's agent runs: a script
//! rendered from `templates/`, its files, its environment, and an
//! idempotency key derived from its content (so a re-run skips what is done).

use std::collections::HashMap;

use serde_json::json;

use super::template::Templates;
use super::{BootSpec, Step};
use crate::proto::agent::RunStepRequest;

/// Where things are on the node's machine.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The Python that makes the node's virtualenv.
    pub python: String,
    /// The motorpool executable the node links as its runtime.
    pub motorpool_binary: String,
    /// The machine-wide content-addressed cache (libraries).
    pub cache_dir: String,
    /// Most seconds one step may take, unless the spec says otherwise.
    pub timeout_seconds: u32,
    /// The length of a minute of `startup_timeout_minutes` (tests shorten it).
    pub minute: std::time::Duration,
}

/// The default `startup_timeout_minutes`.
pub const DEFAULT_STEP_TIMEOUT_MINUTES: u32 = 30;

/// Most seconds one of `spec`'s steps may take: its `startup_timeout_minutes`
/// (a shortened minute still gives at least a second), or the context's default.
pub fn step_timeout_seconds(ctx: &StepContext, spec: &BootSpec) -> u32 {
    match spec.startup_timeout_minutes {
        Some(m) => {
            let ms = ctx.minute.as_millis().saturating_mul(u128::from(m));
            u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
        }
        None => ctx.timeout_seconds,
    }
}

pub use crate::words::short_hash;

fn request(step: &str, script: String, key: String, timeout_seconds: u32) -> RunStepRequest {
    RunStepRequest {
        step: step.to_string(),
        script,
        env: HashMap::new(),
        files: HashMap::new(),
        timeout_seconds,
        key,
        recorded_duration_ms: 0,
    }
}

/// A step the engine performed itself, recorded on the node with its duration.
pub fn recorded(step: Step, duration_ms: u64) -> RunStepRequest {
    let mut r = request(step.name(), String::new(), String::new(), 0);
    r.recorded_duration_ms = duration_ms;
    r
}

/// 3. os & runtime setup.
pub fn runtime(
    t: &Templates,
    ctx: &StepContext,
    spec: &BootSpec,
) -> Result<RunStepRequest, minijinja::Error> {
    let mut script = t.render(
        "steps/runtime.sh",
        json!({ "runtime": spec.runtime, "python": ctx.python, "motorpool_binary": ctx.motorpool_binary }),
    )?;
    // The cluster's engine installs itself here too (Java and pyspark for Spark).
    let engine = crate::registry::Registry::global().engine(&spec.engine);
    let mut version = String::new();
    if let Some(setup) = engine.and_then(|e| e.setup(&spec.engine_version)) {
        version = setup.version.clone();
        // Rendering drops a template's last newline: the setup starts on a line of its own.
        script.push('\n');
        script.push_str(&t.render(
            setup.template,
            json!({ "cache_dir": ctx.cache_dir, "python": ctx.python, "version": setup.version, "package": setup.package }),
        )?);
    }
    let key = short_hash(&[
        "runtime",
        &spec.runtime,
        &ctx.python,
        &ctx.motorpool_binary,
        &spec.engine,
        &version,
    ]);
    Ok(request(
        Step::Runtime.name(),
        script,
        key,
        step_timeout_seconds(ctx, spec),
    ))
}

/// The content-addressed key of a library set.
pub fn libraries_key(spec: &BootSpec) -> String {
    let mut parts: Vec<&str> = spec.pip.iter().map(String::as_str).collect();
    parts.sort_unstable();
    let mut all: Vec<&str> = vec!["libraries"];
    all.extend(parts);
    for r in &spec.requirements {
        all.push(&r.content);
    }
    short_hash(&all)
}

/// 5. libraries (None when the set is empty).
pub fn libraries(
    t: &Templates,
    ctx: &StepContext,
    spec: &BootSpec,
) -> Result<Option<RunStepRequest>, minijinja::Error> {
    if spec.pip.is_empty() && spec.requirements.is_empty() {
        return Ok(None);
    }
    let key = libraries_key(spec);
    let names: Vec<String> = spec
        .requirements
        .iter()
        .enumerate()
        .map(|(i, _)| format!("requirements-{i}.txt"))
        .collect();
    let script = t.render(
        "steps/libraries.sh",
        json!({ "cache_dir": ctx.cache_dir, "key": key, "pip": spec.pip, "requirements": names, "python": ctx.python }),
    )?;
    let mut r = request(
        Step::Libraries.name(),
        script,
        key,
        step_timeout_seconds(ctx, spec),
    );
    for (name, file) in names.iter().zip(&spec.requirements) {
        r.files
            .insert(name.clone(), file.content.clone().into_bytes());
    }
    Ok(Some(r))
}

/// 5. the init scripts, in order; each its own step (`init:<name>`) with its output kept.
pub fn init_scripts(
    t: &Templates,
    ctx: &StepContext,
    spec: &BootSpec,
) -> Result<Vec<RunStepRequest>, minijinja::Error> {
    // A changed secret reruns the scripts: its digest counts, never its value.
    let env_text = spec.env_identity();
    spec.init_scripts
        .iter()
        .map(|s| {
            // The name becomes a step name and a log file name: `validate`
            // refused control characters in it, and so does the side that runs it.
            if let Some(c) = crate::confine::control_character(&s.name) {
                return Err(refused(format!(
                    "init script {:?}: its name holds a control character ({c:?})",
                    s.name
                )));
            }
            let file = "script.sh";
            let script = t.render("steps/init_script.sh", json!({ "file": file }))?;
            let key = short_hash(&["init", &s.name, &s.content, &env_text]);
            let mut r = request(
                &format!("init:{}", s.name),
                script,
                key,
                step_timeout_seconds(ctx, spec),
            );
            r.files
                .insert(file.to_string(), s.content.clone().into_bytes());
            r.env = spec.node_env().into_iter().collect();
            Ok(r)
        })
        .collect()
}

/// A step the node refuses to render, and why.
fn refused(message: String) -> minijinja::Error {
    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message)
}

/// A mount's source, split for the templates.
fn mount_context(source: &str, target: &str, read_only: bool) -> serde_json::Value {
    for scheme in ["s3", "gs", "az"] {
        if let Some(rest) = source.strip_prefix(&format!("{scheme}://")) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            return json!({ "scheme": scheme, "bucket": bucket, "prefix": prefix, "source": source, "target": target, "read_only": read_only });
        }
    }
    json!({ "scheme": "path", "source": source, "target": target, "read_only": read_only, "prefix": "", "bucket": "" })
}

/// 6. security & access: the mounts (None when there are none).
pub fn mounts(
    t: &Templates,
    ctx: &StepContext,
    spec: &BootSpec,
) -> Result<Option<RunStepRequest>, minijinja::Error> {
    if spec.mounts.is_empty() {
        return Ok(None);
    }
    // Confined again here, on the side that runs it: a plan or a journal
    // may have been edited after `validate`.
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let problem = |what: &str, p: crate::confine::PathProblem| {
            refused(format!(
                "the {what} of mount {:?} -> {:?}: {p}",
                m.source, m.target
            ))
        };
        crate::confine::node_source(&m.source).map_err(|p| problem("source", p))?;
        let target = crate::confine::node_target(&m.target).map_err(|p| problem("target", p))?;
        mounts.push(mount_context(&m.source, &target, m.read_only));
    }
    let script = t.render("steps/mounts.sh", json!({ "mounts": mounts }))?;
    let text = serde_json::to_string(&spec.mounts).unwrap_or_default();
    Ok(Some(request(
        Step::Security.name(),
        script,
        short_hash(&["mounts", &text]),
        step_timeout_seconds(ctx, spec),
    )))
}

/// The steps an idle pool instance runs on itself when it starts: runtime
/// setup and the pool's preloaded libraries.
pub fn warm_up(
    t: &Templates,
    ctx: &StepContext,
    spec: &BootSpec,
) -> Result<Vec<RunStepRequest>, minijinja::Error> {
    let mut steps = vec![runtime(t, ctx, spec)?];
    steps.extend(libraries(t, ctx, spec)?);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::words::MountSpec;

    fn spec_with(mounts: Vec<MountSpec>) -> BootSpec {
        BootSpec {
            runtime: "1".into(),
            engine: String::new(),
            pip: vec![],
            requirements: vec![],
            init_scripts: vec![],
            env: Default::default(),
            mounts,
            autotermination_minutes: None,
            workers: 0,
            startup_timeout_minutes: None,
            ..BootSpec::default()
        }
    }

    fn ctx() -> StepContext {
        StepContext {
            python: "python3".into(),
            motorpool_binary: "motorpool".into(),
            cache_dir: "/tmp".into(),
            timeout_seconds: 60,
            minute: std::time::Duration::from_secs(60),
        }
    }

    /// Defence in depth: a plan or journal edited after `validate` still
    /// cannot make a node link outside its directory.
    #[test]
    fn the_node_refuses_a_mount_that_leaves_its_directory() {
        let t = Templates::new();
        for (source, target) in [
            ("/project/data", "/../../../../tmp/x"),
            ("/project/../../etc", "/mnt/etc"),
            ("relative/data", "/mnt/data"),
        ] {
            let spec = spec_with(vec![MountSpec {
                source: source.into(),
                target: target.into(),
                read_only: false,
            }]);
            let err = mounts(&t, &ctx(), &spec).expect_err("refused");
            assert!(err.to_string().contains("leads out of"), "{err}");
        }
        let fine = spec_with(vec![MountSpec {
            source: "/project/data".into(),
            target: "/mnt/./data".into(),
            read_only: true,
        }]);
        let step = mounts(&t, &ctx(), &fine).expect("ok").expect("a step");
        assert!(step.script.contains("'/mnt/data'"), "{}", step.script);
    }
}
