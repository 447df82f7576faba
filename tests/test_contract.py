"""The analysis contract: model sessions put shared model state back, two analyses share one loaded model from
two threads, a busy store is a WorkbenchError (library, command line, app), and an analysis added as a package
runs through the runner and the command line."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import WorkbenchError, load_model
from analysis.analyses.patching.spec import PatchingSpec
from analysis.analyses.quant.compute import QuantSensitivitySpec
from analysis.registry import REGISTRY
from analysis.runner import run
from analysis.session import ModelSession, module_state
from analysis.store import Store

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def _touch_everything(s: ModelSession) -> None:
    """What a careless compute might leave behind: hooks, unfrozen or frozen parameters, train mode."""
    s.bridge.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x * 2)
    s.bridge.blocks[1].register_forward_hook(lambda mod, args, out: out)
    params = list(s.bridge.parameters())
    params[0].requires_grad_(not params[0].requires_grad)
    params[-1].requires_grad_(not params[-1].requires_grad)
    s.bridge.train()


def test_session_puts_hooks_grads_and_mode_back_even_after_an_exception(default_handle):
    ids = torch.tensor([[0, 464, 3139, 286, 4881, 318]]) % default_handle.summary.d_vocab
    with ModelSession(default_handle) as s, torch.no_grad():
        clean = s.forward(ids)
    before = module_state(default_handle)
    with pytest.raises(RuntimeError, match="boom"):
        with ModelSession(default_handle) as s:
            _touch_everything(s)
            assert module_state(default_handle) != before  # the compute really changed the shared state
            raise RuntimeError("boom")
    assert module_state(default_handle) == before
    with ModelSession(default_handle) as s, torch.no_grad():
        torch.testing.assert_close(s.forward(ids), clean)  # the hook that doubled the residual is gone
    assert not default_handle.lock._is_owned()


def test_a_gradient_run_leaves_no_autograd_graph_on_the_model(tmp_path):
    """TransformerLens's attention bridges keep the last forward's pattern; after a run with gradients (the
    Hessian traces of the quantization sweep, AtP) that would keep the run's whole graph (every block's saved tensors)
    alive until the next forward. The session lets it go."""
    import gc

    def graphs():  # every tensor in the process that holds an autograd graph, by identity
        gc.collect()
        return {id(o): o for o in gc.get_objects() if torch.is_tensor(o) and o.grad_fn is not None}

    # Tests sharing this worker may leave graphs of their own (kernels called on a model outside a session);
    # only what this run leaves counts. Holding `before` keeps those ids from being reused.
    quant = QuantSensitivitySpec(formats=("int8-channel",), activation_formats=(), units=("type",), n_seqs=2,
                                 seq_len=16, min_samples=2, max_samples=2)
    atp = PatchingSpec(n_pairs=4, components=("resid_pre",), methods=("atp",))  # its last forward has gradients
    for i, spec in enumerate((quant, atp)):
        before = graphs()
        run(spec, store=Store(tmp_path / f"{i}.duckdb"))
        alive = [tuple(o.shape) for k, o in graphs().items() if k not in before]
        assert alive == [], spec


def test_a_compute_that_raises_leaves_the_model_and_the_store_as_they_were(tmp_path, monkeypatch):
    entry = REGISTRY["model"]
    seen = []

    def careless(session, spec, inputs, progress):
        seen.append((session.handle, module_state(session.handle)))
        _touch_everything(session)
        seen.append((session.handle, module_state(session.handle)))
        raise ValueError("half-way")

    monkeypatch.setitem(REGISTRY, "model", dataclasses.replace(entry, compute=careless))
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(ValueError, match="half-way"):
        run(REGISTRY["model"].spec(prompt=PROMPT), store=store)
    (handle, before), (_, touched) = seen
    assert touched != before  # the compute really changed the shared state
    assert module_state(handle) == before
    assert store.count("runs") == 0


def test_two_analyses_from_two_threads_share_one_model(tmp_path):
    """A quantization sweep (which overwrites weights in place and switches gradients on) and a patching sweep
    (hooks) at once on one loaded model give their single-threaded results, and leave the model as it was."""
    quant = QuantSensitivitySpec(formats=("int2-tensor", "int4-channel"), activation_formats=(), units=("matrix",),
                                 n_seqs=2, seq_len=12, min_samples=2, max_samples=3)
    patch = PatchingSpec(n_pairs=4, components=("resid_pre", "z_all_pos"), methods=("activation", "atp", "relp"))
    handle = load_model("default")  # the model the runner uses (loaded models are cached per process)
    before = module_state(handle)
    alone = {"quant": run(quant, store=Store(tmp_path / "q1.duckdb")).result,
             "patch": run(patch, store=Store(tmp_path / "p1.duckdb")).result}
    together, errors = {}, []
    start = threading.Barrier(4)

    def go(name, spec, i):
        try:
            start.wait()
            together[(name, i)] = run(spec, store=Store(tmp_path / f"{name}-{i}.duckdb")).result
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(n, s, i)) for i in range(2)
               for n, s in (("quant", quant), ("patch", patch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for (name, _), result in together.items():
        pd.testing.assert_frame_equal(result.table, alone[name].table)
        for extra in alone[name].extra:
            pd.testing.assert_frame_equal(result.extra[extra], alone[name].extra[extra])
    assert len(together) == 4 and module_state(handle) == before
    assert load_model("default") is handle  # all four ran on this one loaded model


# -- a busy store --------------------------------------------------------------------------------------------
@pytest.fixture()
def held_store(tmp_path):
    """A store file another process holds open (DuckDB lets one process at a time write a file)."""
    path = tmp_path / "busy.duckdb"
    Store(path)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; con = duckdb.connect({str(path)!r}); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield path, holder
    holder.kill()
    holder.wait()


def test_busy_store_is_a_workbench_error(held_store, monkeypatch):
    path, _ = held_store
    monkeypatch.setenv("WORKBENCH_STORE_TIMEOUT_S", "1")
    with pytest.raises(WorkbenchError, match="is busy: another process has held it for over 1 s"):
        Store(path)


def test_busy_store_in_the_cli_is_a_message_not_a_traceback(held_store):
    path, _ = held_store
    out = subprocess.run([sys.executable, "-m", "analysis", "model", "--prompt", PROMPT, "--store", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WORKBENCH_STORE_TIMEOUT_S": "1.5"})
    assert out.returncode == 2, out.stderr
    assert "error: The result store" in out.stderr and "is busy" in out.stderr
    assert "Traceback" not in out.stderr and "duckdb." not in out.stderr


def test_busy_store_in_the_app_shows_a_message_and_works_once_free(held_store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from analysis.runner import get_store

    path, holder = held_store
    monkeypatch.setenv("WORKBENCH_STORE", str(path))
    monkeypatch.setenv("WORKBENCH_STORE_TIMEOUT_S", "1.5")
    get_store.cache_clear()
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
        assert not at.exception
        assert any("is busy" in e.value for e in at.error), [e.value for e in at.error]
        holder.kill()
        holder.wait()
        at.run()
        assert not at.exception and not at.error
        assert any("computed in" in c.value for c in at.caption)
    finally:
        get_store.cache_clear()


# -- an analysis added as a package ----------------------------------------------------------------------------
def test_a_new_analysis_package_runs_through_the_runner_the_cli_and_a_page(tmp_path, monkeypatch, default_handle):
    """tests/toy_ext is a package with one analysis (spec, compute, figures, page); named in WORKBENCH_ANALYSES it
    joins the registry, the runner, the store, the export, the command line and the app, nothing else edited."""
    from toy_ext import ANALYSIS
    from transformers import AutoModelForCausalLM

    from analysis.export import html_report, item_from_result

    monkeypatch.setitem(REGISTRY, ANALYSIS.name, ANALYSIS)  # what WORKBENCH_ANALYSES does at import
    store = Store(tmp_path / "toy.duckdb")
    out = run(ANALYSIS.spec(prompt=PROMPT), store=store)
    assert not out.hit and run(ANALYSIS.spec(prompt=PROMPT), store=store).hit
    # reference: plain transformers' hidden states entering each block
    hf = AutoModelForCausalLM.from_pretrained(default_handle.path).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([list(out.spec.token_ids)]), output_hidden_states=True).hidden_states
    t = out.result.table
    for layer in range(default_handle.summary.n_layers):
        ours = t[t["layer"] == layer].sort_values("pos")["norm"].to_numpy()
        torch.testing.assert_close(torch.tensor(ours, dtype=torch.float32), hidden[layer][0].norm(dim=-1),
                                   rtol=1e-4, atol=1e-4)
    doc = html_report("toy", [item_from_result("toy", ANALYSIS.name, out.key, out.spec.to_dict(), out.result)])
    assert "js-plotly-plot" in doc or "Plotly.newPlot" in doc

    env = {**os.environ, "WORKBENCH_ANALYSES": "toy_ext",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    help_ = subprocess.run([sys.executable, "-m", "analysis", "--help"], cwd=REPO, capture_output=True, text=True,
                           env=env, timeout=300)
    assert "toy_norms" in help_.stdout
    cli = subprocess.run([sys.executable, "-m", "analysis", "toy_norms", "--prompt", PROMPT, "--skip-bos", "true",
                          "--store", str(tmp_path / "toy.duckdb"), "--csv", str(tmp_path / "toy.csv")], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr
    csv = pd.read_csv(tmp_path / "toy.csv")
    assert (csv["pos"] > 0).all() and len(csv) == default_handle.summary.n_layers * (len(out.spec.token_ids) - 1)
    bad = subprocess.run([sys.executable, "-m", "analysis", "runs"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "WORKBENCH_ANALYSES": "no_such_package"}, timeout=300)
    assert bad.returncode == 2 and "WORKBENCH_ANALYSES names 'no_such_package'" in bad.stderr
    assert "Traceback" not in bad.stderr

    # the app: its page is in the navigation, its widgets come from the spec's fields, a link reopens it
    from streamlit.testing.v1 import AppTest

    import analysis.registry as registry
    from analysis.runner import get_store

    monkeypatch.setattr(registry, "ANALYSES", [*registry.ANALYSES, ANALYSIS])
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    get_store.cache_clear()
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
        [page] = [h for h, info in at._registered_pages.items() if info.get("url_pathname") == "norms"]
        at._page_hash = page
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert at.title[0].value == ANALYSIS.spec.title  # the page is titled by its spec
        assert at.checkbox[0].label == "Skip bos" and at.checkbox[0].help == "leave out position 0"
        at.checkbox[0].check()
        at.button[0].click().run()
        assert not at.exception and not at.error
        shown = [d.value for d in at.dataframe if "norm" in d.value.columns][0]
        assert (shown["pos"] > 0).all() and len(at.get("plotly_chart")) == 1
        assert at.query_params["skip_bos"] in (["True"], "True")
    finally:
        get_store.cache_clear()
