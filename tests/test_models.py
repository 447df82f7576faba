"""Model loading: the default model, three tiny architectures, the cache, and every error a person can cause."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from analysis import WorkbenchError, load_model
from analysis.analyses.model_view.compute import next_token_predictions
from analysis.models import DEFAULT_MODEL_DIR, MODEL_CACHE, ModelCache, list_checkpoints
from analysis.tokens import encode

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# Loading what exists
# ----------------------------------------------------------------------------------------------------------
def test_default_model_summary_matches_its_config(default_handle):
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    s = default_handle.summary
    assert (s.n_layers, s.n_heads, s.d_model, s.d_vocab, s.n_ctx) == (
        cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"])
    assert s.architecture == "GPT2LMHeadModel"
    assert (s.norm, s.attention, s.positions, s.block) == ("LayerNorm", "multi-head", "learned absolute", "sequential")
    assert s.mlp.startswith("GELU")
    # the parameter count is the HF model's own (tied embeddings counted once)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    assert s.n_params == hf.num_parameters()
    assert 1_000_000 <= s.n_params <= 5_000_000
    assert s.device == "cpu" and s.dtype == "float32"
    assert len(default_handle.fingerprint) == 32


def test_tiny_architectures_load_and_match_transformers(tiny_handle):
    """The bridge's logits equal those of the plain transformers model loaded from the same folder."""
    from transformers import AutoModelForCausalLM

    ids = encode(tiny_handle, "Then, John and Mary went to the store.")
    hf = AutoModelForCausalLM.from_pretrained(tiny_handle.path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    top = next_token_predictions(tiny_handle, ids, k=5)
    assert top["token_id"].tolist() == ref.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(top["logit"].tolist()), ref.topk(5).values, rtol=1e-4, atol=1e-4)


def test_tiny_summaries_describe_each_architecture(tiny_dirs):
    s = {arch: load_model(str(d)).summary for arch, d in tiny_dirs.items()}
    assert (s["gpt2"].norm, s["gpt2"].positions, s["gpt2"].attention) == ("LayerNorm", "learned absolute", "multi-head")
    assert (s["llama"].norm, s["llama"].mlp, s["llama"].positions) == ("RMSNorm", "gated SiLU", "rotary")
    assert s["llama"].n_kv_heads == 2 and s["llama"].attention == "grouped-query (2 key/value heads)"
    assert (s["neox"].positions, s["neox"].block) == ("rotary", "parallel attention + MLP")


def test_dtype_is_selectable(tiny_dirs):
    h32 = load_model(str(tiny_dirs["gpt2"]))
    h16 = load_model(str(tiny_dirs["gpt2"]), dtype="bfloat16")
    assert h16 is not h32
    assert h16.summary.dtype == "bfloat16"
    assert next(h16.bridge.original_model.parameters()).dtype == torch.bfloat16
    assert h16.fingerprint != h32.fingerprint  # different bytes, different results: never share a cache row
    ids = encode(h32, "The capital of France is")
    a = next_token_predictions(h32, ids, k=3)
    b = next_token_predictions(h16, ids, k=3)
    assert abs(a["logit"][0] - b["logit"][0]) < 0.1


def test_fingerprint_is_content_hash(tmp_path, tiny_dirs):
    src = tiny_dirs["gpt2"]
    fp = load_model(str(src)).fingerprint
    # an identical copy under the same folder name has the same fingerprint
    same = tmp_path / "a" / src.name
    shutil.copytree(src, same)
    assert load_model(str(same)).fingerprint == fp
    # one changed weight changes it
    changed = tmp_path / "b" / src.name
    save_tiny_model("gpt2", changed, seed=0)
    from safetensors.torch import load_file, save_file

    w = load_file(changed / "model.safetensors")
    key = sorted(w)[3]
    w[key] = w[key].clone()
    w[key].view(-1)[0] += 1e-3
    save_file(w, changed / "model.safetensors", metadata={"format": "pt"})
    assert load_model(str(changed)).fingerprint != fp


def test_cache_returns_same_handle_and_loads_once_under_threads(tiny_dirs):
    cache = ModelCache(max_models=2)
    out = []

    def worker():
        out.append(cache.get(str(tiny_dirs["neox"])))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(h) for h in out}) == 1 and cache.loads == 1
    # least recently used model leaves first when the cache is full
    cache.get(str(tiny_dirs["gpt2"]))
    cache.get(str(tiny_dirs["llama"]))
    assert cache.loads == 3 and len(cache.loaded()) == 2
    assert str(tiny_dirs["neox"]) not in {h.path for h in cache.loaded()}


def test_checkpoints_load_through_the_same_path():
    ckpts = list_checkpoints()
    assert len(ckpts) >= 6
    steps = [s for s, _ in ckpts]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    h = load_model(str(ckpts[0][1]))
    assert h.summary.n_layers == load_model("default").summary.n_layers


# ----------------------------------------------------------------------------------------------------------
# Errors a person can cause: a clear message, and nothing cached
# ----------------------------------------------------------------------------------------------------------
def _error(name, **kw) -> str:
    before = MODEL_CACHE.loads
    with pytest.raises(WorkbenchError) as e:
        load_model(name, **kw)
    assert MODEL_CACHE.loads == before
    return str(e.value)


def test_bad_names_and_options():
    assert "No model given" in _error("  ")
    assert "neither an existing folder nor a valid Hugging Face model id" in _error("not a model id!")
    assert "There is no folder at" in _error("/no/such/folder/anywhere")
    assert "There is no folder at" in _error("./missing-model-dir")
    assert "Unknown dtype" in _error("default", dtype="float8")
    assert "Unknown device" in _error("default", device="tpu")
    if not torch.cuda.is_available():
        assert "No CUDA GPU" in _error("default", device="cuda")
    assert "applies to hub ids, not to a local folder" in _error("default", revision="main")


def test_folders_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _error(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("hello")
    assert "is a file, not a model folder" in _error(str(tmp_path / "file.txt"))
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    assert "is not valid JSON" in _error(str(bad))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "config.json", noweights / "config.json")
    assert "no weights" in _error(str(noweights))


def test_unsupported_architecture(tmp_path):
    from transformers import CTRLConfig, CTRLLMHeadModel

    folder = tmp_path / "ctrl"
    CTRLLMHeadModel(CTRLConfig(vocab_size=64, n_positions=16, n_embd=16, dff=32, n_layer=1, n_head=2)).save_pretrained(folder)
    msg = _error(str(folder))
    assert "CTRLLMHeadModel" in msg and "does not support" in msg and "LlamaForCausalLM" in msg


def test_not_enough_memory_is_refused_before_loading(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2Config

    folder = tmp_path / "huge"
    folder.mkdir()
    GPT2Config(n_embd=12288, n_layer=96, n_head=96, vocab_size=50257).save_pretrained(folder)  # ~175 B parameters
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    msg = _error(str(folder))
    assert "Not enough memory" in msg and "GiB" in msg and "bfloat16" in msg
    assert "fits in no dtype here" in msg  # 175 B parameters fit nowhere on this machine


def test_the_memory_check_says_which_dtype_would_fit(tmp_path, monkeypatch):
    """A model too large in float32 but not in bfloat16: the message says so (and bfloat16 then loads)."""
    from analysis import models

    folder = save_tiny_model("llama", tmp_path / "llama")
    n = models.estimate_parameters(models._load_config(models._resolve_request(str(folder), None, "cpu", "float32",
                                                                               False)))
    free = (models.load_need(n, "float32") + models.load_need(n, "bfloat16")) // 2  # between the two
    monkeypatch.setattr(models, "available_memory", lambda device: free)
    msg = _error(str(folder))
    assert "In bfloat16 or float16 it would fit" in msg, msg
    assert load_model(str(folder), dtype="bfloat16").dtype == "bfloat16"


def test_remote_code_stays_off_unless_asked(tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    marker = tmp_path / "executed"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import GPT2Config\nclass CustomConfig(GPT2Config):\n    model_type = 'custom-gpt'\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="custom-gpt", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _error(str(folder))
    assert "trust_remote_code" in msg
    assert not marker.exists()  # the folder's code never ran


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = _error("EleutherAI/pythia-70m")
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers like the hub does for a repository that does not exist."""

    def _answer(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def _load_in_subprocess(name: str, env: dict) -> str:
    code = ("from analysis import load_model, WorkbenchError\n"
            f"try:\n    load_model({name!r})\nexcept WorkbenchError as e:\n    print('ERROR:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    return out.stdout + out.stderr


def test_unknown_hub_id(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = _load_in_subprocess("someone/no-such-model", {
            "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            "HF_HOME": str(tmp_path / "hf")})
    finally:
        server.shutdown()
    assert "ERROR: There is no model called 'someone/no-such-model'" in out, out


def test_hub_unreachable(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _load_in_subprocess("gpt2", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                       "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2",
                                       "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert "ERROR: gpt2 is not in the local Hugging Face cache and the hub cannot be reached" in out, out
