#!/usr/bin/env python3
"""Spark as a cluster's engine (issue 12), on the local provider, side by side
in one run:

  startup    a 1+2 Spark cluster to ready, cold (pyspark not yet on the
             machine and no pip download cache: a fresh node downloads and
             installs it in the runtime step) vs drawn from a pool whose idle
             instances preloaded the engine (`preload: { engine: spark }`).
             Target: the pool-drawn cluster at least 5x faster to ready.
  wordcount  the same word count over generated text: on the bundled engine
             (a 1+2 cluster, a partition function counting with Counter), on
             Spark standalone (a 1+2 cluster, `spark:` task), and with Spark's
             `local[2]` (spark-submit alone, no cluster); answers checked
             equal, ratios printed.

Usage: python3 bench/spark.py [--binary PATH] [--only startup|wordcount] [--size-mb N]
Java 17 must be on the PATH. Each figure is one run's wall time.
"""

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import build_binary

DATABRICKS = "Databricks' published pool gain: median 145 s -> under 40 s (3.6x)"
VERSION = "4.0.1"


def mp(binary, home, specdir, cache, *args, fresh_pip=False):
    env = dict(os.environ, MOTORPOOL_HOME=home, MOTORPOOL_CACHE_DIR=cache, TMPDIR=os.path.join(home, "tmp"))
    if fresh_pip:
        # As on a fresh node: nothing in pip's download or wheel cache.
        env["PIP_NO_CACHE_DIR"] = "1"
    os.makedirs(env["TMPDIR"], exist_ok=True)
    start = time.perf_counter()
    p = subprocess.run([binary, *args], cwd=specdir, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    took = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"motorpool {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return took, p.stdout


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def wait_warm(binary, home, specdir, cache, count, limit=900):
    deadline = time.time() + limit
    while time.time() < deadline:
        _, out = mp(binary, home, specdir, cache, "status", "--output", "json")
        nodes = json.loads(out)["nodes"]
        if len(nodes) >= count and all(n.get("step") == "runtime" for n in nodes):
            return
        time.sleep(2)
    sys.exit("the pool did not warm up in time")


ENGINE = f"""
    workers: 2
    engine: {{ kind: spark, version: "{VERSION}" }}
"""
CLUSTER = "\n    node_type: small" + ENGINE


def startup(binary, tmp):
    print("== startup: a 1+2 Spark cluster to ready (local provider, one run each)")
    # Cold: an empty machine cache and no pip cache.
    home, spec, cache = (os.path.join(tmp, "cold", d) for d in ("home", "spec", "cache"))
    write(os.path.join(spec, "motorpool.yaml"), f"project: sparkcold\nprovider: {{ kind: local }}\nclusters:\n  analytics:{CLUSTER}")
    cold, _ = mp(binary, home, spec, cache, "apply", "--yes", fresh_pip=True)
    mp(binary, home, spec, cache, "destroy", "--yes")
    print(f"  cold (installs Java check + pyspark {VERSION} from PyPI): {cold:8.2f} s")

    # Pool: its idle instances preload the engine first (not timed).
    home, spec, cache = (os.path.join(tmp, "pool", d) for d in ("home", "spec", "cache"))
    pool = (f"project: sparkpool\nprovider: {{ kind: local }}\npools:\n  lot:\n    node_type: small\n"
            f"    min_idle: 3\n    max_capacity: 6\n    preload: {{ engine: {{ kind: spark, version: \"{VERSION}\" }} }}\n")
    write(os.path.join(spec, "motorpool.yaml"), pool)
    mp(binary, home, spec, cache, "apply", "--yes", fresh_pip=True)
    wait_warm(binary, home, spec, cache, 3)
    write(os.path.join(spec, "motorpool.yaml"), pool + f"clusters:\n  analytics:\n    pool: lot{ENGINE}")
    warm, _ = mp(binary, home, spec, cache, "apply", "--yes")
    mp(binary, home, spec, cache, "destroy", "--yes")
    print(f"  drawn from a pool that preloaded it:          {warm:8.2f} s")
    print(f"  ratio cold / pool: {cold / warm:.1f}x (target >= 5x; {DATABRICKS})")


WC_PY = """
from collections import Counter

def count(lines):
    c = Counter()
    for line in lines:
        c.update(line.split())
    return c

def add(a, b):
    return a + b
"""

WC_SPARK = """
import hashlib, sys
from pyspark.sql import SparkSession
spark = SparkSession.builder.appName("wordcount").getOrCreate()
counts = (spark.sparkContext.textFile(sys.argv[1])
          .flatMap(lambda line: line.split())
          .map(lambda w: (w, 1))
          .reduceByKey(lambda a, b: a + b)
          .collect())
text = "".join(f"{w}\\t{n}\\n" for w, n in sorted(counts))
print("DIGEST", len(counts), sum(n for _, n in counts), hashlib.sha256(text.encode()).hexdigest())
spark.stop()
"""


def digest(counts):
    text = "".join(f"{w}\t{n}\n" for w, n in sorted(counts.items()))
    return f"{len(counts)} {sum(counts.values())} {hashlib.sha256(text.encode()).hexdigest()}"


def make_text(path, size_mb):
    vocab = [f"w{i}" for i in range(5000)] + ["spark", "pool", "cluster", "driver", "worker"]
    x = 12345
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        written = 0
        while written < size_mb << 20:
            words = []
            for _ in range(12):
                x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
                words.append(vocab[(x >> 33) % len(vocab)])
            line = " ".join(words) + "\n"
            f.write(line)
            written += len(line)


def wordcount(binary, tmp, size_mb):
    print(f"== wordcount: {size_mb} MiB of text, 1+2 small nodes (local provider, one run each)")
    home, spec, cache = (os.path.join(tmp, "wc", d) for d in ("home", "spec", "cache"))
    shared = os.environ.get("MOTORPOOL_CACHE_DIR")
    if shared:
        cache = shared
    make_text(os.path.join(spec, "data", "text.txt"), size_mb)
    write(os.path.join(spec, "wc.py"), WC_PY)
    write(os.path.join(spec, "jobs", "wc_spark.py"), WC_SPARK)
    write(os.path.join(spec, "motorpool.yaml"), f"""
project: sparkwc
provider: {{ kind: local }}
clusters:
  bundled: {{ node_type: small, workers: 2 }}
  spark:{CLUSTER}
jobs:
  bundled:
    cluster: bundled
    tasks:
      count:
        map: {{ input: data/text.txt, python: {{ file: wc.py, function: count, per: partition }} }}
        reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}
        output: out/wc
  spark:
    cluster: spark
    tasks:
      count: {{ spark: {{ script: jobs/wc_spark.py, args: ["{os.path.join(spec, 'data', 'text.txt')}"] }} }}
""")
    # Both clusters up first (not timed).
    mp(binary, home, spec, cache, "apply", "--yes")
    bundled, _ = mp(binary, home, spec, cache, "run", "bundled")
    counts = collections.Counter()
    out = os.path.join(spec, "out", "wc")
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            for line in f:
                w, n = line.rstrip("\n").split("\t")
                counts[w] += int(n)
    bundled_digest = digest(counts)
    standalone, text = mp(binary, home, spec, cache, "run", "spark")
    spark_digest = next(l.split(" ", 1)[1] for l in text.splitlines() if l.strip().startswith("DIGEST "))
    # local[2]: the same script, spark-submit alone, from the engine the nodes installed.
    engine = os.path.join(cache, "engines", f"spark-{VERSION}", "venv")
    submit = next(os.path.join(r, "spark-submit") for r, _, files in os.walk(os.path.join(engine, "lib"))
                  if r.endswith("pyspark/bin") and "spark-submit" in files)
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=os.path.join(engine, "bin", "python"),
               PYSPARK_DRIVER_PYTHON=os.path.join(engine, "bin", "python"))
    start = time.perf_counter()
    p = subprocess.run([submit, "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                        os.path.join(spec, "jobs", "wc_spark.py"), os.path.join(spec, "data", "text.txt")],
                       env=env, capture_output=True, text=True)
    local2 = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"spark-submit local[2] failed:\n{p.stderr[-3000:]}")
    local_digest = next(l.split(" ", 1)[1] for l in p.stdout.splitlines() if l.startswith("DIGEST "))
    mp(binary, home, spec, cache, "destroy", "--yes")
    if not (bundled_digest == spark_digest == local_digest):
        sys.exit(f"answers differ: bundled {bundled_digest}, standalone {spark_digest}, local[2] {local_digest}")
    print(f"  answers equal: {bundled_digest.split()[0]} distinct words, {bundled_digest.split()[1]} words")
    print(f"  motorpool engine (1+2, partition function):  {bundled:8.2f} s")
    print(f"  Spark standalone (1+2, spark: task):         {standalone:8.2f} s   bundled is {standalone / bundled:.1f}x faster")
    print(f"  Spark local[2] (spark-submit alone):         {local2:8.2f} s   bundled is {local2 / bundled:.1f}x faster")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary")
    ap.add_argument("--only", choices=["startup", "wordcount"])
    ap.add_argument("--size-mb", type=int, default=64)
    args = ap.parse_args()
    if shutil.which("java") is None:
        sys.exit("Spark needs Java 17: install openjdk-17-jre-headless")
    binary = args.binary or build_binary()
    with tempfile.TemporaryDirectory(prefix="mp-bench-spark-") as tmp:
        try:
            if args.only in (None, "startup"):
                startup(binary, tmp)
            if args.only in (None, "wordcount"):
                wordcount(binary, tmp, args.size_mb)
        finally:
            # Whatever a failed step left running under this tree.
            subprocess.run(["pkill", "-f", tmp], check=False)


if __name__ == "__main__":
    main()
