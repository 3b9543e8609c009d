#!/usr/bin/env python3
"""Foundation benchmarks (issue 2), all on the sim provider, in one process tree.

  plan-scale   `motorpool plan` over 10,000 nodes in 1,000 clusters:
               wall time and peak RSS (targets: < 1 s, < 200 MB), and the
               provider list calls it made (target: pages, not resources).
  launch-scale `motorpool apply` of one cluster with 1 worker vs 100 workers at
               a fixed 200 ms sim API latency (target: 100 within 10% of 1).
  scale        (issue 16) 10,000 / 25,000 / 50,000 / 100,000 nodes in clusters of
               1+9 on sim at zero latency: time and peak RSS of apply from nothing,
               plan with nothing to do, a plan that grows 10% of the clusters and its
               apply, status, destroy; and each step's growth per doubling of the
               nodes (linear = 2.0). Targets at 100,000 nodes: apply < 30 s and
               < 500 MB, plan < 1 s and < 300 MB, destroy < 30 s, growth <= 2.3.

Usage: python3 bench/foundation.py [--binary PATH] [--runs N] [--only plan-scale|launch-scale|scale]
                                   [--sizes 10000,25000,50000,100000] [--repeat N]
Builds the release binary first unless --binary is given. Prints figures and ratios.
--repeat N runs the scale series' read-only steps (plan, plan10, status) N times
and keeps the fastest, with its memory (on a shared machine, one run says as
much about the neighbours as about motorpool); the steps that change state run once.
Every process it starts is waited for, and killed if the benchmark stops early.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import build_binary


# Published anchors, quoted for scale (no Terraform run happens here).
TERRAFORM_ANCHOR = "Terraform: 2,900 resources took 20-25 min to plan (hashicorp/terraform#18981)"
FLINTROCK_ANCHOR = "Flintrock: 2m06s -> 2m42s (+28%) from 1 to 100 workers; spark-ec2: 8m44s -> 1h06m"


def run(binary, args, home, cwd, check=True):
    """Run motorpool; return (seconds, stdout, stderr)."""
    env = dict(os.environ, MOTORPOOL_HOME=home)
    start = time.perf_counter()
    proc = subprocess.Popen([binary] + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    elapsed = time.perf_counter() - start
    if check and proc.returncode not in (0, 2):
        sys.exit(f"motorpool {' '.join(args)} failed ({proc.returncode}):\n{err.decode()}")
    return elapsed, out.decode(), err.decode()


def measured(binary, args, home, cwd, codes=(0, 2)):
    """Run once, output discarded; return (seconds, peak RSS in MB, exit code) of
    that very process (wait4 reads its own rusage). Exits on a code not in `codes`."""
    env = dict(os.environ, MOTORPOOL_HOME=home)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([binary] + args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        elapsed = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code not in codes:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            sys.exit(f"motorpool {' '.join(args)} exited {code}:\n{tail}")
    return elapsed, usage.ru_maxrss / 1024.0, code


def peak_rss_mb(binary, args, home, cwd):
    """Run once; return (seconds, peak RSS in MB) of that process."""
    elapsed, rss, _ = measured(binary, args, home, cwd)
    return elapsed, rss


def sim_spec(project, settings, clusters, workers):
    lines = [f"project: {project}", f"provider: {{ kind: sim{settings} }}", "clusters:"]
    for i in range(clusters):
        lines.append(f"  c{i:04d}: {{ node_type: small, workers: {workers} }}")
    return "\n".join(lines) + "\n"


def plan_scale(binary, runs):
    print("== plan-scale: plan over 10,000 nodes in 1,000 clusters (sim, no API latency)")
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as tmp:
        home, specdir = os.path.join(tmp, "home"), os.path.join(tmp, "spec")
        os.makedirs(specdir)
        with open(os.path.join(specdir, "motorpool.yaml"), "w") as f:
            f.write(sim_spec("bench-plan", ", page_size: 1000", 1000, 9))
        t, _, _ = run(binary, ["apply", "--yes", "--parallelism", "64"], home, specdir)
        print(f"   populate: apply of 1,000 clusters / 10,000 nodes took {t:.1f} s")
        # A plan with nothing to change, and a plan where every cluster changes size.
        times, rss = [], []
        for _ in range(runs):
            t, r = peak_rss_mb(binary, ["plan", "--detailed-exitcode"], home, specdir)
            times.append(t)
            rss.append(r)
        _, out, _ = run(binary, ["plan", "--output", "json"], home, specdir)
        plan = json.loads(out)
        best, worst = min(times), max(times)
        print(f"   plan (no changes): best {best:.3f} s, worst {worst:.3f} s over {runs} runs; peak RSS {max(rss):.0f} MB")
        print(f"   observed {plan['observed_instances']} instances in {plan['observed_pages']} list calls "
              f"(pages of 1000: the target is pages, not resources)")
        with open(os.path.join(specdir, "motorpool.yaml"), "w") as f:
            f.write(sim_spec("bench-plan", ", page_size: 1000", 1000, 10))
        t2, r2 = peak_rss_mb(binary, ["plan", "--detailed-exitcode"], home, specdir)
        print(f"   plan (1,000 clusters to update): {t2:.3f} s, peak RSS {r2:.0f} MB")
        print(f"   target < 1 s and < 200 MB: {'MET' if max(worst, t2) < 1 and max(max(rss), r2) < 200 else 'MISSED'}")
        per_resource_tf = (20 * 60) / 2900.0
        per_resource_mp = best / 10000.0
        print(f"   per resource: motorpool {per_resource_mp * 1e6:.0f} us vs Terraform anchor {per_resource_tf * 1e3:.0f} ms "
              f"(ratio {per_resource_tf / per_resource_mp:,.0f}x); {TERRAFORM_ANCHOR}")


def launch_scale(binary, runs):
    print("== launch-scale: apply one cluster, 1 vs 100 workers, at 200 ms sim API latency")
    results = {1: [], 100: []}
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as tmp:
        for r in range(runs):
            for workers in (1, 100):  # side by side, alternating
                home = os.path.join(tmp, f"home-{workers}-{r}")
                specdir = os.path.join(tmp, f"spec-{workers}-{r}")
                os.makedirs(specdir)
                with open(os.path.join(specdir, "motorpool.yaml"), "w") as f:
                    f.write(sim_spec(f"bench-launch-{workers}", ", latency_ms: 200", 1, workers))
                t, out, _ = run(binary, ["apply", "--yes"], home, specdir)
                results[workers].append(t)
                shutil.rmtree(home, ignore_errors=True)
    one, hundred = min(results[1]), min(results[100])
    print(f"   1 worker: best {one:.3f} s  ({', '.join(f'{x:.3f}' for x in results[1])})")
    print(f"   100 workers: best {hundred:.3f} s  ({', '.join(f'{x:.3f}' for x in results[100])})")
    ratio = hundred / one
    print(f"   ratio 100/1: {ratio:.3f} (target <= 1.10: {'MET' if ratio <= 1.10 else 'MISSED'}); {FLINTROCK_ANCHOR}")


SCALE_SIZES = (10_000, 25_000, 50_000, 100_000)
SCALE_WORKERS = 9  # clusters of 1 driver + 9 workers
SCALE_STEPS = [  # (key, title)
    ("apply", "apply from nothing"),
    ("plan", "plan, nothing to do"),
    ("plan10", "plan, 10% grow"),
    ("apply10", "apply of it"),
    ("status", "status"),
    ("destroy", "destroy"),
]
SCALE_TARGETS = {"apply": (30, 500), "plan": (1, 300), "destroy": (30, None)}
GROWTH_TARGET = 2.3


def scale_spec(project, clusters, grown=0):
    """`clusters` clusters of 1+9 small nodes; the first `grown` have one worker more."""
    width = len(str(clusters - 1))
    lines = [f"project: {project}", "provider: { kind: sim }", "clusters:"]
    for i in range(clusters):
        workers = SCALE_WORKERS + (1 if i < grown else 0)
        lines.append(f"  c{i:0{width}d}: {{ node_type: small, workers: {workers} }}")
    return "\n".join(lines) + "\n"


def fastest(binary, args, home, cwd, repeat, codes=(0, 2)):
    """The fastest of `repeat` runs of a read-only step: (seconds, MB, exit code)."""
    runs = [measured(binary, args, home, cwd, codes=codes) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r[0])


def scale_one(binary, nodes, tmp, repeat=1):
    """Every step at one size: {step: (seconds, MB)}."""
    clusters = nodes // (SCALE_WORKERS + 1)
    home, specdir = os.path.join(tmp, f"home-{nodes}"), os.path.join(tmp, f"spec-{nodes}")
    os.makedirs(specdir)
    spec = os.path.join(specdir, "motorpool.yaml")
    project = f"scale{nodes}"
    with open(spec, "w") as f:
        f.write(scale_spec(project, clusters))
    got = {}
    t, m, _ = measured(binary, ["apply", "--yes"], home, specdir, codes=(0,))
    got["apply"] = (t, m)
    t, m, code = fastest(binary, ["plan", "--detailed-exitcode"], home, specdir, repeat)
    if code != 0:
        sys.exit(f"scale {nodes}: the plan after apply is not empty (exit {code})")
    got["plan"] = (t, m)
    with open(spec, "w") as f:
        f.write(scale_spec(project, clusters, grown=clusters // 10))
    t, m, code = fastest(binary, ["plan", "--detailed-exitcode"], home, specdir, repeat)
    if code != 2:
        sys.exit(f"scale {nodes}: the 10% plan shows no changes (exit {code})")
    got["plan10"] = (t, m)
    t, m, _ = measured(binary, ["apply", "--yes"], home, specdir, codes=(0,))
    got["apply10"] = (t, m)
    t, m, _ = fastest(binary, ["status"], home, specdir, repeat, codes=(0,))
    got["status"] = (t, m)
    t, m, _ = measured(binary, ["destroy", "--yes"], home, specdir, codes=(0,))
    got["destroy"] = (t, m)
    _, out, _ = run(binary, ["status", "--output", "json"], home, specdir)
    left = len(json.loads(out)["nodes"])
    if left:
        sys.exit(f"scale {nodes}: {left} nodes left after destroy")
    shutil.rmtree(home, ignore_errors=True)
    return got


def per_doubling(small, big, ratio):
    """The growth factor of a cost from `small` to `big` nodes, per doubling."""
    if small <= 0 or ratio <= 1:
        return float("nan")
    return (big / small) ** (1 / math.log2(ratio))


def scale(binary, sizes, repeat=1):
    print(f"== scale: clusters of 1+{SCALE_WORKERS} small nodes on sim at zero latency, default parallelism "
          f"(issue 16); each cell: seconds / peak RSS MB"
          + (f"; plan, plan10 and status: fastest of {repeat}" if repeat > 1 else ""))
    results = {}
    with tempfile.TemporaryDirectory(prefix="mp-bench-scale-") as tmp:
        for nodes in sizes:
            results[nodes] = scale_one(binary, nodes, tmp, repeat)
            cells = "  ".join(f"{k} {t:.2f} s / {m:.0f} MB" for k, (t, m) in results[nodes].items())
            print(f"   {nodes:,} nodes: {cells}", flush=True)
    head = f"   {'nodes':>8}" + "".join(f"  {title:>20}" for _, title in SCALE_STEPS)
    print()
    print(head)
    for nodes in sizes:
        row = f"   {nodes:>8,}"
        for key, _ in SCALE_STEPS:
            t, m = results[nodes][key]
            row += f"  {f'{t:.2f} s {m:.0f} MB':>20}"
        print(row)
    worst = 0.0
    for small, big in zip(sizes, sizes[1:]):
        ratio = big / small
        row = f"   {f'x{ratio:g}':>8}"
        for key, _ in SCALE_STEPS:
            g = per_doubling(results[small][key][0], results[big][key][0], ratio)
            gm = per_doubling(results[small][key][1], results[big][key][1], ratio)
            # Steps under 0.2 s are dominated by start-up: their growth says little.
            if results[small][key][0] >= 0.2:
                worst = max(worst, g)
            row += f"  {f'{g:.2f}x time {gm:.2f}x mem':>20}"
        print(row + f"   (growth per doubling, {small:,} -> {big:,} nodes; linear = 2.00x)")
    if len(sizes) > 2:
        # End to end: less sensitive to one noisy step on a shared machine.
        first, last = sizes[0], sizes[-1]
        row = f"   {f'x{last / first:g}':>8}"
        for key, _ in SCALE_STEPS:
            g = per_doubling(results[first][key][0], results[last][key][0], last / first)
            gm = per_doubling(results[first][key][1], results[last][key][1], last / first)
            row += f"  {f'{g:.2f}x time {gm:.2f}x mem':>20}"
        print(row + f"   (growth per doubling, {first:,} -> {last:,} nodes, end to end)")
    largest = sizes[-1]
    verdicts = []
    for key, (secs, mb) in SCALE_TARGETS.items():
        t, m = results[largest][key]
        ok = t < secs and (mb is None or m < mb)
        want = f"< {secs} s" + (f" and < {mb} MB" if mb else "")
        verdicts.append(f"{key} {t:.2f} s {m:.0f} MB ({want}: {'MET' if ok else 'MISSED'})")
    print(f"   at {largest:,} nodes: " + "; ".join(verdicts))
    if len(sizes) > 1:
        print(f"   worst time growth per doubling (steps over 0.2 s): {worst:.2f}x "
              f"(target <= {GROWTH_TARGET}: {'MET' if worst <= GROWTH_TARGET else 'MISSED'})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["plan-scale", "launch-scale", "scale"])
    p.add_argument("--sizes", default=",".join(str(n) for n in SCALE_SIZES),
                   help="node counts of the scale series, comma-separated (multiples of 10)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each read-only step of the scale series; the fastest is kept")
    a = p.parse_args()
    sizes = sorted(int(n) for n in a.sizes.split(","))
    binary = a.binary or build_binary()
    if a.only in (None, "plan-scale"):
        plan_scale(binary, a.runs)
    if a.only in (None, "launch-scale"):
        launch_scale(binary, a.runs)
    if a.only in (None, "scale"):
        scale(binary, sizes, a.repeat)


if __name__ == "__main__":
    main()
