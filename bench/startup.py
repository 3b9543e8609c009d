#!/usr/bin/env python3
"""Cluster startup benchmark (issue 3): time to ready of a 1 driver + 7 worker
cluster, cold (launched and set up from scratch) vs drawn from a warm pool,
side by side in one run, on two providers:

  local  real agent processes; cold nodes make their own virtualenv (step 3),
         pool nodes did that ahead of time. Target: pool >= 5x faster, < 1 s.
  local-libraries
         the same cluster with two libraries from PyPI, as a data cluster has:
         cold on a fresh machine (its library cache empty) vs a pool that
         preloaded them (`preload: { libraries }`), as Databricks pools do.
  sim    a simulated cloud with a VM boot time of --boot seconds (default 20):
         the gain when allocation dominates.

Usage: python3 bench/startup.py [--binary PATH] [--runs N] [--boot SECONDS]
Each figure is the wall time of `motorpool apply --yes` that creates the
cluster (the pool, when there is one, was created and warmed before).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import build_binary

DATABRICKS = "Databricks' published pool gain: median 145 s -> under 40 s (3.6x)"


def mp(binary, home, specdir, *args):
    # A fresh machine: no pip download cache either (nodes' pip inherits this).
    env = dict(os.environ, MOTORPOOL_HOME=home, PIP_NO_CACHE_DIR="1")
    start = time.perf_counter()
    p = subprocess.run([binary, *args], cwd=specdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - start
    if p.returncode not in (0, 2):
        sys.exit(f"motorpool {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return took, p.stdout


def write(specdir, text):
    with open(os.path.join(specdir, "motorpool.yaml"), "w") as f:
        f.write(text)


def wait_warm(binary, home, specdir, n, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        _, out = mp(binary, home, specdir, "status", "--output", "json")
        nodes = json.loads(out)["nodes"]
        if sum(1 for x in nodes if x.get("step") == "runtime" and x["state"] == "running") >= n:
            return
        time.sleep(0.2)
    sys.exit("the pool never warmed up")


LIBRARIES = '[ { pip: "six==1.16.0" }, { pip: "idna==3.10" } ]'


def one(binary, tmp, provider, tag, warm, libraries=False):
    home = os.path.join(tmp, f"home-{tag}")
    specdir = os.path.join(tmp, f"spec-{tag}")
    os.makedirs(specdir)
    preload = f", preload: {{ libraries: {LIBRARIES} }}" if libraries else ""
    libs = f", libraries: {LIBRARIES}" if libraries else ""
    pool = f"pools:\n  general: {{ node_type: small, min_idle: 8, max_capacity: 16{preload} }}\n"
    head = f"project: bench-{tag}\nprovider: {provider}\n"
    if warm:
        write(specdir, head + pool)
        mp(binary, home, specdir, "apply", "--yes")
        wait_warm(binary, home, specdir, 8)
        write(specdir, head + pool + f"clusters:\n  etl: {{ pool: general, workers: 7{libs} }}\n")
    else:
        write(specdir, head + f"clusters:\n  etl: {{ node_type: small, workers: 7{libs} }}\n")
    took, _ = mp(binary, home, specdir, "apply", "--yes")
    mp(binary, home, specdir, "destroy", "--yes")
    return took


def compare(binary, runs, name, provider, libraries=False):
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="mp-bench-startup-") as tmp:
        for r in range(runs):
            # Each run has its own $MOTORPOOL_HOME: a fresh machine, its library cache empty.
            cold.append(one(binary, tmp, provider, f"{name}-cold-{r}", False, libraries))
            warm.append(one(binary, tmp, provider, f"{name}-warm-{r}", True, libraries))
    c, w = min(cold), min(warm)
    print(f"   cold (launch + set up 8 nodes): best {c:.3f} s  ({', '.join(f'{x:.3f}' for x in cold)})")
    print(f"   from a warm pool:               best {w:.3f} s  ({', '.join(f'{x:.3f}' for x in warm)})")
    return c, w


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--boot", type=float, default=20.0)
    p.add_argument("--only", choices=["local", "local-libraries", "sim"])
    a = p.parse_args()
    binary = a.binary or build_binary()
    for name, case in [("local", local), ("local-libraries", local_libraries), ("sim", sim)]:
        if a.only in (None, name):
            case(binary, a)


def local(binary, a):
    print("== local: 1 driver + 7 workers to ready, cold vs from a warm pool")
    c, w = compare(binary, a.runs, "local", "{ kind: local }")
    ok = c / w >= 5 and w < 1
    print(f"   ratio cold/warm: {c / w:.1f}x (target >= 5x and warm < 1 s: {'MET' if ok else 'MISSED'}); {DATABRICKS}")


def local_libraries(binary, a):
    print(f"== local-libraries: the same cluster with libraries {LIBRARIES}, a fresh machine each run")
    c, w = compare(binary, a.runs, "local-libraries", "{ kind: local }", libraries=True)
    ok = c / w >= 5 and w < 1
    print(f"   ratio cold/warm: {c / w:.1f}x (target >= 5x and warm < 1 s: {'MET' if ok else 'MISSED'}); {DATABRICKS}")


def sim(binary, a):
    print(f"== sim: the same with a {a.boot:.0f} s simulated VM boot")
    c, w = compare(binary, max(1, a.runs - 2), "sim", f"{{ kind: sim, boot_seconds: {a.boot} }}")
    print(f"   ratio cold/warm: {c / w:.1f}x; {DATABRICKS}")


if __name__ == "__main__":
    main()
