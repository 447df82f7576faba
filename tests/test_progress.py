"""Progress that moves within each part of a run (issue 26, item 6): the analyses whose bar used to sit still for
most of a run (benchmarks/progress.py, figures in benchmarks/RESULTS.md) now report inside their loops, per batch,
step, block, refit or concept set, with a fraction that never goes back.

Structural, not timed: each test counts the reports a part makes (one per training-step chunk, per block of a
patched wave, per CAV set, ...) and bounds the largest step of the reported fraction. Only the analysis's own
compute counts; its inputs are run and stored first."""
from __future__ import annotations

import pytest

from analysis import runner
from analysis.analyses.concepts.compute import ConceptActivationsSpec
from analysis.analyses.entropy.compute import EntropySpec
from analysis.analyses.features.sae import SAESpec
from analysis.analyses.intervention.compute import InterventionSpec
from analysis.analyses.patching.spec import PatchingSpec
from analysis.analyses.tcav.compute import TCAVSpec
from analysis.analyses.tuned_lens.compute import TunedLensSpec
from analysis.models import checkpoint_series, list_checkpoints
from analysis.registry import get_analysis
from analysis.store import Store
from analysis.tasks import task_rows

MAX_STEP = 0.4  # no report may move the bar by more than this (a generous bound: the old runs moved it by 0.9)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("progress") / "s.duckdb")


def _lines(start: int, n: int) -> str:
    return "\n".join(r["text"] for r in task_rows("concepts")[start:start + n])


TEXT, HELD_OUT = _lines(0, 240), _lines(1000, 24)  # small corpora: the loops' structure, not their size, is tested


def own_reports(spec, store, monkeypatch) -> list[tuple[float, str]]:
    """(frac, what) of every report `spec`'s compute makes (not its inputs' runs, not the runner's)."""
    handle = runner.load_model(spec.model)
    runner.resolve_inputs(get_analysis(spec.analysis), runner.resolve_tokens(spec, handle), store=store,
                          handle=handle)
    reports, inside = [], [False]
    real = runner.compute_run

    def watched(analysis, *args, **kwargs):
        inside[0] = analysis.name == spec.analysis
        try:
            return real(analysis, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(runner, "compute_run", watched)
    out = runner.run(spec, store=store, progress=lambda f, w: reports.append((f, w)) if inside[0] else None)
    assert not out.hit
    return reports


def check_moves(reports: list[tuple[float, str]]) -> None:
    fracs = [f for f, _ in reports]
    assert all(0.0 <= f <= 1.0 for f in fracs)
    assert fracs == sorted(fracs), "the fraction went back"
    steps = [b - a for a, b in zip([0.0] + fracs, fracs + [1.0])]
    assert max(steps) <= MAX_STEP, max(zip(steps, [""] + [w for _, w in reports]))


def count(reports, text: str) -> int:
    return sum(text in w for _, w in reports)


def test_tuned_lens_reports_batches_steps_and_evaluation_chunks(store, monkeypatch):
    spec = TunedLensSpec(dataset="text", text=TEXT, heldout_text=HELD_OUT, steps=100, batch_tokens=128)
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    assert count(reports, "hidden states of the training text") >= 3  # a report per batch of texts
    assert count(reports, "training, step") == 50  # 50 over the training, whatever its length
    assert count(reports, "held-out evaluation, logit lens") >= 1 and count(reports, "tuned lens: tokens") >= 1


def test_sae_reports_activations_training_and_evaluation(store, monkeypatch):
    spec = SAESpec(corpus="text", text=TEXT, heldout_text=HELD_OUT, width=64, k=4, steps=100, batch_tokens=256)
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    assert count(reports, "activations at") >= 3
    assert count(reports, "training, step") == 50
    for part in ("held-out activations", "encoding the training tokens", "next-token loss, clean",
                 "the SAE spliced in", "zero-ablated"):
        assert count(reports, part) >= 1, part


def test_activation_patching_reports_every_block_of_its_waves(store, monkeypatch, default_handle):
    spec = PatchingSpec(n_pairs=4, components=("attn_out",), methods=("activation", "atp"))
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    n_layers = default_handle.summary.n_layers
    for comp in spec.components:  # a wave runs from its lowest layer to the last: a report after each block
        assert count(reports, f"activation {comp}: ") >= n_layers + 1, comp
        assert count(reports, f"{comp}: the other run's activations") == 1
        assert count(reports, f"atp {comp}") == 2  # its pass starts and ends


def test_concept_activations_report_each_batch_and_probes_each_fit(store, monkeypatch):
    reports = own_reports(ConceptActivationsSpec(max_sentences=200), store, monkeypatch)
    check_moves(reports)
    assert count(reports, "activations: ") >= 3
    spec = InterventionSpec(max_sentences=200, refits=4)  # its probes run first, on the activations above
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    assert count(reports, "probe refit") == 4 and count(reports, "pushed forwards of refit") == 4


def test_entropy_reports_loading_and_computing_each_checkpoint(store, monkeypatch):
    first = str(list_checkpoints()[0][1])  # a shipped checkpoint, then the model itself
    spec = EntropySpec(prompt="Then, John and Mary went to the store. John gave a ring to",
                       checkpoints=(first, "default"))
    n = len(checkpoint_series(spec.model, spec.revision, spec.checkpoints))
    assert n == 2
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    assert count(reports, ": loading") == n and count(reports, ": attention and lens") == n


def test_tcav_reports_each_concept_set_and_each_input_batch(store, monkeypatch):
    spec = TCAVSpec(layers=(2, 4), n_examples=10, n_random=2, n_inputs=10)
    reports = own_reports(spec, store, monkeypatch)
    check_moves(reports)
    assert count(reports, "CAVs: ") == 2 * spec.n_random  # the concept's sets and the null's
    assert count(reports, "directional derivatives") >= 2
