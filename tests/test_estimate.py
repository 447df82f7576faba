"""Memory and time before a run: each analysis's estimate against the peak measured in a fresh process (default
model here; SmolLM2 in test_real_model.py), the runner refusing a run that cannot fit, and defaults that scale
with the model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from analysis import WorkbenchError
from analysis import estimate as estimate_mod
from analysis.estimate import Shape, check_fits, estimate_run, smaller_defaults
from analysis.models import CHECKPOINTS_DIR, load_model
from analysis.registry import ANALYSES, get_analysis
from analysis.result import Result, RunRecord
from analysis.runner import resolve_tokens, run, with_smaller_defaults
from analysis.store import Store

PROBE = Path(__file__).with_name("estimate_probe.py")
# glibc hands every block of 64 KiB or more back to the system when it is freed, so the resident high-water mark
# counts what a run holds at once, not whatever freed heap earlier work left behind for it to reuse
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
TOLERANCE = 1.5
# Every estimate adds the runner's RUNNER_BYTES (tables, the store's write, the interpreter) on top of the run's
# own parts, while a small run's peak is the larger of the two, not their sum (the store's write comes after the
# compute's temporaries are freed). An over-estimate by at most that much is the estimate's model, not its error:
# the default model's lens is estimated at 20.1 MiB and peaks at 13.3 to 14.8 MiB (four runs), a ratio that
# crosses 1.5 when the allocator's arenas happen to stay small.
SLACK = estimate_mod.RUNNER_BYTES
SMOL = {"n_params": 134_515_008, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_model": 576, "d_head": 64,
        "d_mlp": 1536, "d_vocab": 49152, "n_ctx": 8192, "dtype": "float32", "device": "cpu", "mlp": "gated SiLU",
        "block": "sequential"}  # SmolLM2-135M's dimensions


SHARED_INPUT = "sae"  # the input worth training once: the analyses built on an SAE start from a copy of its store


def built_on_shared(name: str) -> bool:
    """An analysis that takes the shared input (an SAE) as one of its inputs."""
    return any(getattr(need, "name", "") == SHARED_INPUT for need in get_analysis(name).inputs)


class ProbeServer:
    """tests/estimate_probe.py --serve: a process that has imported everything and loaded the model, forking a
    fresh child per job (one torch thread each)."""

    def __init__(self, model: str, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(PROBE), model, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"})

    def ask(self, part: dict, store: Path) -> list[dict]:
        self.proc.stdin.write(json.dumps({"part": part, "store": str(store)}) + "\n")
        self.proc.stdin.flush()
        rows = []
        for line in self.proc.stdout:
            if line.startswith("END "):
                assert line.split()[1] == "0", f"{list(part)}: " + self.log.read_text()[-3000:]
                return rows
            if line.startswith("{"):
                rows.append(json.loads(line))
        raise AssertionError(f"the probe server ended: {self.log.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def probe(model: str, specs: dict, store: Path) -> list[dict]:
    """Estimate and measured peak of each spec, from a fresh process (tests/estimate_probe.py): a
    process (and store) per analysis, two at a time, so no run's peak depends on what ran before it in the
    process (the heap earlier runs left behind moves a small model's peaks by tens of MiB): each is forked from a
    server that has imported everything and loaded the model, and run nothing. The analyses built on the SAE
    start from a copy of the SAE run's store (the same SAE when their fields derive the same one), so the SAE is
    trained once rather than once per analysis; what is measured is still each analysis's own run."""
    names = list(specs)
    built_on = {n for n in names if built_on_shared(n)}
    first = names.index(SHARED_INPUT) if SHARED_INPUT in names else None
    servers, local, lock = [], threading.local(), threading.Lock()

    def one(i: int) -> list[dict]:
        path = Path(f"{store}.{i}")
        if names[i] in built_on and shared is not None:
            shared.result()  # the SAE run has finished: start from its store
            shutil.copyfile(Path(f"{store}.{first}"), path)
        if not hasattr(local, "server"):
            with lock:
                local.server = ProbeServer(model, Path(f"{store}.server{len(servers)}.log"))
                servers.append(local.server)
        began = time.perf_counter()
        rows = local.server.ask({names[i]: specs[names[i]]}, path)
        return [{**r, "job_seconds": time.perf_counter() - began} for r in rows]  # warm-up, inputs and run

    try:
        with ThreadPoolExecutor(2) as pool:
            shared = pool.submit(one, first) if first is not None else None  # the SAE first, its users last
            futures = {i: pool.submit(one, i) for i in sorted(range(len(names)), key=lambda i: names[i] in built_on)
                       if i != first}
            futures.update({first: shared} if shared is not None else {})
            return [row for i in range(len(names)) for row in futures[i].result()]
    finally:
        for server in servers:
            server.close()


def check_within(rows: list[dict], names) -> None:
    assert [r["analysis"] for r in rows] == list(names)
    report = "\n".join(f"{r['analysis']:20s} estimate {r['estimate'] / 2**20:8.1f} MiB  measured "
                       f"{r['measured'] / 2**20:8.1f} MiB  ({r['working_estimate'] / 2**20:.1f} / "
                       f"{r['measured_working'] / 2**20:.1f} MiB besides the weights; {r.get('job_seconds', 0):.0f} s in all)"
                       for r in rows)
    print(report)
    for r in rows:
        assert not r["hit"]
        ratio = r["estimate"] / r["measured"]
        close = 0 <= r["estimate"] - r["measured"] <= SLACK
        assert 1 / TOLERANCE <= ratio <= TOLERANCE or close, (f"{r['analysis']}: estimate / measured = "
                                                              f"{ratio:.2f}\n{report}")


# What only adds time, dropped from the defaults (the suite's longest test): the quantization sweep's defaults take
# over a minute here (these keep what sets its peak, the evaluation text's size and the Hessian traces, and drop
# more units and formats and Hutchinson samples); the SAE's steps (a step's tensors set its peak, not how many;
# the analyses built on it use the same SAE); the information plane's checkpoints (each is loaded, run and dropped
# in turn: two of the seven show the same peak)
SAE_STEPS = {"steps": 300}
LIGHTER = {"quant_traces": {"max_samples": 8},
           "quant_sensitivity": {"formats": ("int8-channel", "int4-g128"), "units": ("type",),
                                 "activation_formats": (), "max_samples": 8},
           "quant_allocation": {"max_samples": 8},
           "infoplane": {"checkpoints": (str(CHECKPOINTS_DIR / "step-00100"), "default")},
           **{a.name: SAE_STEPS for a in ANALYSES if "steps" in a.spec.field_names() and (
               a.name == SHARED_INPUT or built_on_shared(a.name))}}


def test_estimates_match_measured_peaks_on_the_default_model(tmp_path):
    """Every analysis's default run on the default model (less of what only adds time, see LIGHTER): the
    estimate within 1.5x of the measured peak (the weights, and the process's resident high-water mark above what
    was resident when the run began)."""
    names = [a.name for a in ANALYSES]
    specs = {n: LIGHTER.get(n, {}) for n in names}
    check_within(probe("default", specs, tmp_path / "s.duckdb"), names)


def test_a_run_that_does_not_fit_is_refused_naming_the_setting(tmp_path, monkeypatch):
    store = Store(tmp_path / "s.duckdb")
    monkeypatch.setattr(estimate_mod, "available_memory", lambda device: 8 * 2**20)  # a nearly full machine
    spec = get_analysis("patching").spec(n_pairs=8)
    with pytest.raises(WorkbenchError, match="besides the model's weights.*Lower n_pairs or components"):
        run(spec, store=store)
    assert store.count() == 0  # nothing was computed or stored
    with pytest.raises(WorkbenchError, match="Lower max_sentences"):
        run(get_analysis("probes").spec(), store=store)
    assert store.count() == 0  # not even its input, the concept activations


def test_estimates_grow_with_what_the_spec_asks_for():
    handle = load_model("default")
    a = get_analysis("patching")

    def est(**fields):
        return estimate_run(a, resolve_tokens(a.spec(**fields), handle), handle)

    small, big = est(n_pairs=2), est(n_pairs=32)
    assert big.total_bytes > small.total_bytes and big.flops > 10 * small.flops
    assert est(components=("z_all_pos",)).flops < est(components=("resid_pre", "z_all_pos")).flops
    lens = get_analysis("lens")
    short = estimate_run(lens, resolve_tokens(lens.spec(prompt="a b"), handle), handle)
    long = estimate_run(lens, resolve_tokens(lens.spec(prompt="a b " * 50), handle), handle)
    assert long.total_bytes > short.total_bytes and long.seconds >= short.seconds
    assert "peak" in long.describe() and "weights" in long.describe()


def test_check_fits_uses_free_memory():
    handle = load_model("default")
    a = get_analysis("model")
    est = estimate_run(a, resolve_tokens(a.spec(prompt="hello there"), handle), handle)
    check_fits(est, free=2**40)
    with pytest.raises(WorkbenchError, match="Lower the prompt's length"):
        check_fits(est, free=est.working_bytes // 2)


QUANT = ("quant_sensitivity",)


def test_the_default_model_keeps_its_defaults():
    """Defaults scale only where they would take over a minute: nothing changes for the default model (its run
    keys stay those of every store written before) but the quantization sweep (every unit in four formats on top
    of the Hessian traces: about 100 s at the reference pace), which starts from its ladder's first rung. Its
    Hessian traces alone (measured 27 s at their defaults here) and the bit allocation keep theirs."""
    summary = load_model("default").summary
    for a in ANALYSES:
        chosen, full, took = smaller_defaults(a, summary, {})
        if a.name in QUANT:
            first = estimate_mod.ladder(a, Shape.of(summary))[0]
            assert chosen == first and took <= estimate_mod.BUDGET_S < full, (a.name, full, took)
        else:
            assert chosen == {} and full <= estimate_mod.BUDGET_S, (a.name, full)


def test_a_large_model_gets_smaller_defaults_and_given_fields_stay():
    """A 135 M Llama-shaped model (SmolLM2's dimensions): the expensive analyses step down their ladder until
    their reference time is within budget; fields the user gave are never changed."""
    summary = SMOL
    Shape.of(summary)
    for name in ("patching", "concept_activations", "quant_sensitivity", "tuned_lens", "tcav"):
        a = get_analysis(name)
        chosen, full, took = smaller_defaults(a, summary, {})
        last = chosen == estimate_mod.ladder(a, Shape.of(summary))[-1]  # kept even when over the budget
        assert chosen and full > estimate_mod.BUDGET_S and (took <= estimate_mod.BUDGET_S or last), (name, full, took)
    spec = get_analysis("patching").spec(model="default", n_pairs=8)
    scaled, changed = with_smaller_defaults(spec, summary, given={"n_pairs"})
    assert scaled.n_pairs == 8 and "n_pairs" not in changed and "components" in changed
    tcav, _ = with_smaller_defaults(get_analysis("tcav").spec(model="default"), summary)
    assert 2 < len(tcav.layers) < 31 and min(tcav.layers) == -1 and max(tcav.layers) == 29


def test_inputs_count_until_stored_at_their_own_pace(tmp_path, monkeypatch):
    """An allocation's estimate carries its Hessian traces run (named, timed at that analysis's learnt pace)
    until the store holds it; then only its own work is shown."""
    from analysis.analyses.quant.compute import HessianTracesSpec, QuantAllocationSpec
    from analysis.runner import estimate_unstored

    handle = load_model("default")
    store = Store(tmp_path / "s.duckdb")
    spec = QuantAllocationSpec(n_seqs=2, seq_len=16, max_samples=4)
    analysis = get_analysis("quant_allocation")
    before = estimate_unstored(analysis, spec, handle, store)
    assert [u.analysis for u in before.upstream] == ["quant_traces"]
    u0 = before.upstream[0]
    monkeypatch.setattr(estimate_mod, "MIN_RUN_SECONDS", 0.0)
    # the traces ran 4x slower than predicted here (a run of the same size)
    _finished(store, "quant_traces", handle, [(u0.base_seconds, 4 * u0.base_seconds)])
    slow = estimate_unstored(analysis, spec, handle, store)
    u1 = slow.upstream[0]
    assert u1.seconds == pytest.approx(4 * u0.seconds, rel=1e-6) and "1 finished run of quant_traces" in u1.basis
    assert slow.seconds == pytest.approx(before.seconds)  # its own pace is its own
    run(HessianTracesSpec(n_seqs=2, seq_len=16, max_samples=4), store=store)
    after = estimate_unstored(analysis, spec, handle, store)
    assert after.upstream == [] and "builds on" not in after.describe()


# ----------------------------------------------------------------------------------------------------------
# Time: this machine's pace kept in the store, corrected by finished runs (issue 26, item 5)
# ----------------------------------------------------------------------------------------------------------
def _finished(store: Store, analysis: str, handle, runs: list[tuple[float, float]], device: str = "cpu") -> None:
    """File finished runs of `analysis` on this machine: (predicted, measured) seconds each."""
    for i, (predicted, measured) in enumerate(runs):
        est = estimate_mod.Estimate(parts={}, flops=1.0, lower="", analysis=analysis, device=device)
        est.base_seconds = predicted
        timing = estimate_mod.timing_meta(est, measured, handle.fingerprint, "float32", handle.summary.d_model, True)
        store.put(RunRecord(key=f"{analysis}-{i}-{predicted}", analysis=analysis, spec={}, model="m",
                            fingerprint=handle.fingerprint, version="1"),
                  Result(table=pd.DataFrame({"x": [1]}), meta={"estimate": {"timing": timing}}))


def test_store_migrates_to_keep_the_machines_pace(tmp_path):
    """A store written at schema 4 (before time estimates were learnt) opens at 5: its runs kept, the pace tables
    there and empty."""
    import duckdb

    from analysis.result import to_parquet
    from analysis.store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "v4.duckdb"
    with duckdb.connect(str(path)) as con:
        for step in MIGRATIONS[:4]:
            for sql in step:
                con.execute(sql)
        con.execute("INSERT INTO meta VALUES ('schema_version', '4')")
        con.execute("INSERT INTO runs (key, analysis, spec, model, fingerprint, version, created, duration_s, status, "
                    "metadata) VALUES ('old', 'lens', '{}', 'm', 'f', '1', now(), 0.5, 'done', '{}')")
        con.execute("INSERT INTO results VALUES ('old', 'main', 1, ?)", [to_parquet(pd.DataFrame({"x": [7]}))])
    store = Store(path)
    assert SCHEMA_VERSION == 5 and store.schema_version() == 5
    assert store.get("old").table["x"].tolist() == [7]
    assert store.speed_probes("here", "float32", 128) == [] and store.run_timings("here") == []
    store.record_speed_probe("here", "float32", 128, 5e10, 2e-6, 1e10)
    assert store.speed_probes("here", "float32", 128) == [(5e10, 2e-6, 1e10)]


def test_a_fresh_store_learns_the_pace_from_finished_runs_and_says_so(tmp_path, monkeypatch):
    """Before any run, the estimate is the work at the probed pace and says so; each finished run files its
    predicted and measured seconds in the store, and the next estimate is the prediction times their median
    ratio (read back from the store here), saying how many runs it learnt from."""
    monkeypatch.setattr(estimate_mod, "MIN_RUN_SECONDS", 0.0)  # the default model's lens runs take milliseconds
    handle = load_model("default")
    store = Store(tmp_path / "s.duckdb")
    lens = get_analysis("lens")
    spec = lens.spec(prompt="The capital of France is")
    first = estimate_run(lens, resolve_tokens(spec, handle), handle, store=store)
    assert first.correction == 1.0 and first.seconds == first.base_seconds > 0
    assert "matrix-multiply probe" in first.basis and first.basis in first.describe()
    for prompt in ("The cat sat on the", "When Mary and John went to the store,"):
        run(lens.spec(prompt=prompt), store=store)
    rows = store.run_timings(estimate_mod.machine_id("cpu"))
    assert [r["analysis"] for r in rows] == ["lens", "lens"] and all(r["measured_s"] > 0 for r in rows)
    stored = [r for r in store.runs()["key"]]
    assert len(stored) == 2  # the timings went in with the runs, nothing else was stored
    again = estimate_run(lens, resolve_tokens(spec, handle), handle, store=store)
    ratios = sorted(r["measured_s"] / r["predicted_s"] for r in rows)
    assert again.correction == pytest.approx(sum(ratios) / 2)  # the median of two
    assert again.seconds == pytest.approx(again.base_seconds * again.correction)
    assert again.basis == "from 2 finished runs of lens with this model on this machine"
    assert "from 2 finished runs of lens" in again.describe()


def test_a_fresh_process_reads_the_machines_pace_from_the_store(tmp_path, monkeypatch):
    """With enough probes of this machine in the store, a new process probes nothing and uses their median (one
    noisy probe does not set the pace)."""
    handle = load_model("default")
    store = Store(tmp_path / "s.duckdb")
    m, w = estimate_mod.machine_id("cpu"), estimate_mod.probe_width("cpu", handle.summary.d_model)
    rates = [4e10, 5e10, 6e10, 5.5e10, 1e9]  # the last one taken while the machine was busy
    for r in rates:
        store.record_speed_probe(m, "float32", w, r, 2e-6, 1e10)
    monkeypatch.setattr(estimate_mod, "_PROBED", {})

    def no_probe(*a, **k):
        raise AssertionError("probed although the store knows the pace")

    monkeypatch.setattr(estimate_mod, "probe", no_probe)
    pace = estimate_mod.machine_pace("cpu", "float32", handle.summary.d_model, store)
    assert pace.speed.flops_per_s == pytest.approx(estimate_mod.FORWARD_EFFICIENCY * 5e10)
    assert pace.n_probes == 5


def test_the_correction_comes_from_runs_of_a_like_size():
    """A run a hundred times smaller than the one estimated is mostly fixed costs: it does not correct it; runs
    of a like size do (their median), those of this model first when it has one; with none, the other analyses'
    runs on the machine (from two analyses on)."""
    runs = [{"analysis": "lens", "model": "a", "predicted_s": 0.6, "measured_s": 30.0},  # tiny run, slow for it
            {"analysis": "lens", "model": "b", "predicted_s": 60.0, "measured_s": 30.0},
            {"analysis": "lens", "model": "b", "predicted_s": 50.0, "measured_s": 100.0},
            {"analysis": "lens", "model": "b", "predicted_s": 40.0, "measured_s": 60.0},
            {"analysis": "patching", "model": "a", "predicted_s": 60.0, "measured_s": 600.0}]
    pace = estimate_mod.Pace("m", estimate_mod.REFERENCE, 1, runs)
    ratio, basis, whole = pace.correction("lens", "b", 50.0)
    assert ratio == pytest.approx(1.5) and basis == "from 3 finished runs of lens with this model on this machine"
    ratio, basis, whole = pace.correction("lens", "a", 50.0)  # a's only lens run is unlike this one: b's count
    assert ratio == pytest.approx(1.5) and basis == "from 3 finished runs of lens on this machine"
    ratio, basis, whole = pace.correction("lens", "a", 0.5)
    assert ratio == pytest.approx(50.0) and basis == "from 1 finished run of lens with this model on this machine"
    runs.append({"analysis": "lens", "model": "c", "predicted_s": 45.0, "measured_s": 20.0})
    ratio, basis, whole = pace.correction("lens", "c", 50.0)  # one run of this model outweighs the others' three
    assert ratio == pytest.approx(20 / 45) and basis == "from 1 finished run of lens with this model on this machine"
    # no run of this analysis: the median over the other analyses' medians (lens 1.5 of its five, patching 10)
    ratio, basis, whole = pace.correction("model", "a", 1.0)
    assert ratio == pytest.approx((1.5 + 10) / 2)
    assert basis == "from 6 finished runs of 2 other analyses on this machine (no model run like this one here yet)"
    # one other analysis is not yet the machine's pace: the probe alone
    one = estimate_mod.Pace("m", estimate_mod.REFERENCE, 1, [r for r in runs if r["analysis"] == "lens"])
    ratio, basis, whole = one.correction("model", "a", 1.0)
    assert ratio == 1.0 and "matrix-multiply probe" in basis
    assert whole


def test_the_machine_wide_correction_is_of_the_machines_pace_only(monkeypatch):
    """The other analyses' runs tell the machine's pace by their work at that pace: a run mostly of fixed
    seconds (scikit-learn fits counted on the reference machine) is left out, the others count measured less
    fixed against predicted less fixed; and the estimate it corrects keeps its own fixed seconds as they are
    (SAE names' heads on the default model were halved with the matrix products' correction)."""
    runs = [{"analysis": "lens", "model": "a", "predicted_s": 10.0, "measured_s": 6.0, "extra_s": 2.0},  # (6-2)/8
            {"analysis": "patching", "model": "a", "predicted_s": 20.0, "measured_s": 10.0, "extra_s": 0.0},
            {"analysis": "probes", "model": "a", "predicted_s": 10.0, "measured_s": 30.0, "extra_s": 9.0}]
    pace = estimate_mod.Pace("m", estimate_mod.REFERENCE, 1, runs)
    ratio, basis, whole = pace.correction("sae_names", "a", 10.0)
    assert ratio == pytest.approx(0.5) and not whole  # probes (mostly fixed seconds) left out
    assert basis.startswith("from 2 finished runs of 2 other analyses")
    ratio, basis, whole = pace.correction("lens", "a", 10.0)  # its own runs: the whole estimate, fixed included
    assert ratio == pytest.approx(0.6) and whole
    monkeypatch.setattr(estimate_mod, "machine_pace", lambda *a, **k: pace)
    est = estimate_mod.Estimate(parts={}, flops=estimate_mod.REFERENCE.flops_per_s * 4.0, lower="",
                                analysis="sae_names", extra_seconds=6.0)
    estimate_mod.timed(est, "float32", 64)
    assert est.base_seconds == pytest.approx(10.0 + estimate_mod.RUN_S)
    assert est.seconds == pytest.approx((4.0 + estimate_mod.RUN_S) * 0.5 + 6.0)
    lens = estimate_mod.Estimate(parts={}, flops=estimate_mod.REFERENCE.flops_per_s * 4.0, lower="",
                                 analysis="lens", extra_seconds=6.0)
    estimate_mod.timed(lens, "float32", 64)
    assert lens.seconds == pytest.approx(lens.base_seconds * 0.6)


def test_a_run_that_shared_the_model_teaches_nothing(tmp_path):
    """A run that waited for the model, or let another run in between its parts, files no timing: the time of
    the other run is not its own."""
    from analysis.store import _timing_row

    handle = load_model("default")
    est = estimate_mod.Estimate(parts={}, flops=1.0, lower="", analysis="lens")
    est.base_seconds = 1.0
    rec = RunRecord(key="k", analysis="lens", spec={}, model="m", fingerprint="f", version="1")
    for clean in (True, False):
        t = estimate_mod.timing_meta(est, 2.0, handle.fingerprint, "float32", 128, clean)
        row = _timing_row(rec, Result(table=pd.DataFrame({"x": [1]}), meta={"estimate": {"timing": t}}))
        assert (row is not None) == clean


def test_patching_on_the_default_model_is_not_estimated_at_ten_times_its_time():
    """The issue's figure: the default model's Patching page was estimated at 76 s and ran in 5.4 s. Its work is
    counted as the kernel does it (no patch before the first position where the pairs differ, each from its
    layer and position on), and at the reference machine's pace it comes to seconds."""
    handle = load_model("default")
    a = get_analysis("patching")
    spec = resolve_tokens(a.spec(), handle)
    est = estimate_run(a, spec, handle)
    assert 1.0 < estimate_mod.reference_seconds(est) < 12.0


# ----------------------------------------------------------------------------------------------------------
# The smaller-settings ladder (issue 26, items 5 and 7)
# ----------------------------------------------------------------------------------------------------------
LARGE = {  # a 1.2 B Llama-shaped model: every ladder is walked
    "n_params": 1_235_814_400, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "d_model": 2048, "d_head": 64,
    "d_mlp": 8192, "d_vocab": 128_256, "n_ctx": 8192, "dtype": "float32", "device": "cpu", "mlp": "gated SiLU",
    "block": "sequential"}


def _work(est) -> tuple[float, float, float]:
    """(FLOPs, block invocations, other seconds) of a run and the runs it builds on."""
    parts = [est.flops, est.blocks, est.extra_seconds]
    for u in est.upstream:
        parts = [a + b for a, b in zip(parts, _work(u))]
    return tuple(parts)


def test_every_ladder_only_goes_down_on_a_large_model():
    """Each rung of every analysis's smaller-settings ladder does no more of any kind of work than the rung
    before it (the first: than the defaults), so on any machine, whatever its pace for each kind, a rung is
    never estimated slower than the defaults; and the rung the page picks is the first that fits."""
    shape = Shape.of(LARGE)
    for a in ANALYSES:
        if not a.smaller:
            continue
        prev = _work(estimate_mod._estimate(a, estimate_mod.Plan(shape, a.spec())))
        for i, rung in enumerate(estimate_mod.ladder(a, shape)):
            now = _work(estimate_mod._estimate(a, estimate_mod.Plan(shape, a.spec.from_dict(rung))))
            assert all(n <= p * (1 + 1e-9) for n, p in zip(now, prev)), (a.name, i, now, prev)
            prev = now
        chosen, full, took = smaller_defaults(a, LARGE, {})
        if chosen:
            rungs = estimate_mod.ladder(a, shape)
            assert chosen in rungs and took <= full
            before = rungs[:rungs.index(chosen)]
            for r in before:  # every rung before the chosen one was over the budget
                t = estimate_mod.reference_seconds(estimate_mod._estimate(
                    a, estimate_mod.Plan(shape, a.spec.from_dict(r))))
                assert t > estimate_mod.BUDGET_S, (a.name, r, t)


def test_patching_ladder_keeps_enough_pairs_for_its_test():
    """A two-sided sign-flip test over n pairs cannot give p below 2 / 2^n: every rung keeps at least 6 pairs
    (2/64 = 0.031 < 0.05), so a page that picks smaller settings can still show a significant node."""
    a = get_analysis("patching")
    for rung in estimate_mod.ladder(a, Shape.of(LARGE)):
        n = rung.get("n_pairs", a.spec().n_pairs)
        assert n >= 6 and 2 / 2**n < 0.05, rung


def test_a_rung_is_estimated_with_the_fields_the_user_gave():
    """A field the user gave stays, and the rung is judged with it (so it is not skipped for work it will not
    do): a user's 2 pairs on a 135 M model keep 2, and the components come from the first rung whose run with 2
    pairs fits."""
    spec = get_analysis("patching").spec(model="default", n_pairs=2)
    scaled, changed = with_smaller_defaults(spec, SMOL, given={"n_pairs"})
    assert scaled.n_pairs == 2 and "n_pairs" not in changed
    a = get_analysis("patching")
    shape = Shape.of(SMOL)
    first = next(r for r in estimate_mod.ladder(a, shape)
                 if estimate_mod.reference_seconds(estimate_mod._estimate(
                     a, estimate_mod.Plan(shape, a.spec.from_dict({**r, "n_pairs": 2})))) <= estimate_mod.BUDGET_S)
    assert scaled.components == first["components"]


def test_the_defaults_figure_is_on_the_runs_own_basis(tmp_path, monkeypatch):
    """What the page says the defaults would take comes from the same machine pace and finished runs as the run's
    own figure (the issue: smaller settings shown at 9 min beside defaults 'that would take 3 min' on 2 CPU cores),
    so it is never below the smaller settings' figure."""
    from analysis.runner import estimate_defaults, estimate_unstored

    monkeypatch.setattr(estimate_mod, "BUDGET_S", 1e-3)  # every ladder steps down, even on the default model
    handle = load_model("default")
    store = Store(tmp_path / "s.duckdb")
    a = get_analysis("patching")
    spec, changed = with_smaller_defaults(a.spec(), handle.summary)
    assert changed and spec.n_pairs == 6
    chosen = {k: v for k, (_, v) in changed.items()}
    small = estimate_unstored(a, resolve_tokens(spec, handle), handle, store)
    full = estimate_defaults(a, spec, chosen, handle, store)
    assert full.basis == small.basis and full.total_seconds > small.total_seconds
    assert full.flops > small.flops and json.loads(resolve_tokens(a.spec(), handle).pairs) == json.loads(
        resolve_tokens(spec.replace(**{k: getattr(a.spec(), k) for k in chosen}), handle).pairs)


# ----------------------------------------------------------------------------------------------------------
# A model whose vocabulary is 100x its width: work over the vocabulary counted
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_and_narrow(tmp_path_factory):
    """Two random 2-layer GPT-2s of width 64: one with a vocabulary of 6,400 (100x its width), one with the
    default tokenizer's 1,245."""
    from tiny_models import save_tiny_model, save_wide_vocab_model

    root = tmp_path_factory.mktemp("vocab")
    wide = load_model(str(save_wide_vocab_model(root / "wide", width=64, factor=100)))
    narrow_dir = save_tiny_model("gpt2", root / "narrow")
    narrow = load_model(str(narrow_dir))
    return wide, narrow


@pytest.fixture()
def one_thread():
    """torch on one thread for the test: the CPU time a run takes on one thread is what it costs the machine,
    which other processes busy on a shared CPU barely change (its wall time they can stretch several-fold)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vocabulary_work_is_counted_on_a_wide_vocabulary_model(wide_and_narrow, tmp_path, one_thread):
    """The tuned lens trains through a log-softmax over the vocabulary every step: on the 6,400-token model it
    does several times the work it does on the 1,245-token one of the same width. On one thread, measured as CPU
    time: the estimate at this machine's probed pace (no finished run known) is within 3x of the wide model's
    run, and the estimate's ratio between the two models within 3x of the measured ratio."""
    import time

    wide, narrow = wide_and_narrow
    store = Store(tmp_path / "s.duckdb")
    a = get_analysis("tuned_lens")
    fields = {"steps": 30, "batch_tokens": 256, "max_tokens": 1024}
    got = {}
    for handle in (narrow, wide):
        run(a.spec(model=handle.name, **fields, seed=1), store=store)  # warm-up: imports and first calls
        spec = resolve_tokens(a.spec(model=handle.name, **fields), handle)
        est = estimate_run(a, spec, handle, store=store)
        c0 = time.process_time()
        run(spec, store=store)
        got[handle.name] = (est.base_seconds, time.process_time() - c0)
    (e_n, t_n), (e_w, t_w) = got[narrow.name], got[wide.name]
    print(f"narrow: estimated {e_n:.2f} s, took {t_n:.2f} s of CPU; wide: estimated {e_w:.2f} s, took {t_w:.2f} s")
    assert e_w / e_n > 1.5  # the vocabulary is most of the wide model's work
    assert 1 / 3 <= e_w / t_w <= 3, (e_w, t_w)
    assert 1 / 3 <= (e_w / e_n) / (t_w / t_n) <= 3, (e_w / e_n, t_w / t_n)
