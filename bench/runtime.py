#!/usr/bin/env python3
"""Runtime benchmarks (issue 4): motorpool's driver/executors next to Dask
distributed and PySpark, in one run, on this machine.

  noop       N no-op tasks (default 100,000), tasks per second:
             motorpool  a map over N empty partitions: N real tasks the driver
                        plans, batches to executors over their task streams
                        and collects statuses for (nothing to execute); and a
                        map over N one-line partitions calling a Python no-op
                        function per task (in the executors' Python workers),
                        like the peers' tasks do
             Dask       client.map(noop, range(N)) on LocalCluster(2 workers x 1 thread)
             PySpark    sc.parallelize(range(N), N).foreach(noop) on local[2]
  wordcount  word count over generated text (at 256 MiB and 1 GiB; --size-mb),
             each motorpool form next to its single-process twin:
             motorpool streaming    map/reduce commands: a small C program (gcc -O2)
               twin                 the same C program alone over the whole input
             motorpool per-record   Python functions tokenize(line) and add(a, b)
                                    (long-lived workers, map-side combiner)
               twin                 one CPython process calling the same two functions
             motorpool partition    a Python function over a whole partition
                                    (`per: partition`) counting with collections.Counter
               twin                 one CPython process: Counter over the whole input
             PySpark RDD            textFile.flatMap(split).map((w,1)).reduceByKey(add)
             Dask bag               read_text.str.split().flatten().frequencies()
             Every answer is checked equal (distinct words, total, sha256).
             Each form and its twin run one after the other, --repeat rounds
             (default 3), so both see the same machine, in the opposite order
             every other round; the best round counts, and every round and
             the ratio within each round are printed (these machines are noisy).
             Beside them, the twin twice at once over the two halves of the
             input: the most two cores of this machine give that work right
             now, and how much of it motorpool reaches.

motorpool runs as 3 processes (a driver and 2 executors of 1 core each, on
loopback) like a cluster would; its time is the client's: bundle, submit
(input on this machine is read where it lies, not uploaded), scheduling, map,
shuffle, reduce, and the output written back. Peers' cluster start-up is not
timed (nor is motorpool's).
PySpark and Dask come from PyPI into a virtualenv this script makes
(bench/.venv). Java 17 must be on the PATH for PySpark.

Usage: python3 bench/runtime.py [--size-mb N [N ...]] [--noop-tasks N] [--only noop|wordcount]
                                [--skip-peers] [--repeat N] [--binary PATH --submit PATH]
Builds the release binary and the submitter (cargo example runtime-submit)
unless --binary/--submit are given. Prints figures and ratios.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from common import build_binary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
OUT = os.path.join(BENCH, "out", "runtime")
VENV = os.path.join(BENCH, ".venv")
PEERS = ["pyspark==3.5.7", "dask[distributed]==2026.8.0"]
CREDENTIAL = "bench-runtime-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:16]
SEED = 20250101


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build():
    """The release motorpool (bench/common.py) and, in the same target dir, the submitter."""
    log("==> cargo build --release (motorpool, runtime-submit)")
    binary = build_binary()
    release = os.path.dirname(binary)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.dirname(release))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "runtime-submit"],
                   cwd=ROOT, env=env, check=True)
    return binary, os.path.join(release, "examples", "runtime-submit")


def venv_python():
    py = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, ".motorpool-peers")
    want = " ".join(PEERS)
    if os.path.exists(marker) and open(marker).read() == want:
        return py
    log(f"==> virtualenv {VENV}: pip install {want}")
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet"] + PEERS, check=True)
    with open(marker, "w") as f:
        f.write(want)
    return py


class Processes:
    """Every process started here; all are stopped on exit, also on failure."""

    def __init__(self):
        self.procs = []

    def start(self, args, log_path, env=None):
        f = open(log_path, "wb")
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def wait_for(predicate, what, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def start_motorpool(procs, binary, executors, cores):
    base = os.path.join(OUT, "cluster")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    env = dict(os.environ, MOTORPOOL_CREDENTIAL=CREDENTIAL)
    driver_dir = os.path.join(base, "driver")
    procs.start([binary, "driver", "--listen", "127.0.0.1:0", "--dir", driver_dir],
                os.path.join(base, "driver.log"), env)
    driver_file = os.path.join(driver_dir, "driver.json")
    wait_for(lambda: os.path.exists(driver_file), "the driver")
    address = json.load(open(driver_file))["address"]
    logs = []
    for i in range(executors):
        path = os.path.join(base, f"executor-{i}.log")
        procs.start([binary, "executor", "--driver", address, "--dir", os.path.join(base, f"exec-{i}"),
                     "--cores", str(cores)], path, env)
        logs.append(path)
    wait_for(lambda: all("registered with the driver" in open(p).read() for p in logs), "the executors")
    return address


def submit(submitter, address, spec_dir, job):
    env = dict(os.environ, MOTORPOOL_CREDENTIAL=CREDENTIAL)
    out = subprocess.run([submitter, "--driver", address, "--spec", spec_dir, "--job", job],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"runtime-submit {job} failed:\n{out.stderr}")
    result = json.loads(out.stdout)
    if not result["summary"]["ok"]:
        sys.exit(f"job {job} failed: {result['summary'].get('error')}")
    return result


def digest_lines(lines):
    pairs = []
    for line in lines:
        if not line:
            continue
        word, _, count = line.partition("\t")
        pairs.append((word, int(count)))
    pairs.sort()
    words = [w for w, _ in pairs]
    if len(set(words)) != len(words):
        sys.exit("a word appears twice in the output")
    h = hashlib.sha256()
    for w, c in pairs:
        h.update(f"{w}\t{c}\n".encode())
    return {"distinct": len(pairs), "total": sum(c for _, c in pairs), "sha256": h.hexdigest()}


def digest_dir(path):
    lines = []
    for name in sorted(os.listdir(path)):
        if name.startswith("part-"):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                lines.extend(f.read().splitlines())
    return digest_lines(lines)


def peer(python, mode, *args):
    """Runs one peer measurement in its own process group (the JVM, Dask's
    workers), which is killed whole when it ends, also on failure."""
    env = dict(os.environ, PYSPARK_PYTHON=python, PYSPARK_DRIVER_PYTHON=python)
    p = subprocess.Popen([python, os.path.join(BENCH, "runtime_peers.py"), mode] + [str(a) for a in args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    if p.returncode != 0:
        sys.exit(f"{mode} failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


FORM_JOBS = {"native": "wc-native", "python": "wc-python", "partition": "wc-partition"}
TWINS = {"native": "single-c", "python": "single-functions", "partition": "single-counter"}


def keep(results, key, result):
    """Records one round: the fastest round's figures, and every round's seconds."""
    best = results.get(key)
    rounds = (best or {}).get("rounds", []) + [round(result["seconds"], 3)]
    if best is None or result["seconds"] < best["seconds"]:
        best = result
    results[key] = {**best, "rounds": rounds}


def single_process(form, mb, data, job):
    """The form's single-process twin over the whole input."""
    if form == "native":
        log(f"==> single process over {mb} MiB: the C program")
        start = time.perf_counter()
        with open(data, "rb") as f:
            out = subprocess.run([os.path.join(job, "wcnative"), "map"], stdin=f, capture_output=True, check=True)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, **digest_lines(out.stdout.decode().splitlines())}
    what = "Python Counter" if form == "partition" else "Python calling tokenize and add"
    log(f"==> single process over {mb} MiB: {what}")
    mode, args = python_twin(form, data, job)
    return peer(sys.executable, mode, *args)


def python_twin(form, data, job):
    """A Python form's twin over `data`: its runtime_peers.py mode and arguments."""
    if form == "partition":
        return "python-wordcount", [data]
    return "python-functions", [data, os.path.join(job, "wc.py")]


def halves(data):
    """The input cut in two at the line nearest its middle (made once, kept beside it)."""
    paths = [data + ".half0", data + ".half1"]
    if all(os.path.exists(p) for p in paths):
        return paths
    size = os.path.getsize(data)
    with open(data, "rb") as f:
        f.seek(size // 2)
        f.readline()
        middle = f.tell()
        f.seek(0)
        for path, n in zip(paths, [middle, size - middle]):
            with open(path + ".tmp", "wb") as out:
                while n:
                    chunk = f.read(min(n, 16 << 20))
                    out.write(chunk)
                    n -= len(chunk)
            os.replace(path + ".tmp", path)
    return paths


def twin_pair(form, mb, parts, job):
    """The twin twice at once, each over half the input: what two cores of
    this machine give the twin's own work right now (its cache and memory
    shared as a cluster's workers share them), with nothing between them."""
    log(f"==> two single processes at once over {mb} MiB, half each: {TWINS[form]}")
    procs = []
    try:
        for part in parts:
            if form == "native":
                argv = [sys.executable, "-c", (
                    "import subprocess,sys,time,json;t=time.perf_counter();"
                    "subprocess.run([sys.argv[1],'map'],stdin=open(sys.argv[2],'rb'),stdout=subprocess.DEVNULL,check=True);"
                    "print(json.dumps({'seconds':time.perf_counter()-t}))"),
                    os.path.join(job, "wcnative"), part]
            else:
                mode, args = python_twin(form, part, job)
                argv = [sys.executable, os.path.join(BENCH, "runtime_peers.py"), mode] + args
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True))
        seconds = 0.0
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                sys.exit(f"the twin pair ({form}) failed")
            seconds = max(seconds, json.loads(out.strip().splitlines()[-1])["seconds"])
        return {"seconds": seconds}
    finally:
        # Both stop with this call, also when one failed: each with its group.
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


SPEC = """\
project: bench-runtime
clusters:
  bench: {{ node_type: small, workers: {executors} }}
jobs:
  noop:
    cluster: bench
    tasks:
      noop:
        map: {{ input: empty.txt, command: cat, partitions: {noop_tasks} }}
  noop-python:
    cluster: bench
    tasks:
      noop:
        map: {{ input: lines.txt, python: {{ file: noop.py, function: noop }}, partitions: {noop_tasks} }}
  wc-native:
    cluster: bench
    tasks:
      count:
        map: {{ input: "data/*.txt", command: "./wcnative map", partition_mb: {partition_mb} }}
        reduce: {{ partitions: 2, command: "./wcnative reduce" }}
        output: out/native
  wc-python:
    cluster: bench
    tasks:
      count:
        map: {{ input: "data/*.txt", python: {{ file: wc.py, function: tokenize }}, partition_mb: {partition_mb} }}
        reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}
        output: out/python
  wc-partition:
    cluster: bench
    tasks:
      count:
        map: {{ input: "data/*.txt", python: {{ file: wcpart.py, function: count, per: partition }}, partition_mb: {partition_mb} }}
        reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}
        output: out/partition
"""

WCPART = """\
from collections import Counter


def count(lines):
    counts = Counter()
    for line in lines:
        counts.update(line.split())
    return counts
"""


def fmt_s(s):
    return f"{s:8.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, nargs="+", default=[256, 1024],
                    help="word count input sizes in MiB (default 256 1024)")
    ap.add_argument("--noop-tasks", type=int, default=100_000)
    ap.add_argument("--peer-budget-s", type=float, default=300,
                    help="a peer's no-op run stops growing past this (rounds of 1k, 10k, 100k tasks)")
    ap.add_argument("--partition-mb", type=int, default=64, help="map partition size for every system")
    ap.add_argument("--only", choices=["noop", "wordcount"])
    ap.add_argument("--skip-peers", action="store_true", help="motorpool and the single-process twins only")
    ap.add_argument("--forms", default="native,python,partition",
                    help="motorpool word count forms to run (default native,python,partition)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of each word count form and its twin, side by side; the best counts (default 3)")
    ap.add_argument("--binary")
    ap.add_argument("--submit")
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]

    os.makedirs(OUT, exist_ok=True)
    if args.binary and args.submit:
        binary, submitter = args.binary, args.submit
    else:
        binary, submitter = build()
    python = None if args.skip_peers else venv_python()
    executors, cores = 2, 1
    log(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; motorpool: driver + {executors} executors x {cores} core; "
        f"Dask: 2 workers x 1 thread; PySpark: local[2]")

    # The job directory: the spec, the native program, the Python functions, the input.
    job = os.path.join(OUT, "job")
    shutil.rmtree(job, ignore_errors=True)
    os.makedirs(os.path.join(job, "data"))
    subprocess.run(["gcc", "-O2", "-o", os.path.join(job, "wcnative"),
                    os.path.join(BENCH, "runtime_wcnative.c"), "-lm"], check=True)
    shutil.copy(os.path.join(ROOT, "testdata", "jobs", "wordcount", "wc.py"), job)
    with open(os.path.join(job, "wcpart.py"), "w") as f:
        f.write(WCPART)
    open(os.path.join(job, "empty.txt"), "w").close()
    with open(os.path.join(job, "lines.txt"), "w") as f:
        f.write("x\n" * args.noop_tasks)
    with open(os.path.join(job, "noop.py"), "w") as f:
        f.write("def noop(line):\n    return ()\n")
    with open(os.path.join(job, "motorpool.yaml"), "w") as f:
        f.write(SPEC.format(executors=executors, noop_tasks=args.noop_tasks, partition_mb=args.partition_mb))
    sizes = [] if args.only == "noop" else args.size_mb
    inputs = {}
    for mb in sizes:
        data = os.path.join(OUT, f"text-{mb}mb-{SEED}.txt")
        if not (os.path.exists(data) and os.path.getsize(data) >= mb << 20):
            log(f"==> generating {mb} MiB of text")
            with open(data + ".tmp", "wb") as f:
                subprocess.run([os.path.join(job, "wcnative"), "gen", str(mb << 20), str(SEED)], stdout=f, check=True)
            os.replace(data + ".tmp", data)
        inputs[mb] = data
    link = os.path.join(job, "data", "input.txt")

    results = {}
    procs = Processes()
    try:
        address = start_motorpool(procs, binary, executors, cores)
        if args.only != "wordcount":
            log(f"==> motorpool: {args.noop_tasks} no-op tasks")
            r = submit(submitter, address, job, "noop")
            results["noop/motorpool"] = {"seconds": r["wall_s"], "tasks": args.noop_tasks}
            log(f"==> motorpool: {args.noop_tasks} tasks each calling a Python no-op function")
            r = submit(submitter, address, job, "noop-python")
            results["noop/motorpool-python"] = {"seconds": r["wall_s"], "tasks": args.noop_tasks}
        for mb in sizes:
            if os.path.lexists(link):
                os.remove(link)
            # A hard link: the spec refuses a symlink that leaves the project.
            try:
                os.link(inputs[mb], link)
            except OSError:
                shutil.copyfile(inputs[mb], link)
            # The input in the page cache before the first round, as it is for
            # every later one: otherwise whichever runs first reads the disk.
            with open(inputs[mb], "rb") as f:
                while f.read(1 << 24):
                    pass
            # Each form next to its twin, round after round, so that both see
            # the same machine; the best of the rounds counts. Every other
            # round runs them in the opposite order (ABBA), so that a machine
            # speeding up or slowing down favours none of them.
            for round_ in range(args.repeat):
                for out in forms:
                    name = FORM_JOBS[out]

                    def form():
                        log(f"==> motorpool: {name} over {mb} MiB (round {round_ + 1} of {args.repeat})")
                        r = submit(submitter, address, job, name)
                        t = r["summary"]["tasks"][0]
                        keep(results, f"wordcount-{mb}/motorpool-{out}", {
                            "seconds": r["wall_s"],
                            "maps": t["map_partitions"],
                            "shuffle_bytes": t["shuffle_bytes"],
                            **digest_dir(os.path.join(job, "out", out)),
                        })

                    steps = [
                        form,
                        lambda: keep(results, f"wordcount-{mb}/{TWINS[out]}", single_process(out, mb, inputs[mb], job)),
                        lambda: keep(results, f"pair-{mb}/{TWINS[out]}", twin_pair(out, mb, halves(inputs[mb]), job)),
                    ]
                    for step in steps if round_ % 2 == 0 else reversed(steps):
                        step()
    finally:
        procs.stop_all()

    for mb in sizes:
        data = inputs[mb]
        key = f"wordcount-{mb}"
        if python:
            parts = max(1, -(-(mb << 20) // (args.partition_mb << 20)))
            log(f"==> PySpark: word count over {mb} MiB")
            results[f"{key}/pyspark"] = peer(python, "spark-wordcount", data, parts)
            log(f"==> Dask bag: word count over {mb} MiB")
            results[f"{key}/dask"] = peer(python, "dask-wordcount", data, args.partition_mb << 20)

    if python and args.only != "wordcount":
        log(f"==> Dask: {args.noop_tasks} no-op tasks")
        results["noop/dask"] = peer(python, "dask-noop", args.noop_tasks, args.peer_budget_s)
        log(f"==> PySpark: {args.noop_tasks} no-op tasks")
        results["noop/pyspark"] = peer(python, "spark-noop", args.noop_tasks, args.peer_budget_s)

    report(results, args, sizes)


# Each motorpool form, its single-process twin, and the target ratio on 2 cores.
FORMS = [
    ("motorpool-native", "streaming (C mapper)", "single-c", "the C program alone", 1.5),
    ("motorpool-python", "per-record Python fns", "single-functions", "one process, same fns", 1.8),
    ("motorpool-partition", "partition fn (Counter)", "single-counter", "one process, Counter", 1.5),
]


def report(results, args, sizes):
    print()
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cpus)")
    if "noop/motorpool" in results:
        print(f"No-op tasks ({args.noop_tasks:,} each, 2 cores)")
        mp = results["noop/motorpool"]
        mp_rate = args.noop_tasks / mp["seconds"]
        mp_py = results.get("noop/motorpool-python", mp)
        mp_py_rate = args.noop_tasks / mp_py["seconds"]
        for key, label in [("noop/motorpool", "motorpool (empty map)"),
                           ("noop/motorpool-python", "motorpool (Python fn)"),
                           ("noop/dask", "Dask distributed"),
                           ("noop/pyspark", "PySpark local[2]")]:
            if key not in results:
                continue
            r = results[key]
            rate = r["tasks"] / r["seconds"]
            ratio = "" if key.startswith("noop/motorpool") else f"   motorpool (Python fn) is {mp_py_rate / rate:6.1f}x"
            over = "" if r["tasks"] == args.noop_tasks else f"   (over {r['tasks']:,} tasks: {args.noop_tasks:,} would take ~{args.noop_tasks / rate:,.0f} s)"
            print(f"  {label:<22} {fmt_s(r['seconds'])}  {rate:>10,.0f} tasks/s{ratio}{over}")
        verdict = "met" if mp_rate >= 20_000 else "MISSED"
        print(f"  target >= 20,000 tasks/s: {verdict} ({mp_rate:,.0f}/s empty map, {mp_py_rate:,.0f}/s Python fn)")
        print()
    for mb in sizes:
        key = f"wordcount-{mb}"
        wc = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(key + "/")}
        if not wc:
            continue
        print(f"Word count over {mb} MiB of text (2 cores)")
        spark = wc.get("pyspark")
        print(f"  {'motorpool form':<24} {'motorpool':>10}   {'its single-process twin':<24} {'twin':>10}   ratio   target"
              f"          two twins on halves (this machine's 2-core ceiling)")
        for mine, label, twin, twin_label, target in FORMS:
            if mine not in wc or twin not in wc:
                continue
            a, b = wc[mine]["seconds"], wc[twin]["seconds"]
            ratio = b / a
            verdict = "met" if ratio >= target else "MISSED"
            pair = results.get(f"pair-{mb}/{twin}")
            ceiling = ""
            if pair:
                top = b / pair["seconds"]
                ceiling = f"   {fmt_s(pair['seconds'])} = {top:4.2f}x; motorpool reaches {ratio / top:4.0%} of it"
            print(f"  {label:<24} {fmt_s(a)}   {twin_label:<24} {fmt_s(b)}  {ratio:5.2f}x  >= {target}x {verdict:<6}{ceiling}")
            rounds = " ".join(f"{x:.2f}" for x in wc[mine].get("rounds", []))
            twin_rounds = " ".join(f"{x:.2f}" for x in wc[twin].get("rounds", []))
            pair_rounds = " ".join(f"{x:.2f}" for x in (pair or {}).get("rounds", []))
            print(f"    rounds (s): motorpool {rounds}; twin {twin_rounds}; two twins {pair_rounds}")
            # The ratio within each round: the form and its twin minutes apart at most.
            within = [t / m for m, t in zip(wc[mine].get("rounds", []), wc[twin].get("rounds", []))]
            if len(within) > 1:
                print(f"    ratio within each round: {' '.join(f'{x:.2f}x' for x in within)}"
                      f" (median {statistics.median(within):.2f}x)")
        for k, label in [("pyspark", "PySpark RDD"), ("dask", "Dask bag")]:
            if k not in wc:
                continue
            r = wc[k]
            line = f"  {label:<24} {fmt_s(r['seconds'])}  {mb / r['seconds']:8.1f} MiB/s"
            if "motorpool-native" in wc:
                line += f"   motorpool streaming is {r['seconds'] / wc['motorpool-native']['seconds']:5.1f}x faster"
            print(line)
        digests = {(r["distinct"], r["total"], r["sha256"]) for r in wc.values()}
        if len(digests) == 1:
            d, t, _ = next(iter(digests))
            print(f"  every answer equal ({len(wc)} systems): {d:,} distinct words, {t:,} words")
        else:
            print("  ANSWERS DIFFER:")
            for k, r in wc.items():
                print(f"    {k}: {r['distinct']} distinct, {r['total']} total, {r['sha256'][:12]}")
        if spark and "motorpool-native" in wc:
            ratio = spark["seconds"] / wc["motorpool-native"]["seconds"]
            print(f"  target motorpool streaming >= 5x PySpark: {'met' if ratio >= 5 else 'MISSED'} ({ratio:.1f}x)")
        print()
    print(json.dumps(results, indent=1, sort_keys=True), file=sys.stderr)


if __name__ == "__main__":
    main()
