//! From a `spec::Job` to what the driver schedules: tasks in `depends_on`
//! order, each a command or a map (+ reduce); and map input split into
//! partitions on line boundaries.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::spec::{Job, PythonFunction, PythonPer, SparkTask};

use super::proto::InputRange;
use super::safe_relative;

/// The default map partition size, when a map sets neither `partitions` nor `partition_mb`.
pub const DEFAULT_PARTITION_MB: u32 = 64;

/// Without `partitions`, a partition is never made smaller than this just to
/// give every core work.
const MIN_SPLIT_BYTES: u64 = 64 << 10;

/// The most partitions one stage may have.
pub const MAX_PARTITIONS: u32 = 1_000_000;

/// What a map or reduce runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Func {
    /// `sh -c COMMAND` in the job directory.
    Command(String),
    Python(PythonFunction),
}

impl Func {
    pub fn is_python(&self) -> bool {
        matches!(self, Func::Python(_))
    }

    /// A Python function that takes a whole partition per call.
    pub fn is_per_partition(&self) -> bool {
        matches!(self, Func::Python(p) if p.per == Some(PythonPer::Partition))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MapPlan {
    /// A file or glob, relative to the job directory.
    pub input: String,
    pub partitions: Option<u32>,
    pub partition_mb: Option<u32>,
    pub func: Func,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReducePlan {
    pub partitions: Option<u32>,
    pub func: Func,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    Command(String),
    /// A PySpark application, submitted on the driver node.
    Spark(SparkTask),
    Map {
        map: MapPlan,
        reduce: Option<ReducePlan>,
    },
}

/// One task of the job, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    pub name: String,
    /// Indexes of the tasks it depends on (all earlier in [`JobPlan::tasks`]).
    pub deps: Vec<usize>,
    pub kind: TaskKind,
    /// retries + 1.
    pub max_attempts: u32,
    pub timeout_minutes: Option<u32>,
    /// Where `part-NNNNN` files go, relative to the job directory.
    pub output: Option<PathBuf>,
    /// Or the object storage prefix (`s3://`, `gs://`, `az://`) the
    /// executors write `part-NNNNN` objects under.
    pub output_url: Option<String>,
}

impl PlannedTask {
    /// Where the task's output goes, as the run summary names it.
    pub fn output_name(&self) -> Option<String> {
        self.output_url.clone().or_else(|| {
            self.output
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
        })
    }
}

impl PlannedTask {
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            TaskKind::Command(_) => "command",
            TaskKind::Spark(_) => "spark",
            TaskKind::Map { reduce: None, .. } => "map",
            TaskKind::Map {
                reduce: Some(_), ..
            } => "map_reduce",
        }
    }
}

/// A Spark task's files stay in the job directory; its properties are Spark's.
fn check_spark(spark: &SparkTask) -> anyhow::Result<()> {
    safe_relative(&spark.script).map_err(|e| anyhow::anyhow!("`spark.script`: {e}"))?;
    for f in &spark.py_files {
        safe_relative(f).map_err(|e| anyhow::anyhow!("`spark.py_files` {f:?}: {e}"))?;
    }
    for key in spark.conf.keys() {
        check_spark_property(key).map_err(|e| anyhow::anyhow!("`spark.conf`: {e}"))?;
    }
    Ok(())
}

/// Properties motorpool sets itself: where the application runs, how its
/// daemons authenticate, and the ports it picked.
pub const SPARK_RESERVED: &[&str] = &[
    "spark.master",
    "spark.submit.deployMode",
    "spark.authenticate",
    "spark.authenticate.secret",
    "spark.port.maxRetries",
    "spark.pyspark.python",
    "spark.pyspark.driver.python",
];

/// A Spark property a spec may set: `spark.` and a name, not one motorpool owns.
pub fn check_spark_property(key: &str) -> Result<(), String> {
    let name = key.strip_prefix("spark.").unwrap_or("");
    if name.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "`{key}` is not a Spark property (they look like `spark.sql.shuffle.partitions`)"
        ));
    }
    if SPARK_RESERVED.contains(&key) {
        return Err(format!("`{key}` is set by motorpool for the cluster"));
    }
    Ok(())
}

/// A job's tasks in an order where every task comes after those it depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    pub tasks: Vec<PlannedTask>,
}

fn func(
    command: &Option<String>,
    python: &Option<PythonFunction>,
    what: &str,
) -> anyhow::Result<Func> {
    match (command, python) {
        (Some(c), None) => {
            if c.trim().is_empty() {
                bail!("the `command` of {what} is empty");
            }
            Ok(Func::Command(c.clone()))
        }
        (None, Some(p)) => {
            safe_relative(&p.file).with_context(|| format!("`python.file` of {what}"))?;
            if !is_python_identifier(&p.function) {
                bail!(
                    "`python.function` of {what} is not a Python function name: {:?}",
                    p.function
                );
            }
            Ok(Func::Python(p.clone()))
        }
        (Some(_), Some(_)) => bail!("{what} sets both `command` and `python`; choose one"),
        (None, None) => bail!("{what} needs one of `command` or `python`"),
    }
}

fn is_python_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

/// Checks a job and orders its tasks. Every problem is reported, not only the first.
pub fn plan_job(job: &Job) -> anyhow::Result<JobPlan> {
    let mut problems: Vec<String> = Vec::new();
    if job.tasks.is_empty() {
        problems.push("the job has no tasks".to_string());
    }
    let mut planned: BTreeMap<&str, (PlannedTask, Vec<String>)> = BTreeMap::new();
    for (name, t) in &job.tasks {
        let what = format!("task `{name}`");
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            problems.push(format!("{what}: not a valid task name"));
            continue;
        }
        let kind = match (&t.command, &t.map) {
            _ if t.spark.is_some() => {
                let Some(spark) = &t.spark else { continue };
                if t.command.is_some() || t.map.is_some() || t.reduce.is_some() {
                    problems.push(format!(
                        "{what} sets `spark` and `command` or `map`; choose one"
                    ));
                    continue;
                }
                match check_spark(spark) {
                    Ok(()) => TaskKind::Spark(spark.clone()),
                    Err(e) => {
                        problems.push(format!("{what}: {e}"));
                        continue;
                    }
                }
            }
            (Some(c), None) => {
                if t.reduce.is_some() {
                    problems.push(format!("`reduce` in {what} needs a `map`"));
                }
                if c.trim().is_empty() {
                    problems.push(format!("the `command` of {what} is empty"));
                }
                TaskKind::Command(c.clone())
            }
            (None, Some(m)) => {
                let mut ok = true;
                let mwhat = format!("the map of {what}");
                let mfunc = func(&m.command, &m.python, &mwhat).map_err(|e| {
                    problems.push(e.to_string());
                    ok = false;
                });
                // A URL (`s3://`...) is not a path of the project.
                let input = if motorpool_storage::is_data_url(&m.input) {
                    if let Err(e) = motorpool_storage::DataUrl::parse(&m.input) {
                        problems.push(format!("`input` of {mwhat}: {e}"));
                        ok = false;
                    }
                    m.input.clone()
                } else {
                    match crate::confine::job_path(&m.input) {
                        Ok(input) => input.to_string_lossy().into_owned(),
                        Err(e) => {
                            problems.push(format!("`input` of {mwhat}: {e}"));
                            ok = false;
                            String::new()
                        }
                    }
                };
                if m.partitions == Some(0) || m.partition_mb == Some(0) {
                    problems.push(format!("{mwhat}: partitions must be at least 1"));
                    ok = false;
                }
                if m.partitions.is_some_and(|p| p > MAX_PARTITIONS) {
                    problems.push(format!(
                        "{mwhat}: more than {MAX_PARTITIONS} partitions is not supported"
                    ));
                    ok = false;
                }
                if m.partitions.is_some() && m.partition_mb.is_some() {
                    problems.push(format!(
                        "{mwhat} sets both `partitions` and `partition_mb`; choose one"
                    ));
                    ok = false;
                }
                let reduce = match &t.reduce {
                    None => None,
                    Some(r) => {
                        let rwhat = format!("the reduce of {what}");
                        if r.partitions == Some(0) {
                            problems.push(format!("{rwhat}: partitions must be at least 1"));
                            ok = false;
                        }
                        if r.partitions.is_some_and(|p| p > MAX_PARTITIONS) {
                            problems.push(format!(
                                "{rwhat}: more than {MAX_PARTITIONS} partitions is not supported"
                            ));
                            ok = false;
                        }
                        if r.python.as_ref().is_some_and(|p| p.per.is_some()) {
                            problems.push(format!(
                                "`python.per` of {rwhat}: a reduce function folds two values; \
                                 only a map's function takes a record or a partition"
                            ));
                            ok = false;
                        }
                        match func(&r.command, &r.python, &rwhat) {
                            Ok(f) => Some(ReducePlan {
                                partitions: r.partitions,
                                func: f,
                            }),
                            Err(e) => {
                                problems.push(e.to_string());
                                ok = false;
                                None
                            }
                        }
                    }
                };
                if !ok {
                    continue;
                }
                let Ok(mfunc) = mfunc else { continue };
                TaskKind::Map {
                    map: MapPlan {
                        input,
                        partitions: m.partitions,
                        partition_mb: m.partition_mb,
                        func: mfunc,
                    },
                    reduce,
                }
            }
            (Some(_), Some(_)) => {
                problems.push(format!("{what} sets both `command` and `map`; choose one"));
                continue;
            }
            (None, None) => {
                problems.push(format!("{what} needs one of `command`, `map` or `spark`"));
                continue;
            }
        };
        let (output, output_url) = match &t.output {
            None => (None, None),
            Some(o) if motorpool_storage::is_data_url(o) => {
                match motorpool_storage::DataUrl::parse_output(o) {
                    Ok(u) => (None, Some(u.to_string())),
                    Err(e) => {
                        problems.push(format!("`output` of {what}: {e}"));
                        continue;
                    }
                }
            }
            Some(o) => match crate::confine::job_path(o) {
                Ok(p) => (Some(p), None),
                Err(e) => {
                    problems.push(format!("`output` of {what}: {e}"));
                    continue;
                }
            },
        };
        if (output.is_some() || output_url.is_some())
            && matches!(kind, TaskKind::Command(_) | TaskKind::Spark(_))
        {
            problems.push(format!(
                "`output` of {what}: only a map (or map/reduce) task writes `part-NNNNN` files"
            ));
            continue;
        }
        let retries = t.retries.unwrap_or(job.retries);
        planned.insert(
            name.as_str(),
            (
                PlannedTask {
                    name: name.clone(),
                    deps: Vec::new(),
                    kind,
                    max_attempts: retries.saturating_add(1),
                    timeout_minutes: t.timeout_minutes,
                    output,
                    output_url,
                },
                t.depends_on.clone(),
            ),
        );
    }
    for (name, t) in &job.tasks {
        for d in &t.depends_on {
            if !job.tasks.contains_key(d) {
                problems.push(format!(
                    "unknown task `{d}` in `depends_on` of task `{name}`"
                ));
            }
        }
    }
    // Two tasks writing one output directory would clobber each other.
    let mut outputs: HashMap<String, &str> = HashMap::new();
    for (name, (t, _)) in &planned {
        let key = t
            .output_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(o) = key.or_else(|| t.output.as_ref().map(|p| p.display().to_string()))
            && let Some(other) = outputs.insert(o.clone(), name)
        {
            problems.push(format!(
                "tasks `{other}` and `{name}` both write `output` {o}"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("the job is not valid:\n  {}", problems.join("\n  "));
    }

    // Kahn's algorithm, taking names in order, so the plan is deterministic.
    let mut order: Vec<String> = Vec::new();
    let mut indegree: BTreeMap<&str, usize> = planned
        .iter()
        .map(|(n, (_, deps))| (*n, deps.len()))
        .collect();
    loop {
        let ready: Vec<&str> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            indegree.remove(n);
            order.push(n.to_string());
            for (m, (_, deps)) in &planned {
                if deps.iter().any(|d| d == n)
                    && let Some(count) = indegree.get_mut(m)
                {
                    *count -= deps.iter().filter(|d| *d == n).count();
                }
            }
        }
    }
    if !indegree.is_empty() {
        let names: Vec<&str> = indegree.keys().copied().collect();
        bail!(
            "the job is not valid: a cycle in `depends_on` among tasks {}",
            names.join(", ")
        );
    }
    let index: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut tasks = Vec::with_capacity(order.len());
    for name in &order {
        let Some((t, deps)) = planned.remove(name.as_str()) else {
            continue;
        };
        let mut t = t;
        t.deps = deps
            .iter()
            .filter_map(|d| index.get(d.as_str()).copied())
            .collect();
        t.deps.sort_unstable();
        t.deps.dedup();
        tasks.push(t);
    }
    Ok(JobPlan { tasks })
}

/// The files under `dir` that `pattern` (relative) matches, sorted, with their sizes.
///
/// The pattern stays in `dir` after normalising, and so does every match
/// through symlinks: a match that resolves out of `dir` is refused, named.
pub fn resolve_input(dir: &Path, pattern: &str) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let normalised =
        crate::confine::job_path(pattern).with_context(|| format!("input `{pattern}`"))?;
    let full = format!(
        "{}/{}",
        glob::Pattern::escape(&dir.to_string_lossy()),
        normalised.to_string_lossy()
    );
    let paths =
        glob::glob(&full).with_context(|| format!("input `{pattern}` is not a valid glob"))?;
    let mut out = Vec::new();
    for p in paths {
        let p = p.with_context(|| format!("cannot read a match of input `{pattern}`"))?;
        crate::confine::resolves_inside(dir, &p).with_context(|| format!("input `{pattern}`"))?;
        let meta = std::fs::metadata(&p).with_context(|| format!("cannot read {}", p.display()))?;
        if !meta.is_file() {
            continue;
        }
        let rel = p
            .strip_prefix(dir)
            .with_context(|| format!("{} is outside the job directory", p.display()))?
            .to_path_buf();
        if rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            continue;
        }
        out.push((rel, meta.len()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// How many map partitions `total` bytes get on `cores` cores.
///
/// `partitions` is taken as written. Otherwise the partition size
/// (`partition_mb`, or the default) is an upper bound, with Hadoop's 10%
/// slop: the count is the smallest that leaves at most a tenth of a
/// partition over, spread evenly (256 MiB and a few bytes make 4 partitions
/// on 2 cores, not 5 raised to 6). It is raised so that every core gets work
/// (down to [`MIN_SPLIT_BYTES`] a partition), and then to a whole number of
/// waves. Partitions of equal bytes take about
/// equally long, so a last wave with fewer partitions than cores leaves the
/// others idle: 5 partitions on 2 cores take 3 partitions' time where 6
/// smaller ones take 2.5.
pub fn partition_count(
    total: u64,
    partitions: Option<u32>,
    partition_mb: Option<u32>,
    default_partition_mb: u32,
    cores: usize,
) -> u32 {
    if let Some(p) = partitions {
        return p.clamp(1, MAX_PARTITIONS);
    }
    let cores = (cores as u64).max(1);
    let target = u64::from(partition_mb.unwrap_or(default_partition_mb).max(1)) << 20;
    let splits = total.div_ceil(MIN_SPLIT_BYTES);
    // ceil(total / target - 0.1)
    let within_slop = total
        .saturating_mul(10)
        .saturating_sub(target)
        .div_ceil(target.saturating_mul(10));
    let mut n = within_slop.max(1).max(cores.min(splits));
    if n > cores {
        n = n.div_ceil(cores).saturating_mul(cores).min(splits.max(n));
    }
    n.clamp(1, u64::from(MAX_PARTITIONS)) as u32
}

/// Splits `files` (relative paths under `dir`, with sizes) into `parts`
/// partitions of about equal bytes, each a list of byte ranges that begin at
/// a line start and end after a newline (or at a file's end).
pub fn split_input(
    dir: &Path,
    files: &[(PathBuf, u64)],
    parts: u32,
) -> anyhow::Result<Vec<Vec<InputRange>>> {
    split_input_with(files, parts, |rel| dir.join(rel))
}

/// [`split_input`], with `path_of` saying where each (relative) file is read.
pub fn split_input_with(
    files: &[(PathBuf, u64)],
    parts: u32,
    path_of: impl Fn(&Path) -> PathBuf,
) -> anyhow::Result<Vec<Vec<InputRange>>> {
    let sizes: Vec<u64> = files.iter().map(|(_, s)| *s).collect();
    let cuts = cuts(&sizes, parts);
    let mut open: Option<(usize, std::fs::File)> = None;
    let mut aligned = Vec::with_capacity(cuts.len());
    for cut in cuts {
        aligned.push(match cut {
            Cut::At(at) => at,
            Cut::Align { file, start, from } => {
                let f = match &mut open {
                    Some((k, f)) if *k == file => f,
                    _ => {
                        let path = path_of(&files[file].0);
                        let f = std::fs::File::open(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?;
                        &mut open.insert((file, f)).1
                    }
                };
                start + next_line_start(f, from, sizes[file])?
            }
        });
    }
    let names: Vec<String> = files
        .iter()
        .map(|(rel, _)| rel.to_string_lossy().into_owned())
        .collect();
    Ok(assemble(&names, &sizes, parts, aligned, false))
}

/// Splits objects on object storage (`url`, size) into `parts` partitions
/// exactly as [`split_input`] splits files: the bytes where a boundary falls
/// are read (ranged GETs, several at once) to move it to the next line start.
pub async fn split_objects(
    stores: &motorpool_storage::Stores,
    objects: &[motorpool_storage::Object],
    parts: u32,
) -> anyhow::Result<Vec<Vec<InputRange>>> {
    let sizes: Vec<u64> = objects.iter().map(|o| o.size).collect();
    let urls = objects
        .iter()
        .map(|o| motorpool_storage::DataUrl::parse(&o.url))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = objects.iter().map(|o| o.url.clone()).collect();
    split_async(&names, &sizes, parts, |file, from| {
        let (url, size) = (&urls[file], sizes[file]);
        async move { Ok(stores.next_line_start(url, from, size).await?) }
    })
    .await
}

/// [`split_input`] over files read asynchronously: `next_line` answers, for
/// file `i` and an offset in it, the offset just after the first newline at
/// or after it (the file's size when there is none). Several at once.
async fn split_async<F, Fut>(
    names: &[String],
    sizes: &[u64],
    parts: u32,
    next_line: F,
) -> anyhow::Result<Vec<Vec<InputRange>>>
where
    F: Fn(usize, u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    use futures_util::{StreamExt, TryStreamExt};
    let next_line = &next_line;
    let aligned: Vec<u64> = futures_util::stream::iter(cuts(sizes, parts))
        .map(|cut| async move {
            match cut {
                Cut::At(at) => Ok::<u64, anyhow::Error>(at),
                Cut::Align { file, start, from } => Ok(start + next_line(file, from).await?),
            }
        })
        .buffered(8)
        .try_collect()
        .await?;
    Ok(assemble(names, sizes, parts, aligned, true))
}

/// Where an inner partition boundary falls, before it is moved to a line start.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// At a file's start or end: already a line start.
    At(u64),
    /// Inside file `file` (which starts at global offset `start`): the line
    /// start after the first newline at or after local offset `from`.
    Align { file: usize, start: u64, from: u64 },
}

/// The `parts - 1` inner boundaries of files of `sizes` cut into `parts` of
/// about equal bytes. Aligning each one on its own and then keeping the
/// boundaries ascending gives the same partitions as aligning them in turn.
fn cuts(sizes: &[u64], parts: u32) -> Vec<Cut> {
    let parts = parts.max(1) as usize;
    let total: u64 = sizes.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    // Global offset where each file starts.
    let mut starts = Vec::with_capacity(sizes.len());
    let mut acc = 0u64;
    for s in sizes {
        starts.push(acc);
        acc += s;
    }
    (1..parts)
        .map(|i| {
            let nominal = (total as u128 * i as u128 / parts as u128) as u64;
            // The file holding `nominal`.
            let fi = match starts.binary_search(&nominal) {
                Ok(mut k) => {
                    // Several empty files can start at the same offset: the first non-empty.
                    while k + 1 < sizes.len() && sizes[k] == 0 {
                        k += 1;
                    }
                    k
                }
                Err(k) => k - 1,
            };
            let local = nominal - starts[fi];
            if local == 0 || local >= sizes[fi] {
                Cut::At(nominal.min(starts[fi] + sizes[fi]))
            } else {
                Cut::Align {
                    file: fi,
                    start: starts[fi],
                    from: local - 1,
                }
            }
        })
        .collect()
}

/// The partitions of files (`names`, `sizes`) between the aligned inner
/// boundaries `aligned` (from [`cuts`]): each a list of byte ranges.
/// `object_sizes`: the ranges carry their object's size (object storage).
fn assemble(
    names: &[String],
    sizes: &[u64],
    parts: u32,
    aligned: Vec<u64>,
    object_sizes: bool,
) -> Vec<Vec<InputRange>> {
    let parts = parts.max(1) as usize;
    let total: u64 = sizes.iter().sum();
    let mut out = vec![Vec::new(); parts];
    if total == 0 {
        return out;
    }
    let mut bounds = Vec::with_capacity(parts + 1);
    bounds.push(0u64);
    for a in aligned {
        let prev = *bounds.last().unwrap_or(&0);
        bounds.push(a.max(prev));
    }
    bounds.push(total);
    for (p, part) in out.iter_mut().enumerate() {
        let (lo, hi) = (bounds[p], bounds[p + 1]);
        if lo >= hi {
            continue;
        }
        let mut fs = 0u64;
        for (name, size) in names.iter().zip(sizes) {
            let fe = fs + size;
            let (a, b) = (lo.max(fs), hi.min(fe));
            if a < b {
                part.push(InputRange {
                    path: name.clone(),
                    start: a - fs,
                    end: b - fs,
                    local: None,
                    size: if object_sizes { *size } else { 0 },
                });
            }
            fs = fe;
        }
    }
    out
}

/// The offset just after the first newline at or after `from` (or `size`).
fn next_line_start(f: &mut std::fs::File, from: u64, size: u64) -> anyhow::Result<u64> {
    f.seek(SeekFrom::Start(from))
        .context("cannot seek in an input file")?;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = from;
    loop {
        let n = f.read(&mut buf).context("cannot read an input file")?;
        if n == 0 {
            return Ok(size);
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok((pos + i as u64 + 1).min(size));
        }
        pos += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{MapStage, ReduceStage, Task};

    fn cmd(c: &str, deps: &[&str]) -> Task {
        Task {
            command: Some(c.into()),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            ..Task::default()
        }
    }

    #[test]
    fn plans_order_tasks_by_depends_on() {
        let mut job = Job::default();
        job.tasks.insert("c".into(), cmd("true", &["b"]));
        job.tasks.insert("a".into(), cmd("true", &[]));
        job.tasks.insert("b".into(), cmd("true", &["a"]));
        job.retries = 2;
        let plan = plan_job(&job).expect("plan");
        let names: Vec<&str> = plan.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(plan.tasks[2].deps, vec![1]);
        assert_eq!(plan.tasks[0].max_attempts, 3);
    }

    #[test]
    fn bad_jobs_report_every_problem() {
        let mut job = Job::default();
        job.tasks.insert("x".into(), cmd("true", &["nope", "y"]));
        job.tasks.insert("y".into(), cmd("true", &["x"]));
        job.tasks.insert(
            "m".into(),
            Task {
                map: Some(MapStage {
                    input: "../etc/passwd".into(),
                    ..MapStage::default()
                }),
                reduce: Some(ReduceStage::default()),
                ..Task::default()
            },
        );
        let err = plan_job(&job).expect_err("invalid").to_string();
        assert!(err.contains("unknown task `nope`"), "{err}");
        assert!(err.contains("needs one of `command` or `python`"), "{err}");
        assert!(err.contains(".."), "{err}");
        job.tasks.remove("m");
        job.tasks.get_mut("x").expect("x").depends_on = vec!["y".into()];
        let err = plan_job(&job).expect_err("cycle").to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn a_map_input_never_follows_a_symlink_out_of_the_project() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("a.txt"), "a\n").expect("write");
        assert_eq!(
            resolve_input(dir.path(), "./in/../*.txt")
                .expect("glob")
                .len(),
            1
        );
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("shadow.txt"), "x\n").expect("write");
        std::os::unix::fs::symlink(
            outside.path().join("shadow.txt"),
            dir.path().join("zz-link.txt"),
        )
        .expect("symlink");
        let err = resolve_input(dir.path(), "*.txt").expect_err("refused");
        assert!(format!("{err:#}").contains("zz-link.txt"), "{err:#}");
    }

    #[test]
    fn splits_fall_on_line_boundaries_and_cover_everything() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = "alpha beta\ngamma\ndelta epsilon zeta\n".repeat(50);
        let b = "no newline at the end".to_string();
        std::fs::write(dir.path().join("a.txt"), &a).expect("write");
        std::fs::write(dir.path().join("b.txt"), &b).expect("write");
        std::fs::write(dir.path().join("empty.txt"), "").expect("write");
        let files = resolve_input(dir.path(), "*.txt").expect("glob");
        assert_eq!(files.len(), 3);
        for parts in [1, 2, 3, 7, 40, 5000] {
            let split = split_input(dir.path(), &files, parts).expect("split");
            assert_eq!(split.len(), parts as usize);
            let mut joined = Vec::new();
            for part in &split {
                for r in part {
                    let data = std::fs::read(dir.path().join(&r.path)).expect("read");
                    let piece = &data[r.start as usize..r.end as usize];
                    if r.start > 0 {
                        assert_eq!(data[r.start as usize - 1], b'\n', "starts at a line");
                    }
                    joined.extend_from_slice(piece);
                }
            }
            assert_eq!(
                joined,
                [a.as_bytes(), b.as_bytes()].concat(),
                "{parts} parts"
            );
        }
        assert_eq!(partition_count(0, Some(100_000), None, 64, 2), 100_000);
        assert_eq!(partition_count(1 << 30, None, None, 64, 2), 16);
        assert_eq!(partition_count(1000, None, None, 64, 4), 1);
        assert_eq!(partition_count(1 << 20, None, None, 64, 4), 4);
        // A partition size is an upper bound (with 10% slop), filled up to
        // whole waves.
        let mib = 1u64 << 20;
        assert_eq!(partition_count(256 * mib + 11, None, Some(64), 64, 2), 4);
        assert_eq!(partition_count(262 * mib, None, Some(64), 64, 2), 4);
        assert_eq!(partition_count(263 * mib, None, Some(64), 64, 2), 6);
        assert_eq!(partition_count(70 * mib, None, Some(64), 64, 1), 1);
        assert_eq!(partition_count(71 * mib, None, Some(64), 64, 1), 2);
        assert_eq!(partition_count(256 * mib, None, Some(64), 64, 2), 4);
        assert_eq!(partition_count(256 * mib, None, Some(64), 64, 3), 6);
        assert_eq!(partition_count(30 * mib, None, Some(64), 64, 2), 2);
        assert_eq!(partition_count(100 << 10, None, Some(64), 64, 8), 2);
        assert_eq!(partition_count(0, None, Some(64), 64, 2), 1);
        assert!(resolve_input(dir.path(), "../*.txt").is_err());
    }

    #[tokio::test]
    async fn objects_split_as_files_do() {
        // The same bytes as files and as "objects" read by offset: the same
        // partitions, each range carrying its object's size.
        let dir = tempfile::tempdir().expect("tmp");
        let data: Vec<Vec<u8>> = vec![
            "one two\nthree\nfour five six seven\n"
                .repeat(300)
                .into_bytes(),
            Vec::new(),
            b"no newline at the end".to_vec(),
            "x\n".repeat(7).into_bytes(),
            b"a single very long line without any newline at all ".repeat(40),
        ];
        let mut files = Vec::new();
        for (i, d) in data.iter().enumerate() {
            let name = format!("f{i}.txt");
            std::fs::write(dir.path().join(&name), d).expect("write");
            files.push((PathBuf::from(name), d.len() as u64));
        }
        let names: Vec<String> = files
            .iter()
            .map(|(p, _)| format!("s3://b/{}", p.display()))
            .collect();
        let sizes: Vec<u64> = files.iter().map(|(_, s)| *s).collect();
        for parts in [1, 2, 3, 5, 8, 33, 1000] {
            let local = split_input(dir.path(), &files, parts).expect("local split");
            let objects = split_async(&names, &sizes, parts, |file, from| {
                let d = &data[file];
                async move {
                    Ok(d[from as usize..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(d.len() as u64, |i| from + i as u64 + 1))
                }
            })
            .await
            .expect("object split");
            assert_eq!(local.len(), objects.len());
            for (l, o) in local.iter().zip(&objects) {
                let l: Vec<(String, u64, u64)> = l
                    .iter()
                    .map(|r| (format!("s3://b/{}", r.path), r.start, r.end))
                    .collect();
                let o: Vec<(String, u64, u64)> =
                    o.iter().map(|r| (r.path.clone(), r.start, r.end)).collect();
                assert_eq!(l, o, "{parts} parts");
            }
            for r in objects.iter().flatten() {
                let i: usize = r.path["s3://b/f".len()..r.path.len() - 4]
                    .parse()
                    .expect("index");
                assert_eq!(r.size, sizes[i]);
                // Every range starts at a line start.
                assert!(r.start == 0 || data[i][r.start as usize - 1] == b'\n');
            }
        }
    }

    #[test]
    fn object_urls_are_checked_when_a_job_is_planned() {
        let mut job = Job::default();
        job.tasks.insert(
            "m".into(),
            Task {
                map: Some(MapStage {
                    input: "s3://bucket/data/*.txt".into(),
                    command: Some("cat".into()),
                    ..MapStage::default()
                }),
                output: Some("s3://bucket/out/".into()),
                ..Task::default()
            },
        );
        let plan = plan_job(&job).expect("plan");
        assert_eq!(
            plan.tasks[0].output_url.as_deref(),
            Some("s3://bucket/out/")
        );
        assert_eq!(plan.tasks[0].output, None);
        assert_eq!(
            plan.tasks[0].output_name().as_deref(),
            Some("s3://bucket/out/")
        );
        if let Some(m) = job.tasks.get_mut("m") {
            m.output = Some("s3://bucket/out/*".into());
        }
        let err = plan_job(&job).expect_err("glob output").to_string();
        assert!(err.contains("`output` of task `m`"), "{err}");
        assert!(err.contains("not a glob"), "{err}");
        if let Some(map) = job.tasks.get_mut("m").and_then(|m| m.map.as_mut()) {
            map.input = "hdfs://nn/data".into();
        }
        let err = plan_job(&job).expect_err("bad input").to_string();
        assert!(err.contains("unknown scheme `hdfs://`"), "{err}");
    }
}
