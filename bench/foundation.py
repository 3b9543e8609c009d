#!/usr/bin/env python3
"""Foundation benchmarks (issue 2), all on the sim provider, in one process tree.

  plan-scale   `motorpool plan` over 10,000 nodes in 1,000 clusters:
               wall time and peak RSS (targets: < 1 s, < 200 MB), and the
               provider list calls it made (target: pages, not resources).
  launch-scale `motorpool apply` of one cluster with 1 worker vs 100 workers at
               a fixed 200 ms sim API latency (target: 100 within 10% of 1).

Usage: python3 bench/foundation.py [--binary PATH] [--runs N] [--only plan-scale|launch-scale]
Builds the release binary first unless --binary is given. Prints figures and ratios.
"""

import argparse
import json
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
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if check and proc.returncode not in (0, 2):
        sys.exit(f"motorpool {' '.join(args)} failed ({proc.returncode}):\n{err.decode()}")
    return elapsed, out.decode(), err.decode()


def peak_rss_mb(binary, args, home, cwd):
    """Run once under a fresh fork to read that child's own peak RSS."""
    env = dict(os.environ, MOTORPOOL_HOME=home)
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execve(binary, [binary] + args, env)
    start = time.perf_counter()
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 2):
        sys.exit(f"motorpool {' '.join(args)} exited {code}")
    return elapsed, usage.ru_maxrss / 1024.0


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["plan-scale", "launch-scale"])
    a = p.parse_args()
    binary = a.binary or build_binary()
    if a.only in (None, "plan-scale"):
        plan_scale(binary, a.runs)
    if a.only in (None, "launch-scale"):
        launch_scale(binary, a.runs)


if __name__ == "__main__":
    main()
