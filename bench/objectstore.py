#!/usr/bin/env python3
"""Object storage benchmark (issue 15): the same word count with its input
already on object storage vs uploaded from the CLI, on the local provider.

  s3        input `s3://bench/data/*.txt` in moto's S3 (on loopback), output
            `s3://bench/out/wc/`: the executors list, read (ranged GETs) and
            write the objects; the CLI ships only the job's code.
  upload    input `data/*.txt` on this machine, output `out/wc`, with
            MOTORPOOL_UPLOAD_INPUTS=1: the CLI uploads the input to the driver
            and downloads the output (what a remote cluster needs without
            object storage).
  in place  the same local job without the knob: on the local provider the
            driver and executors read the files where they lie (shown for
            reference: only possible when they share this machine).

Each job runs on one cluster of the local provider (a driver and 2 workers),
started first with `motorpool apply` (not timed). Wall time is `motorpool
run`'s, from start to exit. "CLI sent" is `wchar` from /proc/<pid>/io of the
`motorpool run` process: every byte it wrote through write-like system calls
(its gRPC sockets, its stdout/stderr pipes, its run record), read every 20 ms
while it runs; the last reading is taken when the process has exited but not
yet been reaped (a zombie keeps its I/O counters). The answers of the three
runs are checked equal.

moto comes from $MOTORPOOL_MOTO_SERVER, else from <target dir>/moto-venv
(made by scripts/test or the AWS tests).

Usage: python3 bench/objectstore.py [--size-mb N] [--binary PATH] [--moto PATH]
Builds the release binary unless --binary is given. Prints figures and ratios.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import build_binary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["pool", "cluster", "job", "driver", "worker", "shuffle", "map", "reduce",
         "bucket", "object", "range", "split", "motorpool", "azurite", "moto", "line"]

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


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_moto(arg):
    if arg:
        return arg
    if os.environ.get("MOTORPOOL_MOTO_SERVER"):
        return os.environ["MOTORPOOL_MOTO_SERVER"]
    for target in [os.environ.get("CARGO_TARGET_DIR"), "/var/tmp/motorpool-target", os.path.join(ROOT, "target")]:
        if target and os.path.isfile(os.path.join(target, "moto-venv", "bin", "moto_server")):
            return os.path.join(target, "moto-venv", "bin", "moto_server")
    sys.exit("no moto_server: run scripts/test once (it makes <target>/moto-venv), or pass --moto")


def start_moto(program, log_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([program, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/moto-api/")
            c.getresponse().read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"moto did not start; see {log_path}")


def s3(port, method, path, body=b""):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    # moto checks no signature but applies object ACLs to the access key it reads here.
    auth = ("AWS4-HMAC-SHA256 Credential=AKIAMOTORPOOLBENCH00/20260101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=0")
    c.request(method, path, body=body, headers={"Content-Length": str(len(body)), "Authorization": auth})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"{method} {path}: {r.status} {data[:300]!r}")
    return data


def write_corpus(data_dir, size_mb, files=4):
    """Deterministic text, `files` files of about size_mb/files MiB each."""
    os.makedirs(data_dir)
    x = 20250101
    per_file = size_mb * (1 << 20) // files
    for f in range(files):
        lines, size = [], 0
        while size < per_file:
            x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
            n = 1 + (x >> 60)
            line = " ".join(VOCAB[(x >> (k * 4)) & 15] for k in range(n)) + "\n"
            lines.append(line)
            size += len(line)
        with open(os.path.join(data_dir, f"part{f}.txt"), "w") as out:
            out.writelines(lines)


def parse_counts(text, counts):
    for line in text.splitlines():
        w, c = line.split("\t")
        counts[w] = counts.get(w, 0) + int(c)


def run_cli(binary, args, cwd, env):
    """Runs `motorpool ARGS`; returns (seconds, wchar bytes, stdout)."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    start = time.monotonic()
    proc = subprocess.Popen([binary] + args, cwd=cwd, env=env, stdout=out, stderr=err)
    wchar = 0
    io_path = f"/proc/{proc.pid}/io"
    while True:
        try:
            with open(io_path) as f:
                for line in f:
                    if line.startswith("wchar:"):
                        wchar = max(wchar, int(line.split()[1]))
            with open(f"/proc/{proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        if state in ("Z", "X", "gone"):
            break
        time.sleep(0.02)
    code = proc.wait()
    seconds = time.monotonic() - start
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        sys.exit(f"motorpool {' '.join(args)} exited {code}:\n{stdout}\n{stderr}")
    return seconds, wchar, stdout


def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="input size (default 256)")
    ap.add_argument("--partition-mb", type=int, default=16)
    ap.add_argument("--binary", help="a motorpool binary (default: build the release one)")
    ap.add_argument("--moto", help="a moto_server program")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    binary = os.path.abspath(args.binary) if args.binary else build_binary()
    moto_program = find_moto(args.moto)
    work = tempfile.mkdtemp(prefix="mp-objectstore-bench-")
    home = os.path.join(work, "home")
    spec_dir = os.path.join(work, "project")
    os.makedirs(spec_dir)
    moto, port = start_moto(moto_program, os.path.join(work, "moto.log"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTORPOOL_"))}
    env.update({
        "MOTORPOOL_HOME": home,
        "AWS_ACCESS_KEY_ID": "AKIAMOTORPOOLBENCH00",
        "AWS_SECRET_ACCESS_KEY": "motorpool-bench-secret-not-a-real-key",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
    })
    try:
        log(f"==> {args.size_mb} MiB of text, into {spec_dir}/data and s3://bench/data (moto :{port})")
        write_corpus(os.path.join(spec_dir, "data"), args.size_mb)
        s3(port, "PUT", "/bench")
        for name in sorted(os.listdir(os.path.join(spec_dir, "data"))):
            with open(os.path.join(spec_dir, "data", name), "rb") as f:
                s3(port, "PUT", f"/bench/data/{name}", f.read())
        with open(os.path.join(spec_dir, "wc.py"), "w") as f:
            f.write(WC_PY)
        job = """
    cluster: bench
    tasks:
      count:
        map: {{ input: "{input}", partition_mb: {pmb}, python: {{ file: wc.py, function: count, per: partition }} }}
        reduce: {{ partitions: 2, python: {{ file: wc.py, function: add }} }}
        output: "{output}"
"""
        with open(os.path.join(spec_dir, "motorpool.yaml"), "w") as f:
            f.write("project: objbench\nprovider: { kind: local }\n"
                    "clusters:\n  bench: { node_type: small, workers: 2 }\njobs:\n"
                    + "  wc-s3:" + job.format(input="s3://bench/data/*.txt", output="s3://bench/out/wc/",
                                               pmb=args.partition_mb)
                    + "  wc-local:" + job.format(input="data/*.txt", output="out/wc", pmb=args.partition_mb))
        log("==> motorpool apply (the cluster; not timed)")
        subprocess.run([binary, "apply", "--yes"], cwd=spec_dir, env=env, check=True,
                       stdout=subprocess.DEVNULL)

        results = {}
        answers = {}
        for name, job_name, extra in [("s3", "wc-s3", {}),
                                      ("upload", "wc-local", {"MOTORPOOL_UPLOAD_INPUTS": "1"}),
                                      ("in place", "wc-local", {})]:
            log(f"==> motorpool run {job_name} ({name})")
            seconds, wchar, stdout = run_cli(binary, ["run", job_name, "--output", "json"], spec_dir,
                                             dict(env, **extra))
            summary = json.loads(stdout)["summary"]
            task = next(t for t in summary["tasks"] if t["name"] == "count")
            counts = {}
            if name == "s3":
                listing = s3(port, "GET", "/bench?list-type=2&prefix=out/wc/").decode()
                keys = [k.split("</Key>")[0] for k in listing.split("<Key>")[1:]]
                for key in keys:
                    parse_counts(s3(port, "GET", f"/bench/{key}").decode(), counts)
            else:
                out_dir = os.path.join(spec_dir, "out", "wc")
                for p in sorted(os.listdir(out_dir)):
                    if p.startswith("part-"):
                        with open(os.path.join(out_dir, p)) as f:
                            parse_counts(f.read(), counts)
                shutil.rmtree(out_dir)
            answers[name] = counts
            results[name] = (seconds, wchar, task["input_bytes"], task["map_partitions"])
        ref = answers["s3"]
        for name, counts in answers.items():
            if counts != ref:
                sys.exit(f"the {name} answer differs from the s3 one")
        log(f"answers equal: {len(ref)} distinct words, {sum(ref.values())} in all")

        input_bytes = sum(os.path.getsize(os.path.join(spec_dir, "data", n))
                          for n in os.listdir(os.path.join(spec_dir, "data")))
        print(f"\nword count, {human(input_bytes)} of input, local provider (driver + 2 workers), "
              f"partition_mb {args.partition_mb}")
        print(f"{'input':<10} {'wall':>9} {'CLI sent (wchar)':>18} {'read by the job':>16} {'map parts':>10}")
        for name, (seconds, wchar, read, parts) in results.items():
            print(f"{name:<10} {seconds:>8.2f}s {human(wchar):>18} {human(read):>16} {parts:>10}")
        s3_s, s3_w = results["s3"][0], results["s3"][1]
        up_s, up_w = results["upload"][0], results["upload"][1]
        print(f"\nupload / s3: wall x{up_s / s3_s:.2f}, CLI bytes x{up_w / max(s3_w, 1):.1f} "
              f"({human(up_w)} vs {human(s3_w)})")
    finally:
        subprocess.run([binary, "destroy", "--yes"], cwd=spec_dir, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            os.killpg(moto.pid, signal.SIGKILL)
        except OSError:
            pass
        moto.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
