"""Memory and time before a run: each analysis's estimate against the peak measured in a fresh process (default
model here; SmolLM2 in test_real_model.py), the runner refusing a run that cannot fit, and defaults that scale
with the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from analysis import WorkbenchError
from analysis import estimate as estimate_mod
from analysis.estimate import Shape, check_fits, estimate_run, smaller_defaults
from analysis.models import load_model
from analysis.registry import ANALYSES, get_analysis
from analysis.runner import resolve_tokens, run, with_smaller_defaults
from analysis.store import Store

PROBE = Path(__file__).with_name("estimate_probe.py")
# glibc hands every block of 64 KiB or more back to the system when it is freed, so the resident high-water mark
# counts what a run holds at once, not whatever freed heap earlier work left behind for it to reuse
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
TOLERANCE = 1.5


def probe(model: str, specs: dict, store: Path, separate: bool = False) -> list[dict]:
    """Estimate and measured peak of each spec, from a fresh process (tests/estimate_probe.py). `separate`: a
    process (and store) per analysis, two at a time, so no run's peak depends on what ran before it in the
    process (the heap earlier runs left behind moves a small model's peaks by tens of MiB)."""
    def one(item: tuple[int, dict]) -> list[dict]:
        i, part = item
        env = {**os.environ, **MALLOC_ENV, **({"OMP_NUM_THREADS": "1"} if separate else {})}  # one core each
        out = subprocess.run([sys.executable, str(PROBE), model, json.dumps(part), f"{store}.{i}"],
                             capture_output=True, text=True, timeout=1800, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    if not separate:
        return one((0, specs))
    with ThreadPoolExecutor(2) as pool:
        return [row for rows in pool.map(one, enumerate({k: v} for k, v in specs.items())) for row in rows]


def check_within(rows: list[dict], names) -> None:
    assert [r["analysis"] for r in rows] == list(names)
    report = "\n".join(f"{r['analysis']:20s} estimate {r['estimate'] / 2**20:8.1f} MiB  measured "
                       f"{r['measured'] / 2**20:8.1f} MiB  ({r['working_estimate'] / 2**20:.1f} / "
                       f"{r['measured_working'] / 2**20:.1f} MiB besides the weights)" for r in rows)
    print(report)
    for r in rows:
        assert not r["hit"]
        ratio = r["estimate"] / r["measured"]
        assert 1 / TOLERANCE <= ratio <= TOLERANCE, f"{r['analysis']}: estimate / measured = {ratio:.2f}\n{report}"


# the quantization sweep's defaults take over a minute here; these keep what sets its peak (the evaluation text's
# size, the Hessian traces) and drop what only adds time (more units and formats, more Hutchinson samples)
LIGHTER = {"quant_traces": {"max_samples": 8},
           "quant_sensitivity": {"units": ("type",), "activation_formats": (), "max_samples": 8},
           "quant_allocation": {"max_samples": 8}}


def test_estimates_match_measured_peaks_on_the_default_model(tmp_path):
    """Every analysis's default run on the default model (the quantization sweep's lighter, see LIGHTER): the
    estimate within 1.5x of the measured peak (the weights, and the process's resident high-water mark above what
    was resident when the run began)."""
    names = [a.name for a in ANALYSES]
    specs = {n: LIGHTER.get(n, {}) for n in names}
    check_within(probe("default", specs, tmp_path / "s.duckdb", separate=True), names)


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


def test_the_default_model_keeps_its_defaults():
    """Defaults scale only where they would take over a minute: nothing changes for the default model (its run
    keys stay those of every store written before)."""
    summary = load_model("default").summary
    for a in ANALYSES:
        chosen, full, _ = smaller_defaults(a, summary, {})
        assert chosen == {}, (a.name, full)


def test_a_large_model_gets_smaller_defaults_and_given_fields_stay():
    """A 135 M Llama-shaped model (SmolLM2's dimensions): the expensive analyses step down their ladder until
    their reference time is within budget; fields the user gave are never changed."""
    summary = {"n_params": 134_515_008, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_model": 576,
               "d_head": 64, "d_mlp": 1536, "d_vocab": 49152, "n_ctx": 8192, "dtype": "float32", "device": "cpu",
               "mlp": "gated SiLU", "block": "sequential"}
    Shape.of(summary)
    for name in ("patching", "concept_activations", "quant_sensitivity", "tuned_lens", "tcav"):
        chosen, full, took = smaller_defaults(get_analysis(name), summary, {})
        assert chosen and full > estimate_mod.BUDGET_S >= took, (name, full, took)
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
    pace = estimate_mod.DEFAULT_EFFICIENCY
    monkeypatch.setitem(estimate_mod._EFFICIENCY, ("quant_traces", "cpu"), [pace])
    before = estimate_unstored(analysis, spec, handle, store)
    assert [u.analysis for u in before.upstream] == ["quant_traces"]
    monkeypatch.setitem(estimate_mod._EFFICIENCY, ("quant_traces", "cpu"), [pace / 4])
    slow = estimate_unstored(analysis, spec, handle, store)
    u0, u1 = before.upstream[0], slow.upstream[0]
    assert (u1.seconds - u1.extra_seconds) == pytest.approx(4 * (u0.seconds - u0.extra_seconds), rel=1e-6)
    assert slow.seconds == pytest.approx(before.seconds)  # its own pace is its own
    run(HessianTracesSpec(n_seqs=2, seq_len=16, max_samples=4), store=store)
    after = estimate_unstored(analysis, spec, handle, store)
    assert after.upstream == [] and "builds on" not in after.describe()
