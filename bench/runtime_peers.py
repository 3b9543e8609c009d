"""The peers of bench/runtime.py, run with its virtualenv's Python: one
measurement per process, its result as one JSON line on stdout.

  python runtime_peers.py spark-noop N BUDGET_SECONDS
  python runtime_peers.py dask-noop N BUDGET_SECONDS
  python runtime_peers.py spark-wordcount PATH PARTITIONS
  python runtime_peers.py dask-wordcount PATH BLOCKSIZE_BYTES
  python runtime_peers.py python-wordcount PATH
  python runtime_peers.py python-functions PATH WC_PY

Cluster start-up (JVM, SparkContext, Dask LocalCluster) is not timed; a tiny
warm-up job runs first so that worker processes exist. No-op runs go in
rounds of 1,000, 10,000, ... tasks up to N, and stop before a round that would
take longer than BUDGET_SECONDS at the rate seen (the rate is what counts). Word counts return a
digest (distinct words, total, sha256 of the sorted word<TAB>count lines) so
the caller can check every system got the same answer.
"""

import hashlib
import json
import logging
import sys
import time


def digest(pairs):
    items = sorted(pairs)
    h = hashlib.sha256()
    total = 0
    for word, count in items:
        h.update(f"{word}\t{count}\n".encode())
        total += count
    return {"distinct": len(items), "total": total, "sha256": h.hexdigest()}


def spark_session():
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("motorpool-bench")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def in_rounds(n, budget, run):
    """Runs `run(k)` for k = 1,000, 10,000, ... up to n, stopping before a
    round that would take longer than `budget` seconds at the rate seen so
    far; returns the largest round's tasks and seconds."""
    k = min(1000, n)
    while True:
        seconds = run(k)
        if k >= n or seconds * min(n, k * 10) / k > budget:
            return {"seconds": seconds, "tasks": k, "requested": n}
        k = min(n, k * 10)


def spark_noop(n, budget):
    spark = spark_session()
    sc = spark.sparkContext
    sc.parallelize(range(10), 2).foreach(lambda x: None)

    def run(k):
        start = time.perf_counter()
        sc.parallelize(range(k), k).foreach(lambda x: None)
        return time.perf_counter() - start

    result = in_rounds(n, budget, run)
    spark.stop()
    return result


def spark_wordcount(path, partitions):
    from operator import add

    spark = spark_session()
    sc = spark.sparkContext
    sc.parallelize(range(10), 2).count()
    start = time.perf_counter()
    counts = (
        sc.textFile(path, minPartitions=partitions)
        .flatMap(lambda line: line.split())
        .map(lambda word: (word, 1))
        .reduceByKey(add, 2)
        .collect()
    )
    seconds = time.perf_counter() - start
    spark.stop()
    return {"seconds": seconds, **digest(counts)}


def dask_cluster():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


def noop(x):
    return None


def dask_noop(n, budget):
    from dask.distributed import wait

    cluster, client = dask_cluster()
    wait(client.map(noop, range(10), pure=False))

    def run(k):
        start = time.perf_counter()
        futures = client.map(noop, range(k), pure=False)
        wait(futures)
        seconds = time.perf_counter() - start
        del futures
        return seconds

    result = in_rounds(n, budget, run)
    client.close()
    cluster.close()
    return result


def dask_wordcount(path, blocksize):
    import dask.bag as db
    from dask.distributed import wait

    cluster, client = dask_cluster()
    wait(client.map(noop, range(10), pure=False))
    start = time.perf_counter()
    counts = db.read_text(path, blocksize=blocksize).str.split().flatten().frequencies().compute()
    seconds = time.perf_counter() - start
    client.close()
    cluster.close()
    return {"seconds": seconds, **digest(counts)}


def python_wordcount(path):
    from collections import Counter

    start = time.perf_counter()
    counts = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(line.split())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **digest(counts.items())}


def python_functions(path, wc_file):
    """One process calling the per-record functions motorpool's workers call
    (tokenize(line) -> (word, 1) pairs, add(a, b)), combining as they do."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wc", wc_file)
    wc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wc)
    tokenize, add = wc.tokenize, wc.add
    start = time.perf_counter()
    counts = {}
    get = counts.get
    missing = object()
    with open(path, encoding="utf-8") as f:
        for line in f:
            for k, v in tokenize(line.rstrip("\n")):
                old = get(k, missing)
                counts[k] = v if old is missing else add(old, v)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **digest(counts.items())}


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "spark-noop":
        result = spark_noop(int(args[0]), float(args[1]))
    elif mode == "dask-noop":
        result = dask_noop(int(args[0]), float(args[1]))
    elif mode == "spark-wordcount":
        result = spark_wordcount(args[0], int(args[1]))
    elif mode == "dask-wordcount":
        result = dask_wordcount(args[0], int(args[1]))
    elif mode == "python-wordcount":
        result = python_wordcount(args[0])
    elif mode == "python-functions":
        result = python_functions(args[0], args[1])
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
