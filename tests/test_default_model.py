"""The shipped default model really does its tasks, measured here from the model on held-out prompts."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys

import pytest
import torch

from analysis.models import CHECKPOINTS_DIR, DATA_DIR, DEFAULT_MODEL_DIR
from analysis.tasks import fact_prompts, induction_prompts, ioi_pairs

TASKS = DATA_DIR / "tasks"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def _build_module():
    spec = importlib.util.spec_from_file_location("build_default_model", DATA_DIR / "build_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def _last_logits(handle, rows: list[list[int]]) -> torch.Tensor:
    """Final-position logits of each token list, batched by length (no padding involved). [n, d_vocab]"""
    out = [None] * len(rows)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    for _, idx in by_len.items():
        logits = handle.bridge(torch.tensor([rows[i] for i in idx]), return_type="logits")[:, -1]
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.stack(out)


def test_every_entity_is_a_single_token(default_handle):
    ent = json.loads((TASKS / "entities.json").read_text())
    words = ent["names"] + ent["places"] + ent["objects"] + ent["countries"] + ent["capitals"]
    assert len(ent["names"]) >= 40 and len(ent["places"]) >= 10 and len(ent["objects"]) >= 10
    assert len(ent["countries"]) >= 40
    multi = [w for w in words if len(default_handle.tokenizer.encode(" " + w, add_special_tokens=False)) != 1]
    assert multi == []


def test_ioi_pairs_are_well_formed(default_handle):
    rows = ioi_pairs(default_handle).rows
    build = _build_module()
    assert len(rows) >= 200
    assert {r["order"] for r in rows} == {"BABA", "ABBA"}
    for r in rows:
        assert len(r["clean_ids"]) == len(r["corrupted_ids"])
        # ABC: the corrupted prompt differs from the clean one exactly at the three name positions
        diff = [i for i, (a, b) in enumerate(zip(r["clean_ids"], r["corrupted_ids"])) if a != b]
        assert len(diff) == 3
        names = {r["corrupted_ids"][i] for i in diff}
        assert len(names) == 3 and not names & {r["io_id"], r["s_id"]}
        # clean prompt: the subject appears twice, the indirect object once
        assert r["clean_ids"].count(r["s_id"]) == 2 and r["clean_ids"].count(r["io_id"]) == 1
        # held out: this (template, indirect object) combination never occurs in the training corpus
        assert r["held_out"] and build.ioi_held_out(r["template"], r["io"])


def test_training_corpus_excludes_held_out_combinations():
    build = _build_module()
    rng = random.Random(0)
    for _ in range(3000):
        p = build.ioi_prompt(rng, held_out=False)
        assert not build.ioi_held_out(p["template"], p["io"])
    facts = [build.fact_doc(rng) for _ in range(3000)]
    held = {(r["country"], r["phrasing"]) for r in _jsonl("facts") if r["held_out"]}
    held_texts = {build.FACT_TEMPLATES[k].format(C=c) + " " for c, k in held}
    assert not any(f.startswith(t) for f in facts for t in held_texts)


def test_ioi_accuracy_and_logit_difference(default_handle):
    rows = ioi_pairs(default_handle).rows
    logits = _last_logits(default_handle, [r["clean_ids"] for r in rows])
    idx = torch.arange(len(rows))
    ld = logits[idx, [r["io_id"] for r in rows]] - logits[idx, [r["s_id"] for r in rows]]
    assert (ld > 0).float().mean().item() >= 0.95
    assert ld.mean().item() >= 2.0
    # the corruption destroys the information: on corrupted prompts IO and S are symmetric
    corr = _last_logits(default_handle, [r["corrupted_ids"] for r in rows])
    ld_corr = corr[idx, [r["io_id"] for r in rows]] - corr[idx, [r["s_id"] for r in rows]]
    assert abs(ld_corr.mean().item()) < 0.5 * ld.mean().item()


def test_induction_second_copy_loss_far_below_first(default_handle):
    first, second = [], []
    for r in induction_prompts(default_handle).rows:
        x = torch.tensor([r["ids"]])
        with torch.no_grad():
            logp = default_handle.bridge(x, return_type="logits")[0, :-1].log_softmax(-1)
        nll = -logp.gather(-1, x[0, 1:, None])[:, 0]  # nll[i]: loss on token i+1
        n = r["span_length"]
        first.append(nll[1:n].mean())
        second.append(nll[n + 1: 2 * n].mean())
    first_m, second_m = torch.stack(first).mean().item(), torch.stack(second).mean().item()
    assert first_m > 4.0  # random tokens: close to the log of the pool size
    assert second_m < 0.1 * first_m


def test_fact_recall_on_held_out_phrasings(default_handle):
    rows = fact_prompts(default_handle).rows
    assert len({r["country"] for r in rows}) >= 40 and len({r["phrasing"] for r in rows}) >= 3
    held = [r for r in rows if r["held_out"]]
    logits = _last_logits(default_handle, [r["ids"] for r in held])
    top1 = (logits.argmax(-1) == torch.tensor([r["answer_id"] for r in held])).float().mean().item()
    assert top1 >= 0.90


def test_concept_dataset_labels():
    rows = _jsonl("concepts")
    assert len(rows) >= 1000
    for concept, values in [("sentiment", {"positive", "negative"}), ("tense", {"present", "past"}),
                            ("number", {"singular", "plural"}), ("topic", {"sports", "food", "weather", "music"})]:
        counts = {v: sum(r[concept] == v for r in rows) for v in values}
        assert set(counts) == values and min(counts.values()) > 0.15 * len(rows)
    # labels agree with the words: plural subjects take plural verbs, past tense uses past forms
    for r in rows[:200]:
        words = set(re.findall(r"[a-z]+", r["text"].lower()))
        if r["tense"] == "past":
            assert words & {"was", "were", "seemed", "looked", "felt"}
        if r["number"] == "plural":
            assert words & {"are", "were", "seem", "look", "feel", "seemed", "looked", "felt"}


def test_shipped_files_fit_the_budget():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"data/ is {total / 2**20:.1f} MiB"
    assert len(list(CHECKPOINTS_DIR.glob("step-*/model.safetensors"))) >= 6
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file() and (DEFAULT_MODEL_DIR / "tokenizer.json").is_file()


def test_checkpoints_show_learning(default_handle):
    """Early checkpoints have not learned IOI yet; the final model has (training dynamics to analyse)."""
    from analysis import load_model
    from analysis.models import list_checkpoints

    rows = ioi_pairs(default_handle).rows[:100]
    idx = torch.arange(len(rows))

    def mean_ld(handle):
        logits = _last_logits(handle, [r["clean_ids"] for r in rows])
        return (logits[idx, [r["io_id"] for r in rows]] - logits[idx, [r["s_id"] for r in rows]]).mean().item()

    first = load_model(str(list_checkpoints()[0][1]))
    assert mean_ld(first) < 0.5 < mean_ld(default_handle)


def test_build_script_is_seeded_and_reproducible(tmp_path):
    """Two tiny runs of the real build script write byte-identical weights and tokenizers."""
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(DATA_DIR / "build_default_model.py"), "--out", str(out), "--steps", "3",
                        "--batch", "2", "--layers", "1", "--d-model", "32", "--heads", "2", "--checkpoints", "2"],
                       check=True, capture_output=True, timeout=600)
        outs.append(out)
    for rel in ["default-model/model.safetensors", "default-model/tokenizer.json", "checkpoints/step-00002/model.safetensors",
                "tasks/ioi.jsonl", "tasks/concepts.jsonl"]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


@pytest.mark.parametrize("name", ["ioi", "facts", "concepts"])
def test_shipped_tasks_are_text_for_any_tokenizer(default_handle, name):
    """The IOI, fact and concept files hold text and the pieces it is built from, no token ids; the IOI text is
    what its template and entities give."""
    from analysis.tasks import ioi_texts

    for r in _jsonl(name):
        assert not {"ids", "clean_ids", "corrupted_ids", "io_id", "s_id", "answer_id"} & set(r)
        if name == "ioi":
            assert ioi_texts(r) == (r["clean"], r["corrupted"])


def test_default_model_task_ids_are_built_without_changes(default_handle):
    """Every shipped prompt fits the default tokenizer as it is: nothing replaced or dropped, BOS in front (its
    tokenizer's own convention), induction spans as shipped."""
    for data in (ioi_pairs(default_handle), fact_prompts(default_handle), induction_prompts(default_handle)):
        assert data.notes == () and len(data.rows) == data.total
    bos = default_handle.tokenizer.bos_token_id
    assert default_handle.prepends_bos and default_handle.tokenizer("The")["input_ids"][0] == bos
    for r in induction_prompts(default_handle).rows:
        assert r["ids"][0] == bos and len(r["ids"]) == 1 + 2 * r["span_length"]
    without = [r["ids"] for r in induction_prompts(default_handle, "no").rows]
    assert without == [r["ids"][1:] for r in induction_prompts(default_handle).rows]
    assert [r["clean_ids"] for r in ioi_pairs(default_handle, "no").rows] == [
        r["clean_ids"][1:] for r in ioi_pairs(default_handle).rows]


# Run keys of each analysis's default spec (a prompt where it takes one) on the default model, as derived by the
# code before issue 13 moved the task data to text and made the BOS token follow the tokenizer: stores written
# before then must open as hits. A deliberate version bump of an analysis changes its key here too: the
# quantization sweep and allocation (version 2) read their Hessian traces from the quant_traces run added since;
# entropy and the information plane (version 2) label each checkpoint by its step or name, and patching (version 2)
# keeps per-pair values with bootstrap intervals and permutation p-values (issue 15).
KEYS_BEFORE_ISSUE_13 = {
    "model": "27694af2770be7e137ddf51d5201f04d",
    "patching": "e04ead19c0aefd43578afd8658952164",  # version 2 (issue 15): per-pair values, intervals, p-values
    "lens": "19bcc8ea3bfaeeaa8d7b2c9e064ebf5b",  # version 2 (issue 15): per-layer summary with intervals
    "tuned_lens": "347b0a885c15413d568cef71da11225f",  # version 2: held out by sentence, with intervals
    "entropy": "70a2887d34937c5441054fa94dbba5b1",  # version 2 (issue 15): checkpoints labelled, in given order
    "infoplane": "e1ada7da8a52616850e85e03676c7ac9",
    "concept_activations": "788451ceb00cb650a82cce10a604014e",
    "probes": "a794d1339c27ec5f258c2c1e0681539f",  # version 3 (issue 15): per-text results, intervals
    "bottleneck": "b0ce9b898a80c30f9022d8d0c215ccab",
    "intervention": "035e1102fd199b4cdc8ff0411d6770bd",  # version 2 (issue 15): interval over probe refits
    "tcav": "a1795d48d0c762d2a950ecfc03f71e22",
    "atlas": "0fe5fccb6db16dea0325a0ea9416c007",
    # version 2/3/3 (issue 26): traces with 95% intervals; allocation by their upper end, candidates measured
    "quant_traces": "9853316bbdf0b99b79b67e171ba3750a",
    "quant_sensitivity": "7ef16f335703075f72b134776c7ab09a",
    "quant_allocation": "2e287d389d1fb17413a13ab083b8c373",
    # issue 16: sparse features
    "sae": "559a3d891ed4e2f13ee565b7f15faa15",
    "sae_features": "ed00c7868e3ca47d14a3adaec7098198",
    "sae_encode": "975da7d454fdd20c68f9fb8fe0cd30e1",
    "sae_attribution": "1a3e9e1ad81d1b4386cc677824ccf489",
    "sae_steer": "df534ba938fcd475a2fd5ea69289d1e1",
    "sae_names": "5f043c5db2dac4941910c7c13f548218",
    "circuit": "a49bc2b6ee6b1613b01c802df65cb967",  # new with issue 28
    "circuit_intervention": "869b35d619d875be983f0a569e616065",
}


def test_run_keys_are_those_stores_were_written_with(default_handle):
    from analysis.registry import ANALYSES
    from analysis.runner import resolve_tokens, run_key
    from analysis.specs import PromptSpec

    got = {}
    for a in ANALYSES:
        spec = a.spec(prompt="The capital of France is") if issubclass(a.spec, PromptSpec) else a.spec()
        got[a.spec.analysis] = run_key(default_handle.fingerprint, resolve_tokens(spec, default_handle), a.version)
    assert got == KEYS_BEFORE_ISSUE_13
