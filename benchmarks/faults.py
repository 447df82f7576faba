"""Kill a CLI batch with SIGKILL at random moments and check the store after each kill (issue 15).

    python benchmarks/faults.py [--kills 12] [--seed 0] [--prompts 30]

A batch of lens, model and entropy runs on the default model (3 x prompts specs) is started with
`python -m analysis batch` against one store file and killed with SIGKILL after a random delay, again and again.
After every kill the store must open (from a new process, as the next user would), hold no run without its main
result table and no result table without its run, and a run that claims to be done must read back whole. Every
restart must compute only what is missing: its plan's hits equal the runs stored before it. A last run finishes
the batch. Prints one line per kill and a summary; exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHECK = """
import json, sys
sys.path.insert(0, {repo!r})
from analysis.store import Store
st = Store({path!r}, timeout_s=30)
with st.session():
    runs = set(st.runs()["key"])
    con_rows = st._read(lambda con: con.execute("SELECT key, name FROM results").fetchall())
mains = {{k for k, n in con_rows if n == "main"}}
orphans = sorted({{k for k, _ in con_rows}} - runs)
no_main = sorted(runs - mains)
unreadable = [k for k in runs if st.get(k) is None]
print(json.dumps({{"runs": len(runs), "orphan_results": len(orphans), "runs_without_main": len(no_main),
                   "unreadable": len(unreadable)}}))
"""


def check_store(path: Path) -> dict:
    """The store's integrity, read by a fresh process (as the next user would open it)."""
    out = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO), path=str(path))], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_cmd(specs: Path, store: Path, summary: Path) -> list[str]:
    return [sys.executable, "-m", "analysis", "batch", str(specs), "--store", str(store), "--summary", str(summary)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=30)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    words = ["river", "market", "teacher", "garden", "station", "doctor", "window", "forest", "kitchen", "city"]
    prompts = [f"The {rng.choice(words)} near the {rng.choice(words)} was {i} and" for i in range(args.prompts)]
    specs = [{"analysis": a, "model": "default", "prompt": p} for p in prompts for a in ("lens", "model", "entropy")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(specs)} specs on the default model; "
          f"{args.kills} SIGKILLs at random moments")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_file, store, summary = tmp / "specs.json", tmp / "store.duckdb", tmp / "summary.json"
        spec_file.write_text(json.dumps(specs))
        env = {**os.environ, "TQDM_DISABLE": "1"}
        # how long a whole batch takes here: its start (imports, the model, the plan) and its computing
        t0 = time.perf_counter()
        probe = subprocess.Popen(batch_cmd(spec_file, tmp / "probe.duckdb", tmp / "probe.json"), cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = next((time.perf_counter() - t0 for line in probe.stderr if line.startswith("batch:")), 0.0)
        probe.communicate(timeout=1800)
        work = time.perf_counter() - t0 - start
        print(f"one whole batch: {start:.1f} s to start and plan, then {work:.1f} s computing")
        stored_before, rounds = 0, 1
        for k in range(args.kills):
            if stored_before == len(specs):  # this store is complete: the next kills hit a fresh one
                store = tmp / f"store-{rounds}.duckdb"
                stored_before, rounds = 0, rounds + 1
            summary.unlink(missing_ok=True)
            proc = subprocess.Popen(batch_cmd(spec_file, store, summary), cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            plan_line = next((line for line in proc.stderr if line.startswith("batch:")), "")
            # a moment while it computes what is left (a store write can be under way at any of them)
            delay = rng.uniform(0.1, max(5.0, work * (1 - stored_before / len(specs))))
            time.sleep(delay)
            finished = proc.poll() is not None
            if not finished:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=120)
            state = check_store(store)
            ok = "error" not in state and not state["orphan_results"] and not state["runs_without_main"] \
                and not state["unreadable"]
            hits = None
            if plan_line:  # "batch: N runs (...): H in the store, T to compute"
                hits = int(plan_line.split(":")[2].split(" in the store")[0].strip().split()[-1])
                if hits != stored_before:
                    ok = False
                    failures.append(f"kill {k + 1}: the plan found {hits} stored, the store held {stored_before}")
            if not ok:
                failures.append(f"kill {k + 1}: {state}")
            print(f"kill {k + 1:2d} (store {rounds}) {delay:5.1f} s into computing"
                  f"{' (it had finished)' if finished else ''}: store opens: {'error' not in state}; runs "
                  f"{state.get('runs', '?'):>3}; runs without their result {state.get('runs_without_main', '?')}; "
                  f"results without their run {state.get('orphan_results', '?')}; the restart's plan found "
                  f"{hits} stored of {stored_before}")
            stored_before = state.get("runs", stored_before)
        # the last run completes exactly what is missing
        done = subprocess.run(batch_cmd(spec_file, store, summary), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=1800)
        counts = json.loads(summary.read_text())["counts"] if summary.exists() else {}
        final = check_store(store)
        print(f"final run: exit {done.returncode}, {counts.get('hit')} hits (stored before: {stored_before}), "
              f"{counts.get('computed')} computed; store: {final}")
        if done.returncode != 0 or counts.get("hit") != stored_before or \
                counts.get("hit", 0) + counts.get("computed", 0) != len(specs) or final.get("runs") != len(specs):
            failures.append(f"final run: {counts}, {final}")
    print("FAILED:\n  " + "\n  ".join(failures) if failures else
          f"all {args.kills} kills ({rounds} stores filled in turn): the store opened, no run without its result or "
          "the reverse, and every restart computed only what was missing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
