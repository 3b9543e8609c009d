#!/usr/bin/env python3
"""Issue 17: what `motorpool controller` saves, and what it costs at rest.

busy-day  Two sim projects side by side, with a day compressed by
          MOTORPOOL_MINUTE_MS: a pool (min_idle 2, idle_timeout_minutes 30);
          at 08:00 a burst of 8 clusters of 1+3 nodes drawn from it, removed at
          10:00 (their instances go back to the pool), then quiet until
          midnight. One project has a controller running, the other is
          applied only (as CI does on a push). The pools' idle instances are
          sampled all day and integrated: idle node-hours, and the part above
          min_idle (waste), printed side by side with their ratio.
rest      A controller pass over 10,000 sim nodes (1,000 clusters of 1+9, pages
          of 1,000) with nothing to do: its time and list calls (best of N),
          and the provider calls an hour a controller makes at rest with the
          default 30 s interval.

Usage: python3 bench/controller.py [--only busy-day|rest] [--binary PATH]
       [--minute-ms 25] [--runs 3]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_binary  # noqa: E402

DAY_MINUTES = 24 * 60
BURST_AT, BURST_END = 8 * 60, 10 * 60
MIN_IDLE, IDLE_TIMEOUT = 2, 30


class Project:
    """A sim project in a home of its own, run with `binary`."""

    def __init__(self, binary, name, root, minute_ms):
        self.binary, self.name = binary, name
        self.home = os.path.join(root, f"home-{name}")
        self.dir = os.path.join(root, f"spec-{name}")
        os.makedirs(self.dir)
        self.env = dict(os.environ, MOTORPOOL_HOME=self.home, MOTORPOOL_MINUTE_MS=str(minute_ms))
        self.controller = None

    def spec(self, clusters):
        lines = [
            f"project: {self.name}",
            "provider: { kind: sim }",
            "pools:",
            f"  general: {{ node_type: small, min_idle: {MIN_IDLE}, max_capacity: 60, idle_timeout_minutes: {IDLE_TIMEOUT} }}",
        ]
        if clusters:
            lines.append("clusters:")
            lines += [f"  c{i}: {{ pool: general, workers: 3 }}" for i in range(clusters)]
        with open(os.path.join(self.dir, "motorpool.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def mp(self, *args):
        out = subprocess.run([self.binary, *args], cwd=self.dir, env=self.env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"motorpool {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def idle(self):
        nodes = json.loads(self.mp("status", "--output", "json"))["nodes"]
        return sum(1 for n in nodes if n["resource"] == "pool.general" and n["state"] in ("pending", "running"))

    def start_controller(self, interval):
        self.log = open(os.path.join(self.dir, "controller.log"), "w")
        self.controller = subprocess.Popen(
            [self.binary, "controller", "--listen", "off", "--interval", str(interval)],
            cwd=self.dir, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)

    def stop(self):
        if self.controller:
            self.controller.terminate()
            try:
                self.controller.wait(30)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()
            self.controller = None
        self.mp("destroy", "--yes", "--parallelism", "64")


def busy_day(binary, minute_ms):
    minute = minute_ms / 1000.0
    print(f"== busy-day: a day on sim with a minute of {minute_ms} ms: pool min_idle {MIN_IDLE}, "
          f"idle_timeout_minutes {IDLE_TIMEOUT}; 8 clusters of 1+3 drawn from it 08:00-10:00")
    with tempfile.TemporaryDirectory(prefix="mp-bench-ctl-") as root:
        kept = Project(binary, "with-controller", root, minute_ms)
        applied = Project(binary, "apply-only", root, minute_ms)
        projects = [kept, applied]
        try:
            for p in projects:
                p.spec(0)
                p.mp("apply", "--yes")
            # A pass every 10 simulated minutes (the default 30 s is 1/120 of an hour; this is coarser).
            kept.start_controller(interval=max(0.1, 10 * minute))
            start = time.monotonic()
            sim_now = lambda: (time.monotonic() - start) / minute  # noqa: E731
            idle_minutes = {p.name: 0.0 for p in projects}
            waste_minutes = {p.name: 0.0 for p in projects}
            samples = 0
            phase = 0
            last = 0.0
            while True:
                now = sim_now()
                if phase == 0 and now >= BURST_AT:
                    for p in projects:
                        p.spec(8)
                        p.mp("apply", "--yes", "--parallelism", "64")
                    phase = 1
                elif phase == 1 and now >= BURST_END:
                    for p in projects:
                        p.spec(0)
                        p.mp("apply", "--yes", "--parallelism", "64")
                    phase = 2
                counts = {p.name: p.idle() for p in projects}
                now = min(sim_now(), DAY_MINUTES)
                for name, n in counts.items():
                    idle_minutes[name] += n * (now - last)
                    waste_minutes[name] += max(0, n - MIN_IDLE) * (now - last)
                last = now
                samples += 1
                if now >= DAY_MINUTES:
                    break
                time.sleep(min(5 * minute, 0.25))
        finally:
            for p in projects:
                p.stop()
        hours = lambda m: m / 60.0  # noqa: E731
        a, b = kept.name, applied.name
        print(f"  {samples} samples of both pools over the day")
        print(f"  idle node-hours:             controller {hours(idle_minutes[a]):7.1f}   apply-only {hours(idle_minutes[b]):7.1f}"
              f"   ratio {idle_minutes[b] / max(idle_minutes[a], 1e-9):5.1f}x")
        print(f"  above min_idle (waste):      controller {hours(waste_minutes[a]):7.1f}   apply-only {hours(waste_minutes[b]):7.1f}"
              f"   ratio {waste_minutes[b] / max(waste_minutes[a], 1e-9):5.1f}x")


def rest(binary, runs):
    print("== rest: one controller pass over 10,000 sim nodes (1,000 clusters of 1+9, pages of 1,000), nothing to do")
    with tempfile.TemporaryDirectory(prefix="mp-bench-ctl-") as root:
        p = Project(binary, "at-rest", root, 60_000)
        lines = ["project: at-rest", "provider: { kind: sim, page_size: 1000 }", "pools:",
                 "  general: { node_type: small, min_idle: 1, max_capacity: 4 }", "clusters:"]
        lines += [f"  c{i}: {{ node_type: small, workers: 9 }}" for i in range(1000)]
        with open(os.path.join(p.dir, "motorpool.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")
        p.mp("apply", "--yes", "--parallelism", "64")
        try:
            times, pages, calls = [], None, None
            for _ in range(runs):
                out = subprocess.run([binary, "controller", "--once", "--listen", "off"], cwd=p.dir,
                                     env=p.env, capture_output=True, text=True)
                m = re.search(r"pass: (\d+) instances in (\d+) pages \((\d+) list calls?, (\d+) provider calls? in all\), "
                              r"nothing to do in ([0-9.]+)s", out.stderr)
                if out.returncode != 0 or not m:
                    raise SystemExit(f"controller --once failed:\n{out.stderr}")
                times.append(float(m.group(5)))
                pages, calls = int(m.group(2)), int(m.group(4))
            print(f"  pass: best {min(times):.3f}s of {runs} ({', '.join(f'{t:.3f}' for t in times)}), "
                  f"{pages} pages, {calls} provider calls (list calls = pages: {calls == pages})")
            print(f"  at rest with --interval 30: {3600 // 30} passes an hour = {3600 // 30 * calls} provider calls an hour "
                  f"(all list calls; target: one reconcile pass < 1 s)")
        finally:
            p.mp("destroy", "--yes", "--parallelism", "64")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["busy-day", "rest"])
    ap.add_argument("--binary", help="a motorpool binary (default: cargo build --release)")
    ap.add_argument("--minute-ms", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    binary = args.binary or build_binary()
    if args.only in (None, "busy-day"):
        busy_day(binary, args.minute_ms)
    if args.only in (None, "rest"):
        rest(binary, args.runs)


if __name__ == "__main__":
    main()
