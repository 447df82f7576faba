"""A batch of 16 specs (entropy and the logit lens, two prompts each, on the default model and three of its
training checkpoints) run by the local executor and by Ray actors on a local cluster, in one process, each
into a fresh store; prints wall times, the speed-up, and the time Ray adds per spec.

    python benchmarks/batch.py [--repeats 3] [--gpu]

Ray's cost per spec is read off a one-actor run: its wall time minus the seconds the actor spent computing
(model loads not included), over the specs; then split into the actor's start-up (to its first result) and the
steady cost per spec after it: planning the payload, moving inputs and results as Parquet, the driver's writes,
scheduling, and the actor's loads of the next model. The two-actor run is the speed-up a 2-core machine gets
(each actor one thread, the local executor two). With --gpu (a GPU machine): one GPU actor on a
GPT-2-small-shaped model against the local executor on the GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from analysis.batch import LocalExecutor, RayExecutor, execute, plan, ray_runtime_env  # noqa: E402
from analysis.models import list_checkpoints  # noqa: E402
from analysis.runner import spec_from_dict  # noqa: E402
from analysis.store import Store  # noqa: E402

PROMPTS = ("Then, John and Mary went to the store. John gave a ring to", "The capital of France is")


def specs(models: list[str]) -> list:
    return [spec_from_dict({"analysis": a, "model": m, "prompt": p, **({"checkpoints": [m]} if a == "entropy"
                                                                           else {})})
            for m in models for p in PROMPTS for a in ("entropy", "lens")]


def one_batch(items_specs, executor, folder: Path, tag: str) -> dict:
    store = Store(folder / f"{tag}.duckdb")
    items = plan(items_specs, store)
    arrived: list[tuple[float, float]] = []  # (when a result was written, the worker's compute seconds)
    if isinstance(executor, RayExecutor):
        executor.on_result = lambda ex, item: arrived.append((time.perf_counter(), item.seconds))
    t0 = time.perf_counter()
    report = execute(items, store, executor)
    wall = time.perf_counter() - t0
    counts = report.counts()
    assert counts["failed"] == 0 and counts["computed"] == len(items), report.table()
    out = {"wall": wall, "compute": sum(i.seconds for i in items), "n": len(items),
           "workers": sorted({i.worker for i in items})}
    if len(arrived) > 1:  # start-up: to the first result; then the time between results beyond their compute
        out["first"] = arrived[0][0] - t0
        out["steady"] = (arrived[-1][0] - arrived[0][0] - sum(c for _, c in arrived[1:])) / (len(arrived) - 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="one GPU actor on a GPT-2-small-shaped model")
    args = ap.parse_args()
    import ray

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}")
    if args.gpu:
        from session_overhead import gpt2_small_random

        tmp_model = tempfile.mkdtemp()
        models = [str(gpt2_small_random(Path(tmp_model) / "gpt2-small"))]
        batch = [spec_from_dict({"analysis": a, "model": models[0], "prompt": f"{p} {i}", "checkpoints": []}
                                if a == "entropy" else {"analysis": a, "model": models[0], "prompt": f"{p} {i}"})
                 for i in range(4) for p in PROMPTS for a in ("entropy", "lens")]
        runs = {"local (GPU)": lambda: LocalExecutor(device="cuda"),
                "ray, 1 GPU actor": lambda: RayExecutor(workers=1, gpus_per_worker=1, device="cuda")}
        ray.init(include_dashboard=False, runtime_env=ray_runtime_env(), log_to_driver=False)
    else:
        ckpts = dict(list_checkpoints())
        models = ["default"] + [str(ckpts[s]) for s in (1000, 2000, 3000)]
        batch = specs(models)
        runs = {"local": lambda: LocalExecutor(device="cpu"),
                "ray, 1 CPU actor": lambda: RayExecutor(workers=1, device="cpu"),
                "ray, 2 CPU actors": lambda: RayExecutor(workers=2, device="cpu")}
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(), log_to_driver=False)
        print(f"local Ray cluster started in {time.perf_counter() - t0:.1f} s (not counted below)")
    print(f"{len(batch)} specs: entropy and lens, {len(PROMPTS)} prompts, on {len(models)} models")
    got: dict[str, list[dict]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drift on the machine touches every executor alike
            for name, make in runs.items():
                got[name].append(one_batch(batch, make(), Path(tmp), f"{name}-{r}".replace(" ", "_").replace(",", "")))
    ray.shutdown()
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall", "compute", "first", "steady") if f in v[0]}
           for k, v in got.items()}
    base = next(iter(med))
    for name, m in med.items():
        line = (f"{name:>18}: wall {m['wall']:6.2f} s (median of {args.repeats}), compute {m['compute']:6.2f} s, "
                f"workers {', '.join(got[name][-1]['workers'])}")
        if name != base:
            line += f"; local / this {med[base]['wall'] / m['wall']:.2f}x"
        print(line)
    one = "ray, 1 GPU actor" if args.gpu else "ray, 1 CPU actor"
    n = len(batch)
    print(f"Ray's cost per spec (one actor: wall minus the actor's compute, over {n} specs): "
          f"{1000 * (med[one]['wall'] - med[one]['compute']) / n:.0f} ms; "
          f"local executor's own cost per spec: {1000 * (med[base]['wall'] - med[base]['compute']) / n:.0f} ms")
    print(f"of which: actor start-up to the first result {med[one]['first']:.2f} s (process, imports, first model "
          f"load); after it, per spec beyond the actor's compute {1000 * med[one]['steady']:.0f} ms (Parquet both "
          f"ways, the driver's write, scheduling, the actor's loads of the next model)")


if __name__ == "__main__":
    main()
