"""Two Ray nodes on this machine (a head and a second node, each its own `ray start` process group): a batch's
specs run on both, the driver (the command line, a process of its own) writes every result to its store, and
the nodes are stopped at the end."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.store import Store

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def two_nodes(tmp_path):
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    assert ray_bin, "the ray command is not installed"
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", *common], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)


def test_a_batch_runs_on_two_nodes_and_the_driver_stores_it(two_nodes, tmp_path):
    address, env = two_nodes
    specs = tmp_path / "specs.json"
    prompts = ["The capital of France is", "Once upon a time", "The cat sat on the", "Then, John and Mary went",
               "In 1990 the", "A B C D E F"]
    specs.write_text(json.dumps([{"analysis": a, "prompt": p} for p in prompts for a in ("lens", "model")]))
    store, summary = tmp_path / "s.duckdb", tmp_path / "out.json"
    out = subprocess.run([sys.executable, "-m", "analysis", "batch", str(specs), "--executor", "ray", "--address",
                          address, "--workers", "2", "--store", str(store), "--summary", str(summary)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(summary.read_text())["counts"]["computed"] == 12
    runs = Store(store).runs()
    assert len(runs) == 12
    nodes = {w.split(" pid ")[0] for w in runs["worker"]}
    assert len(nodes) == 2 and all(n.startswith("node ") for n in nodes), runs["worker"].tolist()
