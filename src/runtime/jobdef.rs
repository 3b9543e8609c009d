//! The job as it travels to the driver: `proto::JobDef`, converted from the
//! spec's [`Job`] on the submitting side and back on the driver.
//!
//! Owns the wire form of a job and its evolution rule (add-only, unknown
//! fields ignored, meaning-changing additions named in `requires`). It must
//! not plan or check a job: [`super::plan::plan_job`] does that on both sides.

use crate::spec::{Job, MapStage, PythonFunction, PythonPer, ReduceStage, SparkTask, Task};

use super::proto;

/// The `requires` name of a job with a Python map that takes a whole partition.
pub const PYTHON_PER_PARTITION: &str = "python-per-partition";

/// The `requires` name of a job with a `spark:` task.
pub const SPARK: &str = "spark";

/// The `requires` name of a job that reads or writes object storage
/// (`s3://`, `gs://`, `az://` in a map's `input` or a task's `output`): a
/// driver without it would take the URL for a local path.
pub const OBJECT_STORAGE: &str = "object-storage";

/// Every `requires` name this driver knows how to honour.
pub const FEATURES: &[&str] = &[PYTHON_PER_PARTITION, SPARK, OBJECT_STORAGE];

/// Why a driver refuses a job it received.
#[derive(Debug, thiserror::Error)]
pub enum JobDefError {
    #[error(
        "the job needs {} that this driver (motorpool {}) does not have; run it on a cluster with a newer runtime",
        names(.0),
        super::VERSION
    )]
    Unsupported(Vec<String>),
    #[error("task `{0}` is listed twice")]
    DuplicateTask(String),
}

fn names(v: &[String]) -> String {
    let quoted: Vec<String> = v.iter().map(|n| format!("`{n}`")).collect();
    format!(
        "{} {}",
        if v.len() == 1 { "feature" } else { "features" },
        quoted.join(", ")
    )
}

fn python_to(p: &PythonFunction) -> proto::PythonFn {
    let per = match p.per {
        Some(PythonPer::Partition) => proto::PythonPer::Partition,
        Some(PythonPer::Record) | None => proto::PythonPer::Record,
    };
    proto::PythonFn {
        file: p.file.clone(),
        function: p.function.clone(),
        per: per as i32,
    }
}

fn python_from(p: proto::PythonFn) -> PythonFunction {
    let per = (p.per == proto::PythonPer::Partition as i32).then_some(PythonPer::Partition);
    PythonFunction {
        file: p.file,
        function: p.function,
        per,
    }
}

/// The job's wire form (its cluster settings stay with the submitter).
pub fn to_proto(job: &Job) -> proto::JobDef {
    let mut requires = Vec::new();
    let tasks = job
        .tasks
        .iter()
        .map(|(name, t)| {
            let map = t.map.as_ref().map(|m| {
                if m.python
                    .as_ref()
                    .is_some_and(|p| p.per == Some(PythonPer::Partition))
                    && !requires.iter().any(|r| r == PYTHON_PER_PARTITION)
                {
                    requires.push(PYTHON_PER_PARTITION.to_string());
                }
                proto::MapDef {
                    input: m.input.clone(),
                    command: m.command.clone(),
                    python: m.python.as_ref().map(python_to),
                    partitions: m.partitions,
                    partition_mb: m.partition_mb,
                }
            });
            let reduce = t.reduce.as_ref().map(|r| proto::ReduceDef {
                partitions: r.partitions,
                command: r.command.clone(),
                python: r.python.as_ref().map(python_to),
            });
            if t.spark.is_some() && !requires.iter().any(|r| r == SPARK) {
                requires.push(SPARK.to_string());
            }
            let on_storage = t
                .map
                .as_ref()
                .is_some_and(|m| motorpool_storage::is_data_url(&m.input))
                || t.output
                    .as_deref()
                    .is_some_and(motorpool_storage::is_data_url);
            if on_storage && !requires.iter().any(|r| r == OBJECT_STORAGE) {
                requires.push(OBJECT_STORAGE.to_string());
            }
            proto::TaskDef {
                name: name.clone(),
                depends_on: t.depends_on.clone(),
                retries: t.retries,
                timeout_minutes: t.timeout_minutes,
                command: t.command.clone(),
                map,
                reduce,
                output: t.output.clone(),
                spark: t.spark.as_ref().map(|s| proto::SparkDef {
                    script: s.script.clone(),
                    args: s.args.clone(),
                    py_files: s.py_files.clone(),
                    conf: s.conf.clone().into_iter().collect(),
                }),
            }
        })
        .collect();
    proto::JobDef {
        retries: job.retries,
        timeout_minutes: job.timeout_minutes,
        // Secret values never travel in the job's definition: `run` reads
        // them and hands them over in the submission's env.
        env: job
            .env
            .iter()
            .filter_map(|(k, v)| match v {
                crate::spec::EnvValue::Text(text) => Some((k.clone(), text.clone())),
                crate::spec::EnvValue::Secret(_) => None,
            })
            .collect(),
        tasks,
        requires,
    }
}

/// The job a driver runs, refused when it needs a feature this driver lacks.
pub fn from_proto(def: proto::JobDef) -> Result<Job, JobDefError> {
    let unknown: Vec<String> = def
        .requires
        .iter()
        .filter(|r| !FEATURES.contains(&r.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(JobDefError::Unsupported(unknown));
    }
    let mut job = Job {
        retries: def.retries,
        timeout_minutes: def.timeout_minutes,
        env: def
            .env
            .into_iter()
            .map(|(k, v)| (k, crate::spec::EnvValue::Text(v)))
            .collect(),
        ..Job::default()
    };
    for t in def.tasks {
        let task = Task {
            depends_on: t.depends_on,
            command: t.command,
            map: t.map.map(|m| MapStage {
                input: m.input,
                command: m.command,
                python: m.python.map(python_from),
                partitions: m.partitions,
                partition_mb: m.partition_mb,
            }),
            reduce: t.reduce.map(|r| ReduceStage {
                partitions: r.partitions,
                command: r.command,
                python: r.python.map(python_from),
            }),
            output: t.output,
            retries: t.retries,
            timeout_minutes: t.timeout_minutes,
            spark: t.spark.map(|s| SparkTask {
                script: s.script,
                args: s.args,
                py_files: s.py_files,
                conf: s.conf.into_iter().collect(),
            }),
        };
        if job.tasks.insert(t.name.clone(), task).is_some() {
            return Err(JobDefError::DuplicateTask(t.name));
        }
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn sample() -> Job {
        let mut job = Job {
            retries: 2,
            timeout_minutes: Some(9),
            ..Job::default()
        };
        job.env.insert("A".into(), "1".into());
        job.tasks.insert(
            "count".into(),
            Task {
                map: Some(MapStage {
                    input: "data/*.txt".into(),
                    python: Some(PythonFunction {
                        file: "wc.py".into(),
                        function: "count".into(),
                        per: Some(PythonPer::Partition),
                    }),
                    partition_mb: Some(8),
                    ..MapStage::default()
                }),
                reduce: Some(ReduceStage {
                    partitions: Some(3),
                    python: Some(PythonFunction {
                        file: "wc.py".into(),
                        function: "add".into(),
                        per: None,
                    }),
                    ..ReduceStage::default()
                }),
                output: Some("out".into()),
                retries: Some(0),
                ..Task::default()
            },
        );
        job.tasks.insert(
            "after".into(),
            Task {
                command: Some("true".into()),
                depends_on: vec!["count".into()],
                timeout_minutes: Some(1),
                ..Task::default()
            },
        );
        job
    }

    #[test]
    fn a_job_survives_the_wire() {
        let job = sample();
        let def = to_proto(&job);
        assert_eq!(def.requires, [PYTHON_PER_PARTITION]);
        let bytes = def.encode_to_vec();
        let back = from_proto(proto::JobDef::decode(bytes.as_slice()).expect("decode"))
            .expect("known features");
        assert_eq!(back, job);
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_requirements_refused() {
        let mut bytes = to_proto(&sample()).encode_to_vec();
        // Field 99 (varint) and field 100 (bytes) from a newer submitter.
        prost::encoding::encode_key(99, prost::encoding::WireType::Varint, &mut bytes);
        prost::encoding::encode_varint(7, &mut bytes);
        prost::encoding::string::encode(100, &"later".to_string(), &mut bytes);
        let def = proto::JobDef::decode(bytes.as_slice()).expect("unknown fields decode");
        assert_eq!(from_proto(def).expect("runs"), sample());

        let mut def = to_proto(&sample());
        def.requires.push("time-travel".into());
        let err = from_proto(def).expect_err("refused").to_string();
        assert!(
            err.contains("`time-travel`") && err.contains("newer runtime"),
            "{err}"
        );
    }
}
