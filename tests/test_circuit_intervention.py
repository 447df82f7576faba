"""Interventions from a circuit's graph (the `circuit_intervention` analysis) on components against an independent
reference: the plain transformers model with hooks on each head's share of the output projection's input and on the
MLPs (one forward per setting). Feature nodes: tests/test_feature_circuits.py (with the feature circuit's SAEs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_circuits import _HF, _pairs

from analysis import WorkbenchError
from analysis.analyses.circuit.intervene import CircuitInterventionSpec
from analysis.runner import run
from analysis.store import Store


def _record(hf: _HF, tokens):
    """Each layer's output-projection input [B, S, H * dh] (the heads' z) and MLP output, from the transformers
    model."""
    got, handles = {}, []
    for i, (_, _, proj, _, mlp) in enumerate(hf.parts):
        handles.append(proj.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(f"z{i}", a[0].detach())))
        handles.append(mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"m{i}", o.detach())))
    try:
        with torch.no_grad():
            hf.model(tokens)
    finally:
        for h in handles:
            h.remove()
    return got


def _brute_components(hf: _HF, base, other, nodes, value, answer, wrong):
    """The final-position logit difference of `base` with each (kind, layer, head, pos) node set to `value`."""
    rb, ro = _record(hf, base), _record(hf, other)
    dh = hf.d // hf.n_heads

    def target(key):
        if value == "other":
            return ro[key]
        if value == "mean":
            return rb[key].mean(0, keepdim=True).expand_as(rb[key])
        return torch.zeros_like(rb[key])

    def at(pos):
        return slice(None) if pos is None else slice(pos, pos + 1)

    handles = []
    for kind, layer, head, pos in nodes:
        _, _, proj, _, mlp = hf.parts[layer]
        if kind == "head":
            t, cols = target(f"z{layer}"), slice(head * dh, (head + 1) * dh)

            def pre(m, a, t=t, cols=cols, pos=pos):
                z = a[0].clone()
                z[:, at(pos), cols] = t[:, at(pos), cols]
                return (z,) + a[1:]
            handles.append(proj.register_forward_pre_hook(pre))
        else:
            t = target(f"m{layer}")

            def post(m, a, o, t=t, pos=pos):
                o = o.clone()
                o[:, at(pos)] = t[:, at(pos)]
                return o
            handles.append(mlp.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = hf.model(base).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return (logits.gather(1, answer[:, None]) - logits.gather(1, wrong[:, None]))[:, 0]


@pytest.mark.parametrize("which", ["default", "llama", "neox"])
def test_component_interventions_equal_a_brute_force_on_the_transformers_model(which, default_handle, tiny_dirs,
                                                                              tmp_path):
    from analysis import load_model

    handle = default_handle if which == "default" else load_model(str(tiny_dirs[which]))
    model = "default" if which == "default" else str(tiny_dirs[which])
    clean, corr, ans, wrong = _pairs(handle, 3)
    P, L = clean.shape[1], handle.bridge.cfg.n_layers
    hf = _HF(handle)
    store = Store(tmp_path / "s.duckdb")
    nodes = [("head", 0, 1, None), ("mlp", L - 1, -1, None), ("head", L - 1, 0, P - 1)]
    names = ("a0.h1", f"m{L - 1}", f"a{L - 1}.h0@{P - 1}")
    for prompts, value in (("clean", "mean"), ("corrupted", "other"), ("clean", "zero")):
        spec = CircuitInterventionSpec(model=model, n_pairs=3, nodes=names, prompts=prompts, value=value,
                                       metric="logit_diff")
        r = run(spec, store=store).result
        base, other = (clean, corr) if prompts == "clean" else (corr, clean)
        want = _brute_components(hf, base, other, nodes, value, ans, wrong)
        got = torch.tensor(r.table["after"].to_numpy(), dtype=torch.float32)
        assert torch.allclose(got, want, atol=1e-4), (which, prompts, value, got, want)
        # the runs it reports beside it: the chosen prompts' own run, the clean and the corrupted run
        plain = _brute_components(hf, base, other, [], value, ans, wrong)
        assert np.allclose(r.table["before"], plain.numpy(), atol=1e-4)
        assert np.allclose(r.table["change"], r.table["after"] - r.table["before"])
    # every head and MLP patched to the other prompt's value is the other prompt's run
    every = tuple(f"a{layer}.h{h}" for layer in range(L) for h in range(handle.bridge.cfg.n_heads)) + \
        tuple(f"m{layer}" for layer in range(L)) + ("input",)
    r = run(CircuitInterventionSpec(model=model, n_pairs=3, nodes=every, prompts="corrupted", value="other",
                                    metric="logit_diff"), store=store).result
    assert np.allclose(r.table["after"], r.table["clean"], atol=1e-3)
    nt = r.extra["next_token"]
    for i in range(3):  # the next-token distribution after is the clean prompt's (the "other" column)
        sub = nt[nt["pair"] == i]
        assert np.allclose(sub["p_after"], sub["p_other"], atol=1e-4)
        assert sub["answer"].sum() == 1 and sub["wrong"].sum() == 1


def test_bad_interventions_get_a_message_and_store_nothing(tmp_path, default_handle):
    import json

    from analysis.tasks import ioi_pairs

    rows = ioi_pairs(default_handle, "auto").rows
    two = [rows[0], next(r for r in rows if len(r["clean_ids"]) != len(rows[0]["clean_ids"]))]
    two_lengths = json.dumps([{"clean_ids": r["clean_ids"], "corrupted_ids": r["corrupted_ids"], "answer_id": r["io_id"],
                               "wrong_id": r["s_id"]} for r in two])
    store = Store(tmp_path / "s.duckdb")
    for fields, says in (({"nodes": ()}, "at least one node"),
                         ({"nodes": ("a1.h0; DROP TABLE runs",)}, "is not a node name"),
                         ({"nodes": ("f1.3@4",)}, "is a node of the features graph"),
                         ({"nodes": ("a1.h0",), "level": "features"}, "is a node of the components graph"),
                         ({"nodes": ("a6.h0",)}, "has blocks 0 to 5"),
                         ({"nodes": ("a1.h4",)}, "has heads 0 to 3"),
                         ({"nodes": ("m1@40",)}, "positions 0 to"),
                         ({"nodes": ("f1.3@0",), "level": "features"}, "position 0 is not split"),
                         ({"nodes": ("f1.600@3",), "level": "features"}, "features 0 to 511"),
                         ({"nodes": ("m1@3",), "pairs": two_lengths, "dataset": ""}, "one token length")):
        with pytest.raises(WorkbenchError, match=says):
            run(CircuitInterventionSpec.from_dict({"model": "default", **fields}), store=store)
    assert store.count("runs") == 0
