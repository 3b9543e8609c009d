"""Shared by the benchmark scripts: building the release binary once."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_binary():
    """`cargo build --release` of motorpool, reusing the CI target dir when there is one; returns the binary's path."""
    target = os.environ.get("CARGO_TARGET_DIR")
    if not target and os.path.isdir("/var/tmp/motorpool-target"):
        target = "/var/tmp/motorpool-target"
    env = dict(os.environ)
    if target:
        env["CARGO_TARGET_DIR"] = target
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "motorpool"], cwd=ROOT, env=env, check=True)
    return os.path.join(target or os.path.join(ROOT, "target"), "release", "motorpool")
