"""Sparse features: SAE training and the SAELens folder format, the splice, feature pages, feature attribution
against patching the features, steering, and discover-then-name — each checked against an independent
computation (plain transformers with our own hooks, scikit-learn, a formula written out, a brute-force loop)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.analyses.features.attribution import FeatureAttributionSpec
from analysis.analyses.features.browse import FeaturesSpec
from analysis.analyses.features.naming import FeatureNamesSpec
from analysis.analyses.features.sae import SAESpec, load_folder, sae_from_result, saelens_zip, save_folder
from analysis.analyses.features.steer import FeatureEncodeSpec, SteerSpec
from analysis.errors import WorkbenchError
from analysis.runner import run
from analysis.session import ModelSession
from analysis.store import Store
from kernels.sae import SparseAutoencoder, splice_hook

TINY_SAE = dict(width=64, k=4, steps=60, max_tokens=2048, batch_tokens=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("features") / "s.duckdb")


@pytest.fixture(scope="module")
def default_sae(store):
    """The page's default SAE on the default model (a middle layer's residual)."""
    return run(SAESpec(), store=store)


def _hf(handle):
    """The plain transformers model under the bridge (our independent reference)."""
    return handle.bridge.original_model


def _resid_post(handle, ids, layer):
    """The residual after block `layer` ([P, d]): the output of the transformers block, caught by a hook."""
    got = {}
    hook = _hf(handle).transformer.h[layer].register_forward_hook(
        lambda mod, inp, out: got.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            _hf(handle)(torch.tensor([ids]))
    finally:
        hook.remove()
    return got["h"][0]


# ----------------------------------------------------------------------------------------------------------
# Training and the figures it reports
# ----------------------------------------------------------------------------------------------------------
def test_default_sae_meets_the_target_on_held_out_text(default_sae, default_handle):
    m = default_sae.result.meta
    assert default_sae.spec.layer == 2 and m["hook_name"] == "blocks.2.hook_resid_post"  # the middle block
    assert m["fve"] >= 0.9 and m["l0"] <= 32 and m["dead_fraction"] < 0.05, m
    assert m["ce_with_sae"] < m["ce_zero_ablated"] and m["ce_loss_recovered"] > 0.9
    assert "held out whole" in m["held_out"] and m["n_heldout_tokens"] > 1000
    # FVE recomputed from plain transformers hidden states of the held-out sentences (not our activation code)
    from analysis.analyses.features.sae import corpus_split
    with ModelSession(default_handle) as s:
        _, held, _ = corpus_split(s, default_sae.spec)
    X = torch.cat([_resid_post(default_handle, ids, 2)[1:] for ids in held])  # BOS position left out
    sae, _ = sae_from_result(default_sae.result)
    with torch.no_grad():
        recon = sae(X)
    fve = 1 - float((recon - X).pow(2).sum() / (X - X.mean(0)).pow(2).sum())
    assert abs(fve - m["fve"]) < 1e-4
    assert m["l0"] == pytest.approx(float((sae.encode(X) > 0).sum(-1).float().mean()), abs=1e-4)


def test_relu_l1_with_resampling_trains_and_is_sparse(store):
    out = run(SAESpec(architecture="standard", dead="resample", width=256, steps=400, l1_coefficient=3.0),
              store=store)
    m = out.result.meta
    assert m["architecture"] == "standard" and m["k"] is None
    assert m["fve"] > 0.6 and 0 < m["l0"] < 128  # sparse: far fewer than the 256 features fire on a token
    assert len(out.result.extra["loss"]) > 0


def test_bad_settings_get_messages(tmp_path):
    with pytest.raises(WorkbenchError, match="AuxK loss is for TopK"):
        SAESpec(architecture="standard", dead="auxk").validate()
    with pytest.raises(WorkbenchError, match="more than the SAE's 8 features"):
        SAESpec.from_dict({"width": 8, "k": 16})
    with pytest.raises(WorkbenchError, match="not trained here"):
        SAESpec.from_dict({"architecture": "jumprelu"})
    with pytest.raises(WorkbenchError, match="layer 9 does not exist"):
        run(SAESpec(layer=9), store=Store(tmp_path / "s.duckdb"))


# ----------------------------------------------------------------------------------------------------------
# The splice and the SAELens folder format
# ----------------------------------------------------------------------------------------------------------
def _random_sae(d: int, width: int, arch: str = "topk", seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, width, arch, k=5)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def test_splice_with_error_term_leaves_the_output_unchanged(tiny_handle):
    """On every tiny architecture: the SAE spliced in with its error term kept changes no logit by more than
    1e-5; without it, the output changes (the SAE is a random one)."""
    d = tiny_handle.summary.d_model
    sae = _random_sae(d, 4 * d)
    ids = torch.tensor([[0, 5, 17, 300, 42, 9, 11]])
    with ModelSession(tiny_handle) as s:
        hook = s.hook("resid_post", 0)
        with torch.no_grad():
            clean = s.forward(ids)
            kept = s.run_with_hooks(ids, [(hook, splice_hook(sae, keep_error=True))])
            lost = s.run_with_hooks(ids, [(hook, splice_hook(sae, keep_error=False))])
    assert (kept - clean).abs().max() <= 1e-5
    assert (lost - clean).abs().max() > 1e-2


def test_saelens_folder_round_trip(default_sae, tmp_path):
    sae, cfg = sae_from_result(default_sae.result)
    folder = save_folder(sae, cfg, tmp_path / "sae")
    written = json.loads((folder / "cfg.json").read_text())
    # the fields SAELens 6 writes and reads (SAEConfig.to_dict, TopKSAEConfig.k, SAEMetadata)
    assert {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "k", "metadata"} <= set(written)
    assert written["architecture"] == "topk" and written["k"] == 16 and written["d_in"] == 128
    assert written["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and written["metadata"]["hook_layer"] == 2
    from safetensors.torch import load_file
    assert set(load_file(str(folder / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    back, cfg_back, _ = load_folder(str(folder))
    x = torch.randn(50, 128) * 3
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert cfg_back["hook_name"] == "blocks.2.hook_resid_post" and cfg_back["k"] == 16
    # the page's download: the same folder, zipped
    import io
    import zipfile
    zipfile.ZipFile(io.BytesIO(saelens_zip(default_sae.result))).extractall(tmp_path / "unzipped")
    unzipped, _, _ = load_folder(str(tmp_path / "unzipped"))
    assert torch.equal(unzipped.encode(x), sae.encode(x))


def _write_folder(path, cfg: dict, weights: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: torch.as_tensor(v, dtype=torch.float32).contiguous() for k, v in weights.items()},
              str(path / "sae_weights.safetensors"))
    return str(path)


def _hand_weights(d: int, w: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(d, w)), "b_enc": rng.normal(size=w) * 0.1, "W_dec": rng.normal(size=(w, d)),
            "b_dec": rng.normal(size=d)}


def test_hand_written_saelens_folders_encode_as_their_formulas(tmp_path):
    d, w = 128, 24
    W = _hand_weights(d, w)
    x = np.random.default_rng(2).normal(size=(10, d)) * 2
    pre = (x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]  # apply_b_dec_to_input: true

    # SAELens 6, TopK: the k largest pre-activations, relu on them, the rest 0
    topk = _write_folder(tmp_path / "topk", {
        "architecture": "topk", "d_in": d, "d_sae": w, "k": 3, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "default", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3,
                     "sae_lens_version": "6.5.0"}}, W)
    sae, cfg, _ = load_folder(topk)
    want = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:3]
        want[i, top] = np.maximum(row[top], 0)
    got = sae.encode(torch.tensor(x, dtype=torch.float32)).numpy()
    assert np.allclose(got, want, atol=1e-4) and cfg["k"] == 3
    recon = sae.decode(torch.tensor(want, dtype=torch.float32)).numpy()
    assert np.allclose(recon, want @ W["W_dec"] + W["b_dec"], atol=1e-3)

    # an older SAELens config: hook_point / activation_fn_str at the top level, ReLU, no b_dec subtraction
    relu = _write_folder(tmp_path / "relu", {
        "d_in": d, "d_sae": w, "hook_point": "blocks.1.hook_mlp_out", "hook_point_layer": 1,
        "activation_fn_str": "relu", "apply_b_dec_to_input": False, "model_name": "gpt2-small",
        "normalize_activations": False}, W)
    sae, cfg, _ = load_folder(relu)
    want = np.maximum(x @ W["W_enc"] + W["b_enc"], 0)
    assert np.allclose(sae.encode(torch.tensor(x, dtype=torch.float32)).numpy(), want, atol=1e-4)
    assert cfg["architecture"] == "standard" and cfg["hook_name"] == "blocks.1.hook_mlp_out"

    # JumpReLU (Gemma Scope's kind): pre-activation where it passes the feature's threshold, else 0
    thr = np.abs(np.random.default_rng(3).normal(size=w))
    jump = _write_folder(tmp_path / "jump", {
        "architecture": "jumprelu", "d_in": d, "d_sae": w, "apply_b_dec_to_input": False,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.0.hook_resid_post",
                                                      "sae_lens_version": "6.0.0"}}, {**W, "threshold": thr})
    sae, _, _ = load_folder(jump)
    pre = x @ W["W_enc"] + W["b_enc"]
    assert np.allclose(sae.encode(torch.tensor(x, dtype=torch.float32)).numpy(), pre * (pre > thr), atol=1e-4)


def test_loading_a_folder_through_the_runner(default_sae, store, tmp_path):
    """A SAELens folder loads for the model it fits, is evaluated like a trained one, and is keyed by its
    content: the same SAE saved and loaded gives the trained SAE's figures."""
    sae, cfg = sae_from_result(default_sae.result)
    folder = save_folder(sae, cfg, tmp_path / "saved")
    out = run(SAESpec(source="folder", folder=str(folder)), store=store)
    assert out.spec.layer == 2 and out.spec.site == "resid_post" and out.spec.k == 16 and out.spec.width == 512
    assert len(out.spec.folder_sha256) == 64
    assert out.result.meta["fve"] == pytest.approx(default_sae.result.meta["fve"], abs=1e-6)
    assert out.result.meta["ce_loss_recovered"] == pytest.approx(default_sae.result.meta["ce_loss_recovered"],
                                                                 abs=1e-6)


def test_folders_that_do_not_fit_get_messages(tmp_path, monkeypatch):
    store = Store(tmp_path / "s.duckdb")
    W = _hand_weights(64, 8)
    base = {"architecture": "standard", "d_in": 64, "d_sae": 8, "metadata": {"hook_name": "blocks.1.hook_resid_post",
                                                                             "sae_lens_version": "6.0.0"}}
    wrong_width = _write_folder(tmp_path / "w", base, W)
    with pytest.raises(WorkbenchError, match="reads 64-dimensional activations.*d_model 128"):
        run(SAESpec(source="folder", folder=wrong_width), store=store)
    W128 = _hand_weights(128, 8)
    deep = _write_folder(tmp_path / "deep", {**base, "d_in": 128, "metadata": {"hook_name": "blocks.40.hook_resid_post"}},
                         W128)
    with pytest.raises(WorkbenchError, match="blocks 0 to 5"):
        run(SAESpec(source="folder", folder=deep), store=store)
    hook_z = _write_folder(tmp_path / "z", {**base, "d_in": 128, "metadata": {"hook_name": "blocks.1.attn.hook_z"}},
                           W128)
    with pytest.raises(WorkbenchError, match="hook_z"):
        run(SAESpec(source="folder", folder=hook_z), store=store)
    shapes = _write_folder(tmp_path / "shapes", {**base, "d_in": 128}, {**W128, "b_dec": np.zeros(7)})
    with pytest.raises(WorkbenchError, match="b_dec has shape"):
        run(SAESpec(source="folder", folder=shapes), store=store)
    with pytest.raises(WorkbenchError, match="not a folder holding cfg.json"):
        run(SAESpec(source="folder", folder=str(tmp_path / "nothing")), store=store)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "cfg.json").write_text("{not json")
    (tmp_path / "badjson" / "sae_weights.safetensors").write_bytes(b"x")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        run(SAESpec(source="folder", folder=str(tmp_path / "badjson")), store=store)
    monkeypatch.setenv("WORKBENCH_ALLOW_LOCAL_FOLDERS", "0")
    with pytest.raises(WorkbenchError, match="does not read folders on the server"):
        run(SAESpec(source="folder", folder=shapes), store=store)
    assert store.count() == 0  # nothing stored by any of them


# ----------------------------------------------------------------------------------------------------------
# Feature pages and search
# ----------------------------------------------------------------------------------------------------------
def test_feature_pages_agree_with_a_brute_force_pass(default_sae, store, default_handle):
    out = run(FeaturesSpec(), store=store)
    r = out.result
    sae, _ = sae_from_result(default_sae.result)
    from analysis.analyses.features.sae import corpus_split
    with ModelSession(default_handle) as s:
        train, held, _ = corpus_split(s, out.spec)
    seqs = train + held
    # brute force over every sentence with plain transformers: each feature's max and its firing count
    acts = torch.cat([sae.encode(_resid_post(default_handle, ids, 2)[1:]) for ids in seqs])
    assert r.meta["n_tokens"] == acts.shape[0]
    t = r.table.set_index("feature")
    assert np.allclose(t["max_activation"].to_numpy(), acts.max(0).values.numpy(), atol=1e-4)
    assert np.allclose(t["density"].to_numpy(), (acts > 0).float().mean(0).numpy(), atol=1e-6)
    ex = r.extra["examples"]
    f = int(t["max_activation"].idxmax())
    top = ex[ex["feature"] == f].sort_values("rank")
    assert top["activation"].iloc[0] == pytest.approx(float(acts[:, f].max()), abs=1e-4)
    e = top.iloc[0]  # the context: the token ids around the peak, the peak at max_index
    ids = seqs[int(e["sequence"])]
    assert ids[int(e["position"])] == e["token_ids"][int(e["max_index"])]
    assert e["activations"][int(e["max_index"])] == pytest.approx(e["activation"], abs=1e-4)
    hist = r.extra["histograms"]
    assert hist[hist["feature"] == f]["count"].sum() == int((acts[:, f] > 0).sum())
    # logit effects: the decoder row times the unembedding of plain transformers
    lg = r.extra["logits"]
    eff = (sae.W_dec[f] @ _hf(default_handle).lm_head.weight.T).detach()
    promoted = lg[(lg["feature"] == f) & (lg["direction"] == "promotes")].sort_values("rank")
    assert promoted["token_id"].tolist() == eff.topk(len(promoted)).indices.tolist()
    assert np.allclose(promoted["effect"].to_numpy(), eff.topk(len(promoted)).values.numpy(), atol=1e-4)
    # the token index: a feature's mean activation over every occurrence of a token
    by = r.extra["by_token"]
    row = by.iloc[0]
    flat = torch.tensor([i for ids in seqs for i in ids[1:]])
    occ = flat == int(row["token_id"])
    assert row["mean_activation"] == pytest.approx(float(acts[occ, int(row["feature"])].mean()), abs=1e-4)


def test_search_by_text_lists_each_tokens_features(default_sae, store, default_handle):
    out = run(FeatureEncodeSpec(prompt="The capital of France is Paris."), store=store)
    sae, _ = sae_from_result(default_sae.result)
    ids = list(out.spec.token_ids)
    acts = sae.encode(_resid_post(default_handle, ids, 2))
    t = out.result.table
    last = t[t["position"] == len(ids) - 1].sort_values("rank")
    assert last["feature"].tolist() == acts[-1].topk(len(last)).indices.tolist()
    assert 0 not in set(t["position"])  # the BOS position is not read


# ----------------------------------------------------------------------------------------------------------
# Attribution
# ----------------------------------------------------------------------------------------------------------
def test_feature_attribution_matches_patching_the_features(default_sae, store, default_handle):
    out = run(FeatureAttributionSpec(n_pairs=3), store=store)
    m, t = out.result.meta, out.result.table
    assert m["n_patched"] == m["n_nodes"] > 100
    assert m["pearson_atp"] > 0.9 and m["pearson_relp"] > 0.7, m
    sae, _ = sae_from_result(default_sae.result)
    hf = _hf(default_handle)
    pairs = json.loads(out.spec.pairs)

    def metric(ids, pair, edit=None):
        handle = None
        if edit is not None:
            handle = hf.transformer.h[2].register_forward_hook(
                lambda mod, inp, output: (edit(output[0]),) + tuple(output[1:]) if isinstance(output, tuple)
                else edit(output))
        try:
            logits = hf(torch.tensor([ids])).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        return logits[pair["answer_id"]] - logits[pair["wrong_id"]]

    # activation patching of single features, recomputed with a hook on the transformers block: the feature's
    # change times its decoder direction (what the SAE with its error term gives) added at that position
    for node in t.reindex(t["activation"].abs().sort_values(ascending=False).index).head(5).itertuples():
        pair = pairs[node.pair]
        base = pair["corrupted_ids"]
        with torch.no_grad():
            before = metric(base, pair)

            def edit(h, node=node):
                h = h.clone()
                h[0, node.position] += float(node.delta) * sae.W_dec[node.feature].detach()
                return h
            after = metric(base, pair, edit)
        assert float(after - before) == pytest.approx(node.activation, abs=2e-3)
        # AtP: the change times the gradient of the metric at that position along the decoder direction
        h_grad = {}

        def keep_grad(h):
            h.retain_grad()
            h_grad["h"] = h
            return h
        hf.zero_grad()
        metric(base, pair, keep_grad).backward()
        g = h_grad["h"].grad[0, node.position]
        assert float(node.delta * (g @ sae.W_dec[node.feature].detach())) == pytest.approx(node.atp, abs=2e-3)


# ----------------------------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------------------------
def test_steering_adds_the_direction_and_ablation_and_clamping_act_inside_the_sae(default_sae, store,
                                                                                  default_handle):
    prompt = "The weather was"
    zero = run(SteerSpec(prompt=prompt, feature=3, strength=0.0, generate=4), store=store)
    assert zero.result.meta["kl_before_after"] == pytest.approx(0.0, abs=1e-9)
    assert zero.result.meta["generated_before"] == zero.result.meta["generated_after"]
    sae, _ = sae_from_result(default_sae.result)
    ids = list(zero.spec.token_ids)
    acts = sae.encode(_resid_post(default_handle, ids, 2))[:, :]
    active = int(acts[-1].argmax())  # the strongest feature at the last token
    push = run(SteerSpec(prompt=prompt, feature=active, strength=-12.0, generate=4), store=store)
    hf = _hf(default_handle)
    direction = sae.W_dec[active].detach() / sae.W_dec[active].detach().norm()

    def steered(mod, inp, output):
        h = output[0].clone() if isinstance(output, tuple) else output.clone()
        h[0, 1:] += -12.0 * direction
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    handle = hf.transformer.h[2].register_forward_hook(steered)
    try:
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, -1].softmax(-1)
    finally:
        handle.remove()
    t = push.result.table.set_index("token_id")
    assert np.allclose(t["p_after"].to_numpy(), want[list(t.index)].numpy(), atol=1e-5)
    assert push.result.meta["kl_before_after"] > 1e-3
    ablate = run(SteerSpec(prompt=prompt, feature=active, mode="ablate", generate=0), store=store)
    clamp = run(SteerSpec(prompt=prompt, feature=active, mode="clamp", strength=float(acts[-1, active]),
                          where="last", generate=0), store=store)
    assert ablate.result.meta["kl_before_after"] > 1e-6
    assert clamp.result.meta["kl_before_after"] == pytest.approx(0.0, abs=1e-6)  # clamped to its own value
    with pytest.raises(WorkbenchError, match="Feature 9999 does not exist"):
        run(SteerSpec(prompt=prompt, feature=9999), store=store)


def test_steering_with_a_probe_direction(store, default_handle):
    """A probe direction (the concept's unit direction at the SAE's layer) added at every position after BOS: equal
    to the same push through a hook on the transformers block."""
    from analysis.analyses.concepts.compute import ProbeSpec, direction

    out = run(SteerSpec(prompt="The food was", steer_with="probe", concept="sentiment", toward="negative",
                        strength=20.0, generate=0, answer=" awful", wrong=" lovely"), store=store)
    m = out.result.meta
    assert "sentiment" in m["steered"] and "negative" in m["steered"] and m["metric_after"] != m["metric_before"]
    probes = run(ProbeSpec(concepts=("sentiment",)), store=store)
    assert probes.hit  # the steering's input: the probes over the shipped sentences
    w, _, cls = direction(probes.result, "sentiment", 2, "negative")
    u = torch.tensor(w / np.linalg.norm(w), dtype=torch.float32)
    ids = list(out.spec.token_ids)
    hf = _hf(default_handle)

    def push(mod, inp, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[0, 1:] += 20.0 * u
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    handle = hf.transformer.h[2].register_forward_hook(push)
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        handle.remove()
    t = out.result.table.set_index("token_id")
    assert np.allclose(t["p_after"].to_numpy(), logits.softmax(-1)[list(t.index)].numpy(), atol=1e-5)
    a, b = (default_handle.tokenizer.encode(t, add_special_tokens=False) for t in (" awful", " lovely"))
    assert m["metric_after"] == pytest.approx(float(logits[a[0]] - logits[b[0]]), abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Discover-then-name
# ----------------------------------------------------------------------------------------------------------
def test_discover_then_name_finds_a_topic_feature_and_compares_bottlenecks(default_sae, store):
    from sklearn.metrics import roc_auc_score

    from analysis.analyses.concepts.compute import split
    from analysis.analyses.features.naming import pooled_features
    from analysis.concept_data import shipped
    from analysis.tokens import encode_texts

    out = run(FeatureNamesSpec(), store=store)
    names, m = out.result.table, out.result.meta
    topic = names[names["concept"] == "topic"]
    assert len(topic) >= 2  # features named after topics, e.g. "topic: weather"
    best = topic.sort_values("heldout_auroc", ascending=False).iloc[0]
    assert best["name"].startswith("topic: ") and best["heldout_auroc"] > 0.9
    # its held-out AUROC recomputed with scikit-learn from the pooled activations
    sae, _ = sae_from_result(default_sae.result)
    data = shipped()
    from analysis import load_model
    with ModelSession(load_model("default")) as s:
        seqs = encode_texts(s, data["text"], 2, "yes")
        F, _, _ = pooled_features(s, sae, "blocks.2.hook_resid_post", seqs, True, "last")
    _, te = split(len(data), 0.2, 0)
    y = data["topic"].to_numpy()[te] == best["class"]
    assert roc_auc_score(y, F[te, int(best["feature"])]) == pytest.approx(best["heldout_auroc"], abs=1e-9)
    summary = out.result.extra["summary"].set_index("bottleneck")
    named = summary.loc["named SAE features (discover-then-name)"]
    probes = summary.loc["probe directions (Concepts page)"]
    assert named["accuracy"] == m["accuracy"] and probes["accuracy"] == m["probe_accuracy"]
    # at the last token the named features explain the choice far beyond as many random features (leakage)
    assert named["accuracy"] > named["random_accuracy"] + 0.2 and named["random_accuracy"] > 0
    assert "held-out" in m["measured_on"]


# ----------------------------------------------------------------------------------------------------------
# Every architecture
# ----------------------------------------------------------------------------------------------------------
def test_every_feature_analysis_runs_on_each_tiny_architecture(tiny_handle, tmp_path):
    store = Store(tmp_path / "s.duckdb")
    model = tiny_handle.name
    sae = run(SAESpec(model=model, **TINY_SAE), store=store)
    assert sae.spec.layer == 0 and 0 < sae.result.meta["l0"] <= 4
    runs = [FeaturesSpec(model=model, top_n=3, **TINY_SAE),
            FeatureEncodeSpec(model=model, prompt="The capital of France is", **TINY_SAE),
            FeatureAttributionSpec(model=model, n_pairs=2, **TINY_SAE),
            SteerSpec(model=model, prompt="The weather was", feature=1, generate=3, **TINY_SAE),
            FeatureNamesSpec(model=model, max_sentences=120, n_random=1, concepts=("topic",), min_auroc=0.5,
                             **TINY_SAE)]
    for spec in runs:
        out = run(spec, store=store)
        assert len(out.result.table) > 0, spec.analysis
        assert run(spec, store=store).hit
    attribution = run(runs[2], store=store).result.meta
    assert attribution["n_patched"] > 0 and np.isfinite(attribution["pearson_atp"])


def test_sae_training_lets_a_waiting_run_in(tmp_path):
    """Training reads only the gathered activations: a short run that starts while an SAE trains gets the model
    between training steps instead of waiting for the whole training, and the SAE equals one trained alone."""
    import threading
    import time

    from analysis.analyses.lens.spec import LensSpec

    sae_spec = SAESpec(width=256, k=8, steps=400)
    alone = run(sae_spec, store=Store(tmp_path / "alone.duckdb"))
    shared, done, errors, training = Store(tmp_path / "shared.duckdb"), {}, [], threading.Event()

    def progress(frac, what):
        if what.startswith("training"):
            training.set()

    def go(name, spec, wait):
        try:
            if wait:
                assert training.wait(timeout=300)
            out = run(spec, store=shared, progress=None if wait else progress)
            done[name] = (time.perf_counter(), out)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=go, args=("sae", sae_spec, False)),
               threading.Thread(target=go, args=("lens", LensSpec(prompt="The capital of Japan is"), True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert done["lens"][0] < done["sae"][0]  # it did not wait for the whole training
    a, _ = sae_from_result(alone.result)
    b, _ = sae_from_result(done["sae"][1].result)
    assert torch.allclose(a.W_enc, b.W_enc, atol=1e-5) and torch.allclose(a.W_dec, b.W_dec, atol=1e-5)
