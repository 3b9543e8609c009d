//! Job data on object storage, as a user runs it on the local provider: a
//! map/reduce word count reading `s3://` (moto) and `az://` (Azurite) and
//! writing its `part-NNNNN` objects back there, compared with a count made
//! here; errors from the store and bad URLs, named.
//!
//! The CLI and everything it starts (agents, driver, executors) reach the
//! stores through the standard variables only (`AWS_ENDPOINT_URL`,
//! `AZURE_STORAGE_USE_EMULATOR`, ...), all on 127.0.0.1.

// Both stores' test support include `install_once.rs` by path, each as a
// module of its own; the two copies are the same code.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "common/object_stores.rs"]
mod object_stores;
#[path = "../providers/aws/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use common::Env;
use object_stores::{Azurite, S3, parse_counts};

/// Word count as Python functions.
const WC_PY: &str = r#"
def words(line):
    for w in line.split():
        yield w, 1

def add(a, b):
    return a + b
"#;

/// A corpus: (name, bytes). One object is large enough to be cut into
/// several byte ranges (most cuts fall mid-line), one ends without a newline,
/// one is empty.
fn corpus() -> Vec<(String, Vec<u8>)> {
    const VOCAB: [&str; 10] = [
        "bucket", "object", "range", "split", "line", "map", "reduce", "shuffle", "azurite", "moto",
    ];
    let mut x: u64 = 7;
    let mut text = |lines: usize| {
        let mut t = String::new();
        for _ in 0..lines {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 1 + (x >> 60) as usize;
            let words: Vec<&str> = (0..n)
                .map(|k| VOCAB[((x >> (k * 4)) & 0xff) as usize % VOCAB.len()])
                .collect();
            t.push_str(&words.join(" "));
            t.push('\n');
        }
        t
    };
    let big = text(40_000); // about 1.5 MB
    let small = text(300);
    let mut tail = text(50);
    tail.push_str("moto azurite without newline");
    vec![
        ("data/big.txt".into(), big.into_bytes()),
        ("data/small.txt".into(), small.into_bytes()),
        ("data/tail.txt".into(), tail.into_bytes()),
        ("data/empty.txt".into(), Vec::new()),
    ]
}

/// What a single process counts in the corpus.
fn reference(corpus: &[(String, Vec<u8>)]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (_, data) in corpus {
        for w in String::from_utf8_lossy(data).split_whitespace() {
            *counts.entry(w.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

fn spec(input: &str, output: &str, bad_input: &str) -> String {
    format!(
        r#"
project: objects
provider: {{ kind: local }}
clusters:
  etl: {{ node_type: small, workers: 2 }}
jobs:
  wc:
    cluster: etl
    tasks:
      count:
        map: {{ input: "{input}", partitions: 8, python: {{ file: wc.py, function: words }} }}
        reduce: {{ partitions: 3, python: {{ file: wc.py, function: add }} }}
        output: "{output}"
  missing:
    cluster: etl
    tasks:
      count:
        map: {{ input: "{bad_input}", command: cat }}
"#
    )
}

/// Runs `wc` twice (text, then JSON) and `missing`; checks the answers with
/// `read_output` (the counts in the output's part objects) and `parts` (their names).
#[allow(clippy::too_many_arguments)]
fn word_count_on(
    env: &Env,
    input: &str,
    output: &str,
    bad_input: &str,
    expected: &BTreeMap<String, u64>,
    read_output: impl Fn() -> BTreeMap<String, u64>,
    parts: impl Fn() -> Vec<String>,
    put_stale_part: impl Fn(),
) {
    let dir = env.spec(&spec(input, output, bad_input));
    std::fs::write(dir.join("wc.py"), WC_PY).expect("wc.py");

    let run = env.mp(&["run", "wc"]).expect_code(0);
    assert!(run.stdout.contains("job `wc` succeeded"), "{}", run.stdout);
    // The report names where the output is; nothing came back to this machine.
    assert!(run.stdout.contains(output), "{}", run.stdout);
    assert!(!dir.join("out").exists());
    assert_eq!(read_output(), *expected);
    assert_eq!(parts().len(), 3, "{:?}", parts());

    // Again, as JSON, with a stale part object of an earlier run in the way.
    put_stale_part();
    let run = env
        .mp(&["run", ".", "wc", "--output", "json"])
        .expect_code(0);
    let report = run.json();
    let count = report["summary"]["tasks"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "count"))
        .cloned()
        .expect("count task");
    assert_eq!(count["output"], output, "{count}");
    assert_eq!(count["output_files"], 3, "{count}");
    assert_eq!(count["map_partitions"], 8, "{count}");
    let total: u64 = expected.values().sum();
    assert_eq!(count["records_out"], expected.len() as u64, "{count}");
    assert!(
        count["input_bytes"].as_u64().unwrap_or(0) > total,
        "{count}"
    );
    assert_eq!(parts().len(), 3, "the stale part is gone: {:?}", parts());
    assert_eq!(read_output(), *expected);

    // A store error fails the task with a message that names the URL.
    let run = env.mp(&["run", "missing"]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(text.contains(bad_input), "{text}");

    env.destroy_leaving_nothing();
}

#[test]
fn a_word_count_reads_and_writes_s3_and_equals_a_single_process_count() {
    let moto = support::Moto::start();
    let s3 = S3 { port: moto.port };
    s3.create_bucket("corpus");
    let corpus = corpus();
    for (key, data) in &corpus {
        s3.put("corpus", key, data);
    }
    // Not matched by the glob: another extension, a hidden object, a deeper key.
    s3.put("corpus", "data/notes.csv", b"csv csv csv\n");
    s3.put("corpus", "data/.hidden.txt", b"hidden\n");
    s3.put("corpus", "data/deeper/x.txt", b"deeper\n");
    let expected = reference(&corpus);

    let mut env = Env::new();
    for (k, v) in support::aws_env(Some(&moto.url())) {
        env = env.with_var(k, &v);
    }
    let env = env.with_var("AWS_ALLOW_HTTP", "true");
    word_count_on(
        &env,
        "s3://corpus/data/*.txt",
        "s3://corpus/out/wc/",
        "s3://no-such-bucket/data/*.txt",
        &expected,
        || {
            let mut counts = BTreeMap::new();
            for key in s3.keys("corpus", "out/wc/") {
                let data = s3.get("corpus", &key);
                parse_counts(&String::from_utf8_lossy(&data), &mut counts);
            }
            counts
        },
        || s3.keys("corpus", "out/wc/"),
        || s3.put("corpus", "out/wc/part-00099", b"stale\t1\n"),
    );
}

#[test]
fn a_word_count_reads_and_writes_azure_blobs_and_equals_a_single_process_count() {
    let azurite = Azurite::start();
    azurite.create_container("corpus");
    let corpus = corpus();
    for (name, data) in &corpus {
        if !data.is_empty() {
            azurite.put("corpus", name, data);
        }
    }
    azurite.put("corpus", "data/notes.csv", b"csv csv csv\n");
    let expected = reference(&corpus);

    let mut env = Env::new();
    for (k, v) in azurite.env() {
        env = env.with_var(&k, &v);
    }
    word_count_on(
        &env,
        "az://corpus/data/*.txt",
        "az://corpus/out/wc",
        "az://no-such-container/*.txt",
        &expected,
        || {
            let mut counts = BTreeMap::new();
            for name in azurite.blobs("corpus", "out/wc/") {
                let data = azurite.get("corpus", &name);
                parse_counts(&String::from_utf8_lossy(&data), &mut counts);
            }
            counts
        },
        || azurite.blobs("corpus", "out/wc/"),
        || azurite.put("corpus", "out/wc/part-00099", b"stale\t1\n"),
    );
}

#[test]
fn bad_object_urls_are_named_with_their_place_in_the_spec() {
    let env = Env::new();
    env.spec(
        r#"
project: objects
provider: { kind: local }
clusters:
  etl: { node_type: small, workers: 1 }
jobs:
  wc:
    cluster: etl
    tasks:
      a:
        map: { input: "ftp://host/data/*.txt", command: cat }
      b:
        map: { input: "s3:///data/*.txt", command: cat }
        output: "gs://bucket/out/*"
      c:
        map: { input: "az://container//x.txt", command: cat }
        output: "s3://"
"#,
    );
    let run = env.mp(&["validate"]).expect_code(1);
    for expected in [
        "motorpool.yaml:11:23: error: `input` of the map of task `a` of job `wc`: `ftp://host/data/*.txt`: unknown scheme `ftp://` (object storage is s3://, gs:// or az://)",
        "motorpool.yaml:13:23: error: `input` of the map of task `b` of job `wc`: `s3:///data/*.txt` names no bucket (write s3://bucket/path)",
        "motorpool.yaml:14:17: error: `output` of task `b` of job `wc`: `gs://bucket/out/*`: an output is one prefix, not a glob (`*` in it)",
        "motorpool.yaml:16:23: error: `input` of the map of task `c` of job `wc`: `az://container//x.txt` is not a valid object URL: it has an empty path segment (`//`)",
        "motorpool.yaml:17:17: error: `output` of task `c` of job `wc`: `s3://` names no bucket (write s3://bucket/path)",
    ] {
        assert!(run.stderr.contains(expected), "{expected}\n{}", run.stderr);
    }
}
