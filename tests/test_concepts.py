"""Concepts: data (shipped and uploaded CSVs), activations, probes, the bottleneck, interventions, TCAV, the atlas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import load_model
from analysis.analyses.concepts.compute import ConceptActivationsSpec, ProbeSpec, activations_array
from analysis.concept_data import MIN_PER_CLASS, parse_concepts_csv, save_concepts_csv, shipped
from analysis.errors import WorkbenchError
from analysis.runner import run
from analysis.store import Store
from analysis.tasks import task_rows
from analysis.tokens import encode


def _shipped_ids(n):
    return [encode(load_model("default"), r["text"]) for r in task_rows("concepts")[:n]]


def test_stored_activations_are_the_models_residuals(default_handle, tmp_path):
    out = run(ConceptActivationsSpec(max_sentences=40), store=Store(tmp_path / "s.duckdb"))
    acts = activations_array(out.result)
    labels = out.result.extra["labels"]
    assert acts.shape == (40, 7, 128) and len(labels) == 40
    ids = _shipped_ids(40)[7]  # the shipped token ids: our tokenization of the text must give the same
    assert labels["n_tokens"].iloc[7] == len(ids)
    with torch.no_grad():
        _, cache = default_handle.bridge.run_with_cache(torch.tensor([ids]))
    want = cache["blocks.3.hook_resid_post"][0, -1].numpy()  # layer 3, last token
    assert np.allclose(acts[7, 4], want, atol=1e-5)
    cut = run(ConceptActivationsSpec(max_sentences=40, drop_last=2), store=Store(tmp_path / "s.duckdb"))
    with torch.no_grad():
        _, cache = default_handle.bridge.run_with_cache(torch.tensor([ids[:-2]]))
    assert np.allclose(activations_array(cut.result)[7, 4], cache["blocks.3.hook_resid_post"][0, -1].numpy(),
                       atol=1e-5)


def test_probes_find_the_concepts_and_the_control_task_stays_at_chance(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    for position, must_reach in (("last", ("tense", "number")), ("mean", ("sentiment", "tense", "number"))):
        out = run(ProbeSpec(position=position), store=store)
        t = out.result.table
        best = t.groupby("concept")["accuracy"].max()
        for concept in must_reach:
            assert best[concept] >= 0.9, (position, concept, best[concept])
        assert ((t["control_accuracy"] - t["chance"]).abs() < 0.1).all(), position
        assert (t["selectivity"] == t["accuracy"] - t["control_accuracy"]).all()
        # the stored directions score the held-out texts as the probe predicts: sign of the margin = the class
        d = out.result.extra["directions"]
        row = d[(d["concept"] == "number") & (d["layer"] == 4)].iloc[0]
        acts = activations_array(store.get(out.result.meta["activations_run"]))[:, 5]
        y = shipped()["number"].to_numpy()
        pred = np.where(acts @ np.asarray(row["weight"], dtype=np.float64) + row["bias"] > 0, row["class"],
                        row["against"])
        assert (pred == y).mean() >= t.query("concept == 'number' and layer == 4")["accuracy"].iloc[0] - 0.05
    # the activations are a stored run of their own: the second probe set reused them
    assert len(store.runs("concept_activations")) == 2  # one per position
    # per held-out text: right or wrong, for the probe and the control; the accuracy is their mean and its
    # interval agrees with scipy's bootstrap over the held-out texts
    from scipy import stats

    per = out.result.extra["per_example"]
    one = per[(per["concept"] == "sentiment") & (per["layer"] == 3)]
    row = t[(t["concept"] == "sentiment") & (t["layer"] == 3)].iloc[0]
    assert len(one) == out.result.meta["n_test"] and one["correct"].mean() == pytest.approx(row["accuracy"])
    ref = stats.bootstrap((one["correct"].to_numpy(float),), lambda x, axis=-1: x.mean(axis), vectorized=True,
                          n_resamples=20_000, method="percentile", random_state=0).confidence_interval
    width = max(ref.high - ref.low, 1e-3)
    assert abs(row["accuracy_low"] - ref.low) < 0.2 * width and abs(row["accuracy_high"] - ref.high) < 0.2 * width
    diff = one["correct"].to_numpy(float) - one["control_correct"].to_numpy(float)
    assert row["selectivity"] == pytest.approx(diff.mean())
    assert row["selectivity_low"] <= row["selectivity"] <= row["selectivity_high"]


def _csv(n=60, **extra) -> str:
    df = shipped().iloc[:n][["text", "sentiment", "topic"]]
    for k, v in extra.items():
        df[k] = v
    return df.to_csv(index=False)


@pytest.mark.parametrize("data, message", [
    ("", "is empty"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    ("sentence,sentiment\nhello,positive\n", "no 'text' column"),
    ("text\n" + "hello\n" * 30, "no concept column"),
    ("text,mood\n" + "a,happy\n" * 30 + "b,sad\n" * (MIN_PER_CLASS - 1), "too few examples per class"),
    ("text,mood\n" + "a,happy\n" * 30, "single class"),
    ("text,mood\n" + "a,happy\n" * 15 + "b,\n" + "c,sad\n" * 15, "no label in 1 row(s) (first: row 17)"),
    ("text,mood\n" + ",happy\n" + "a,happy\n" * 15 + "c,sad\n" * 15, "have no text (first: row 2)"),
    ("text,mood\n" + "a,happy\n" * 5 + "c,sad\n" * 5, "probes need at least"),
    ("text,mood\n" + ("x" * 3000) + ",a\n" + "a,happy\n" * 15 + "c,sad\n" * 15, "longer than"),
    ("x" * (5 * 1024 * 1024 + 1), "MiB"),
])
def test_bad_concept_csvs_get_a_clear_message_and_store_nothing(tmp_path, data, message):
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        save_concepts_csv(store, data, name="mine.csv")
    assert len(store.datasets()) == 0


def test_uploaded_csv_is_content_addressed_and_probed(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    text = _csv(200, length=["long" if len(t) > 45 else "short" for t in shipped()["text"].iloc[:200]])
    ds = save_concepts_csv(store, text, name="mine.csv")
    assert save_concepts_csv(store, text, name="again.csv") == ds and len(store.datasets()) == 1
    parsed = parse_concepts_csv(text)
    assert list(parsed.columns) == ["text", "sentiment", "topic", "length"]
    out = run(ProbeSpec(dataset=ds, position="mean", concepts=("sentiment", "length"), max_sentences=200),
              store=store)
    t = out.result.table
    assert set(t["concept"]) == {"sentiment", "length"}
    assert t.query("concept == 'sentiment'")["accuracy"].max() >= 0.9
    with pytest.raises(WorkbenchError, match="No concept 'tense'"):
        run(ProbeSpec(dataset=ds, concepts=("tense",), max_sentences=200), store=store)
    with pytest.raises(WorkbenchError, match="not in this store"):
        run(ProbeSpec(dataset="0123456789abcdef"), store=store)


def test_bottleneck_explains_a_label_through_its_concept_and_reports_leakage(tmp_path):
    from analysis.analyses.bottleneck.compute import BottleneckSpec

    store = Store(tmp_path / "s.duckdb")
    df = shipped().iloc[:600].copy()
    df["mood"] = df["sentiment"]  # a behaviour that *is* the sentiment concept
    ds = save_concepts_csv(store, df.to_csv(index=False), name="mood.csv")
    out = run(BottleneckSpec(dataset=ds, target="mood", concepts=("sentiment", "tense"), position="mean",
                             layer=-1, drop_last=0, max_sentences=600, n_random=3), store=store)
    m, summary = out.result.meta, out.result.extra["summary"]
    assert m["accuracy"] >= 0.95 and m["completeness"] >= 0.9
    assert m["completeness"] == pytest.approx((m["accuracy"] - m["chance"]) / (m["reference"] - m["chance"]))
    assert m["random_accuracy_mean"] < m["accuracy"] - 0.1  # two random directions do not carry the sentiment
    w = out.result.table.set_index("feature")["weight"]
    assert abs(w["sentiment: positive"]) > 5 * abs(w["tense: present"])
    assert list(summary["head"])[0] == "concept bottleneck" and len(out.result.extra["random"]) == 3
    with pytest.raises(WorkbenchError, match="cannot also be a concept"):
        run(BottleneckSpec(dataset=ds, target="mood", concepts=("mood",), max_sentences=600), store=store)


def test_bottleneck_next_token_behaviour_is_the_models_own_choice(default_handle, tmp_path):
    from transformers import AutoModelForCausalLM

    from analysis.analyses.bottleneck.compute import PLACE_NOUNS, BottleneckSpec
    from analysis.models import DEFAULT_MODEL_DIR

    store = Store(tmp_path / "s.duckdb")
    out = run(BottleneckSpec(max_sentences=300, n_random=2), store=store)
    m = out.result.meta
    # the behaviour counts equal an independent forward of the plain transformers model on the cut texts
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    tok_ids = [default_handle.tokenizer.encode(t, add_special_tokens=False)[0] for t in PLACE_NOUNS]
    counts: dict[str, int] = {}
    with torch.no_grad():
        for ids in _shipped_ids(300):
            logits = hf(torch.tensor([ids[:-2]])).logits[0, -1, tok_ids]
            choice = PLACE_NOUNS[int(logits.argmax())]
            counts[choice] = counts.get(choice, 0) + 1
    assert counts == m["behaviour_counts"]
    assert m["reference"] == 1.0 and 0 < m["accuracy"] <= 1 and m["chance"] < m["accuracy"]
    assert m["nonzero_weights"] <= m["n_weights"]


def test_pushing_along_sentiment_moves_positive_and_negative_words_monotonically(default_handle, tmp_path):
    from analysis.analyses.intervention.compute import InterventionSpec

    store = Store(tmp_path / "s.duckdb")
    for prompt in ("The weather is very", "The concert was very"):
        out = run(InterventionSpec(prompt=prompt), store=store)
        g = out.result.extra["groups"].sort_values("amount")
        assert out.result.meta["toward"] == "positive"
        assert (np.diff(g["up"]) > 0).all(), g  # positive words rise at every step of the dose
        assert (np.diff(g["down"]) < 0).all(), g  # negative words fall at every step
        assert g["up"].iloc[-1] - g["up"].iloc[0] > 0.1
        back = run(InterventionSpec(prompt=prompt, toward="negative"), store=store).result.extra["groups"]
        assert np.allclose(back.sort_values("amount")["up"].to_numpy(), g["up"].to_numpy()[::-1], atol=1e-5)


def test_intervention_curve_carries_its_uncertainty_over_probe_refits(tmp_path):
    """Monotone on the default prompt with the default probe, and most of its refits agree; with probes fitted on
    400 sentences the curve is not to be trusted, and the interval and the refits say so."""
    from analysis.analyses.intervention.compute import InterventionSpec, refit_directions

    store = Store(tmp_path / "s.duckdb")
    out = run(InterventionSpec(), store=store)
    g, m = out.result.extra["groups"].sort_values("amount"), out.result.meta
    assert m["refits"] == 20 and m["monotone_refits"] >= 0.9
    assert m["probe_accuracy_low"] <= m["probe_accuracy"] <= m["probe_accuracy_high"]
    assert g["log_odds_high"].iloc[0] < 0 < g["log_odds_low"].iloc[-1]  # the ends differ beyond the spread
    assert ((g["log_odds_low"] <= g["log_odds"] + 1e-9) & (g["log_odds"] <= g["log_odds_high"] + 1e-9)).mean() >= 0.8
    small = run(InterventionSpec(max_sentences=400), store=store)
    gs = small.result.extra["groups"].sort_values("amount")
    assert small.result.meta["monotone_refits"] < 0.5 and gs["log_odds_low"].iloc[-1] < 0 < gs["log_odds_high"].iloc[-1]
    none = run(InterventionSpec(refits=0), store=store)
    assert "log_odds_low" not in none.result.extra["groups"] and "monotone_refits" not in none.result.meta
    # the refits are unit directions toward the class the curve pushes to
    from analysis.analyses.concepts.compute import activations_array, activations_spec

    acts = run(activations_spec(InterventionSpec()), store=store).result
    dirs = refit_directions(acts, InterventionSpec(refits=5), m["layer"], m["toward"])
    assert dirs.shape == (5, 128) and np.allclose(np.linalg.norm(dirs, axis=1), 1)
    X = activations_array(acts)[:, m["layer"] + 1].astype(np.float64)
    y = acts.extra["labels"]["sentiment"].to_numpy() == "positive"
    for d in dirs:  # pointing toward 'positive': positive texts score higher along it
        assert (X[y] @ d).mean() > (X[~y] @ d).mean()


def test_intervention_equals_a_hook_on_the_plain_transformers_model(default_handle, tmp_path):
    """Independent check: the same vector added to the output of the plain transformers block."""
    from transformers import AutoModelForCausalLM

    from analysis.analyses.concepts.compute import direction, probes_spec
    from analysis.analyses.intervention.compute import InterventionSpec
    from analysis.models import DEFAULT_MODEL_DIR

    store = Store(tmp_path / "s.duckdb")
    spec = InterventionSpec(prompt="The weather is very", layer=2, amounts=(-1.0, 0.0, 1.5), max_sentences=300)
    out = run(spec, store=store)
    probes = run(probes_spec(out.spec, ("sentiment",)), store=store).result
    w, _, _ = direction(probes, "sentiment", 2, "positive")
    vec = torch.tensor(w / np.linalg.norm(w) * out.result.meta["residual_norm"], dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    ids = torch.tensor([list(out.spec.token_ids)])
    for amount in spec.amounts:
        def add(module, args, output, amount=amount):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, 1:] += amount * vec
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = hf.transformer.h[2].register_forward_hook(add)
        try:
            with torch.no_grad():
                probs = hf(ids).logits[0, -1].softmax(-1)
        finally:
            handle.remove()
        t = out.result.table[out.result.table["amount"] == amount]
        assert np.allclose(t["prob"].to_numpy(), probs[t["token_id"].to_numpy()].numpy(), atol=1e-5)


def test_tcav_scores_equal_directional_derivatives_by_autograd(default_handle, tmp_path):
    from analysis.analyses.tcav.compute import TCAVSpec

    store = Store(tmp_path / "s.duckdb")
    out = run(TCAVSpec(layers=(2, 4), n_examples=30, n_random=4, n_inputs=40), store=store)
    t, draws, cavs = out.result.table, out.result.extra["draws"], out.result.extra["cavs"]
    assert list(t["layer"]) == [2, 4] and len(draws) == 2 * 2 * 4 and len(cavs) == 2 * 4
    assert ((t["p_bonferroni"] >= t["p_value"]) & (t["p_bonferroni"] <= 1)).all()
    assert (t["significant"] == (t["p_bonferroni"] < 0.05)).all()
    shipped_ids = _shipped_ids(2000)
    target = out.result.meta["target_id"]
    for layer in (2, 4):
        grads = []
        for i in out.result.meta["inputs"]:  # the gradient of the target logit wrt the last token's residual
            ids = torch.tensor([shipped_ids[i][:-2]])  # the texts end '... near the'

            store_ = {}

            def grab(resid, hook):
                resid.retain_grad()
                store_["r"] = resid
                return resid

            with torch.enable_grad():
                logits = default_handle.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.hook_resid_post",
                                                                              grab)])
                logits[0, -1, target].backward()
            grads.append(store_["r"].grad[0, -1].numpy())
        G = np.stack(grads)
        for _, row in cavs[cavs["layer"] == layer].iterrows():
            want = float((G @ np.asarray(row["weight"]) > 0).mean())
            got = draws.query("layer == @layer and set == 'concept' and draw == @row.draw")["tcav"].iloc[0]
            assert got == pytest.approx(want, abs=1e-6)  # one input of 40 would differ by 0.025


def test_atlas_pca_equals_scikit_learn_and_umap_is_deterministic(default_handle, tmp_path):
    from sklearn.decomposition import PCA

    from analysis.analyses.atlas.compute import AtlasSpec

    store = Store(tmp_path / "s.duckdb")
    out = run(AtlasSpec(method="pca", layer=3, max_sentences=50, max_points=100_00), store=store)
    t = out.result.table
    ids = _shipped_ids(50)
    assert len(t) == sum(len(s) - 1 for s in ids)  # every token after BOS
    row = t.iloc[17]
    assert row["token"] == default_handle.tokenizer.decode([ids[row["text_index"]][row["position"]]])
    assert row["text"] == shipped()["text"].iloc[row["text_index"]]
    X = []
    with torch.no_grad():
        for s in ids:
            _, cache = default_handle.bridge.run_with_cache(torch.tensor([s]))
            X.append(cache["blocks.3.hook_resid_post"][0, 1:].numpy())
    want = PCA(n_components=2).fit_transform(np.concatenate(X))
    for k in range(2):  # equal up to each component's sign
        got = t[["x", "y"]].to_numpy()[:, k]
        assert min(np.abs(got - want[:, k]).max(), np.abs(got + want[:, k]).max()) < 1e-3
    a = run(AtlasSpec(method="umap", unit="text", max_sentences=120, seed=3), store=store).result.table
    b = run(AtlasSpec(method="umap", unit="text", max_sentences=120, seed=3),
            store=Store(tmp_path / "other.duckdb")).result.table
    assert len(a) == 120 and np.allclose(a[["x", "y"]], b[["x", "y"]])
    assert set(a.columns) >= {"text", "token", "sentiment", "tense", "number", "topic"}


def test_concept_analyses_run_on_three_architectures(tiny_dirs, tmp_path):
    from analysis.analyses.atlas.compute import AtlasSpec
    from analysis.analyses.bottleneck.compute import BottleneckSpec
    from analysis.analyses.intervention.compute import InterventionSpec
    from analysis.analyses.tcav.compute import TCAVSpec

    store = Store(tmp_path / "s.duckdb")
    for folder in tiny_dirs.values():
        m = str(folder)
        probes = run(ProbeSpec(model=m, max_sentences=120), store=store).result.table
        assert len(probes) == 4 * 3 and probes["accuracy"].between(0, 1).all()
        b = run(BottleneckSpec(model=m, max_sentences=120, n_random=2, target="topic"), store=store).result
        assert 0 <= b.meta["accuracy"] <= 1 and len(b.extra["random"]) == 2
        iv = run(InterventionSpec(model=m, max_sentences=120, amounts=(-1.0, 0.0, 1.0)), store=store).result
        assert len(iv.extra["groups"]) == 3 and np.isfinite(iv.table["prob"]).all()
        tc = run(TCAVSpec(model=m, n_examples=10, n_random=2, n_inputs=10, layers=(0, 1)), store=store).result
        assert tc.table["tcav_mean"].between(0, 1).all()
        at = run(AtlasSpec(model=m, method="pca", max_sentences=40), store=store).result
        assert len(at.table) > 40 and np.isfinite(at.table[["x", "y"]].to_numpy()).all()


def test_bad_concept_requests_are_refused_with_a_message(tmp_path):
    from analysis.analyses.intervention.compute import InterventionSpec
    from analysis.analyses.tcav.compute import TCAVSpec

    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match="no class 'happy'"):
        run(InterventionSpec(toward="happy", max_sentences=100), store=store)
    with pytest.raises(WorkbenchError, match="each must be one token"):
        run(InterventionSpec(tokens_up=(" lovely weather",), max_sentences=100), store=store)
    with pytest.raises(WorkbenchError, match="layer 9 does not exist"):
        run(InterventionSpec(layer=9, max_sentences=100), store=store)
    with pytest.raises(WorkbenchError, match="has no class 'snow'"):
        run(TCAVSpec(value="snow"), store=store)
    assert store.runs("intervention").empty and store.runs("tcav").empty


def test_csv_parsing_keeps_labels_as_text():
    df = parse_concepts_csv("text,score\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    assert df["score"].tolist()[:2] == ["0", "1"] and isinstance(df, pd.DataFrame)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_probe_fits_run_in_one_blas_thread_and_give_the_pools_back(monkeypatch):
    """scikit-learn's L-BFGS makes thousands of tiny BLAS calls: in OpenBLAS's pool of threads a 4-class probe
    of a random wide model took 15x longer than in one (1.3 s against 0.09 s, 2026-12-06). Each fit runs in one
    thread, in the main thread and in a server's worker thread alike; the pools come back after it, also when
    two fits overlap in two threads (never left at one thread)."""
    import threading

    from sklearn.linear_model import LogisticRegression

    from analysis.analyses.concepts.compute import fit_probe, one_blas_thread

    before = _blas_threads()
    assert before and max(before) > 1  # this box's pools (2 cores)
    seen, fit = [], LogisticRegression.fit

    def watched(self, X, y, *a, **k):
        seen.append(_blas_threads())
        return fit(self, X, y, *a, **k)

    monkeypatch.setattr(LogisticRegression, "fit", watched)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 16)), np.repeat(["a", "b", "c", "d"], 50)

    def one_fit():
        probe = fit_probe(X[:160], y[:160], X[160:], y[160:], 1.0, 0)
        assert probe.weight.shape == (4, 16)

    one_fit()
    worker = threading.Thread(target=one_fit)
    worker.start()
    worker.join()
    assert seen == [[1] * len(before)] * 2 and _blas_threads() == before

    # two overlapping fits in two threads: the pools are the same as before once both are done
    first_in, release = threading.Event(), threading.Event()

    def long_fit():
        with one_blas_thread():
            first_in.set()
            release.wait(10)

    t = threading.Thread(target=long_fit)
    t.start()
    first_in.wait(10)
    with one_blas_thread():
        one_fit()
    release.set()
    t.join()
    assert _blas_threads() == before
