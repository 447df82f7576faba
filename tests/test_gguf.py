"""GGUF files as llama.cpp writes them (issue 27): every ggml type `gguf` dequantises loads and gives
`gguf.quants.dequantize`'s values; every family that transformers reads from GGUF and the bridge supports loads, its
bridge logits equal plain transformers' on the same file, the lens's last layer is the output and activation patching
equals TransformerLens's `patching`; and the errors name the real cause (a truncated file, an architecture or a
tensor type that cannot be read). The files are tiny random models written by tests/gguf_files.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf_files import (
    FAMILIES,
    GGUF_ARCH,
    INTERMEDIATE,
    SLIDING_WINDOW,
    dequantised_copy,
    dequantizable_types,
    source_model,
    tensor_types,
    unpermute,
    write_tiny_gguf,
)
from test_patching import AXES, TEXT_PAIRS, _grid, _tl_reference

from analysis import WorkbenchError, load_model
from analysis.analyses.lens.spec import LensSpec
from analysis.analyses.patching.spec import PatchingSpec
from analysis.runner import run
from analysis.store import Store

PROMPT = "Then, John and Mary went to the store. John gave a ring to"
# a small sweep (TransformerLens's reference runs the model once per cell): per position and per head
PATCH_COMPONENTS = ("resid_pre", "mlp_out", "z_all_pos", "pattern_all_pos")


def _plain_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("gguf-store") / "s.duckdb")


@pytest.fixture(scope="module", params=FAMILIES)
def family_file(request, tmp_path_factory):
    """(family, path) of the family's tiny model written as a Q4_K_M-style GGUF file, one folder each."""
    return request.param, write_tiny_gguf(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"))


# --- the files themselves ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_an_all_f32_file_is_the_source_model(family, tmp_path):
    """The writer's check: transformers reads an all-F32 file back into the model it was written from (names,
    metadata, Llama's q/k permutation, Gemma's norm offset, GPT-2's transposes, BLOOM's q/k/v order, experts)."""
    path = write_tiny_gguf(family, tmp_path, types="F32")
    src, read = source_model(family), _plain_transformers(path)
    ids = torch.tensor([[5, 77, 300, 12, 260, 40, 101, 9, 265, 33, 270, 2, 280, 15, 290]])
    with torch.no_grad():
        a, b = src(ids).logits, read(ids).logits
    assert (a - b).abs().max().item() <= 1e-5, family
    if family in ("gemma2", "gemma3"):  # the sliding window is shorter than the prompts: it changes the output
        assert src.config.sliding_window == SLIDING_WINDOW < ids.shape[1]
        src.config.sliding_window = 10 ** 4
        with torch.no_grad():
            assert (src(ids).logits - a).abs().max().item() > 0.1


def test_q4_k_m_mixes_types_as_llama_cpp_does(family_file):
    """F32 vectors; K-quants on rows of 256; Q5_0 / Q8_0 (llama.cpp's fallbacks) on the down projections' rows of
    320 (Qwen 2 MoE: 1408) in every family but those whose MLP rows are multiples of 256 (GPT-2, Falcon, BLOOM:
    4 x 256; Qwen 3 MoE: 768) or that have no MLP (Mamba)."""
    import gguf

    family, path = family_file
    tensors = gguf.GGUFReader(str(path)).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    assert all(t == "F32" for n, t in types.items() if n.endswith(("norm.weight", ".bias"))), family
    assert "Q4_K" in types.values(), family
    if any(n == "output.weight" or ".attn_v." in n for n in types):  # Q6_K: the output, every few value projections
        assert "Q6_K" in types.values(), family
    # rows (ggml's first dimension) not a multiple of 256, quantised: only llama.cpp's fallback types
    fallbacks = {t.tensor_type.name for t in tensors
                 if len(t.shape) > 1 and t.shape[0] % 256 and t.tensor_type.name not in ("F32", "F16")}
    assert fallbacks <= {"Q5_0", "Q5_1", "Q8_0"}, family
    if family not in ("gpt2", "falcon", "bloom", "qwen3_moe", "mamba"):
        assert fallbacks == {"Q5_0", "Q8_0"}, family  # Q4_K's and Q6_K's


# --- every ggml type ---------------------------------------------------------------------------------------------

TYPES = dequantizable_types()


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    """A 4-layer Llama whose matrices hold every type `gguf` dequantises, one or more tensors each: block-32/64
    types first on the down projections (rows of 320), the rest on rows of 256."""
    import gguf

    layers = 4
    names = [f"blk.{i}.ffn_down.weight" for i in range(layers)] + ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(layers)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")]
    rows = {n: INTERMEDIATE if "ffn_down" in n else 256 for n in names}
    plan: dict[str, str] = {}
    for t in TYPES:
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]
        plan[next(n for n in names if n not in plan and rows[n] % block == 0)] = t
    path = write_tiny_gguf("llama", tmp_path_factory.mktemp("gguf-types"), types=plan, n_layers=layers)
    return path, plan


@pytest.fixture(scope="module")
def typed_handle(typed_file):
    return load_model(str(typed_file[0]))


def test_the_typed_file_holds_every_type(typed_file):
    path, plan = typed_file
    assert set(plan.values()) == set(TYPES)
    assert {t for n, t in tensor_types(path).items() if n in plan} == set(TYPES)
    assert len(TYPES) >= 26  # F32, F16, BF16, 5 legacy quants, 5 K-quants, 10 IQ types, 2 ternary, 2 FP4


@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_loads_as_gguf_dequantises_it(typed_file, typed_handle, qtype):
    import gguf

    path, plan = typed_file
    reader = gguf.GGUFReader(str(path))
    cfg = typed_handle.bridge.original_model.config
    # the bridge wraps each transformers module; its own parameters under their transformers names
    state = {k.replace("._original_component", ""): v
             for k, v in typed_handle.bridge.original_model.named_parameters()}
    checked = 0
    for t in reader.tensors:
        if plan.get(t.name) != qtype:
            continue
        assert t.tensor_type.name == qtype
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(want).all() and want.std() > 1e-3, t.name  # weight-like values, not zeros
        if ".attn_q." in t.name:
            want = unpermute(want, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            want = unpermute(want, cfg.num_key_value_heads)
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}.get(t.name)
        if hf is None:
            i, leaf = t.name.split(".")[1], t.name.split(".")[2]
            hf = f"model.layers.{i}." + {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                                        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                                        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                                        "ffn_down": "mlp.down_proj"}[leaf] + ".weight"
        got = state[hf].detach().float().numpy()
        assert got.shape == want.shape, (qtype, t.name)
        assert np.array_equal(got, want.astype(np.float32)), (qtype, t.name, np.abs(got - want).max())
        checked += 1
    assert checked, qtype


def test_the_typed_file_runs_like_plain_transformers(typed_file, typed_handle):
    """Past the weights, the model is the one transformers builds from the same values."""
    ref = _plain_transformers(typed_file[0])
    ids = torch.tensor([typed_handle.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert (typed_handle.bridge(ids) - ref(ids).logits).abs().max().item() <= 1e-4


# --- every family ------------------------------------------------------------------------------------------------

def test_family_loads_and_equals_plain_transformers(family_file, tmp_path):
    """The bridge's logits equal plain transformers' on the same file, and on its dequantised F32 copy (the same
    weights in a form every reader takes: transformers' packed-GGUF path, used for LFM2, reads no Q5_0 / Q8_0...)."""
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    family, path = family_file
    handle = load_model(str(path))
    assert handle.source == "gguf"
    # the architecture details the tiny configs set are there to be exercised: parallel blocks, ALiBi
    assert (handle.summary.block == "parallel attention + MLP") == (family in ("stablelm", "falcon")), family
    assert (handle.summary.positions == "ALiBi") == (family == "bloom"), family
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]])
    assert ids.shape[1] > SLIDING_WINDOW
    with torch.no_grad():
        ours = handle.bridge(ids)
    packed_path = is_gguf_arch_supported(GGUF_ARCH.get(family, family))
    references = [dequantised_copy(path, tmp_path)] + ([] if packed_path else [path])
    for ref_path in references:
        ref = _plain_transformers(ref_path)
        assert type(handle.bridge.original_model).__name__ == type(ref).__name__
        with torch.no_grad():
            theirs = ref(ids).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4, (family, ref_path.name)
    assert theirs.std().item() > 0.1, family  # a model whose predictions depend on its weights


def test_family_lens_last_layer_is_the_output(family_file, store):
    """The lens's last layer is the model's own output distribution: its KL to the final distribution is 0 and
    its top tokens' probabilities are those of the bridge's logits (soft-capping and all)."""
    family, path = family_file
    out = run(LensSpec(model=str(path), prompt=PROMPT, top_k=5), store=store)
    t = out.result.table
    last_layer = t["layer"].max()
    last = t[(t["site"] == "resid_post") & (t["layer"] == last_layer)]
    assert len(last) == out.result.meta["n_tokens"], family
    assert last["kl_to_final"].abs().max() < 1e-5, family
    assert (last["final_rank"] == 0).all() and (last["top_token"] == last["final_token"]).all(), family
    handle = load_model(str(path))
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        probs = handle.bridge(ids)[0].float().softmax(-1)
    top = out.result.extra["top"]
    top = top[(top["site"] == "resid_post") & (top["layer"] == last_layer)]
    assert len(top) == 5 * len(last), family
    want = probs[torch.tensor(top["pos"].to_numpy()), torch.tensor(top["token_id"].to_numpy())]
    assert (torch.tensor(top["prob"].to_numpy()).float() - want).abs().max().item() < 1e-4, family


@pytest.mark.parametrize("family", ["lfm2", "mamba"])
def test_lens_resid_mid_where_blocks_have_two_parts(family, tmp_path, store):
    """LFM2's convolution blocks have no attention output: their resid_mid is the residual entering the MLP
    (resid_post - mlp_out). Mamba's one-part blocks have none: asked for it alone, the lens says why."""
    path = write_tiny_gguf(family, tmp_path)
    if family == "mamba":
        with pytest.raises(WorkbenchError) as e:
            run(LensSpec(model=str(path), prompt=PROMPT, sites=("resid_mid",)), store=store)
        assert "mamba" in str(e.value) and "resid_mid" in str(e.value), str(e.value)
        return
    out = run(LensSpec(model=str(path), prompt=PROMPT, sites=("resid_mid",), top_k=1), store=store)
    handle = load_model(str(path))
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]])
    L = handle.bridge.cfg.n_layers
    with torch.no_grad():
        _, cache = handle.bridge.run_with_cache(ids)
        for layer in range(L):
            mid = cache[f"blocks.{layer}.hook_resid_post"] - cache[f"blocks.{layer}.hook_mlp_out"]
            logits = handle.bridge.unembed(handle.bridge.ln_final(mid))[0]  # no soft-cap in LFM2
            t = out.result.table
            ent = torch.tensor(t[(t["site"] == "resid_mid") & (t["layer"] == layer)].sort_values("pos")["entropy"]
                               .to_numpy())
            lp = logits.float().log_softmax(-1)
            assert (ent - -(lp.exp() * lp).sum(-1)).abs().max().item() < 1e-3, layer


# components some blocks lack: LFM2's convolution blocks have no attention, Mamba's blocks neither attention nor MLP
LACKING = {"lfm2": ("z_all_pos", "pattern_all_pos"), "mamba": ("mlp_out", "z_all_pos", "pattern_all_pos")}
HOOKS = {"resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out", "z_all_pos": "attn.hook_z",
         "pattern_all_pos": "attn.hook_pattern"}


def test_family_patching_equals_transformer_lens(family_file, store):
    """The sweep equals TransformerLens's `patching` on every component the model's blocks all have; a component
    some block lacks is refused before anything runs, with the architecture and the components it has named."""
    family, path = family_file
    handle = load_model(str(path))
    L = handle.bridge.cfg.n_layers
    lacking = tuple(c for c in PATCH_COMPONENTS
                    if any(f"blocks.{i}.{HOOKS[c]}" not in handle.bridge.hook_dict for i in range(L)))
    assert lacking == LACKING.get(family, ()), family
    components = tuple(c for c in PATCH_COMPONENTS if c not in lacking)
    if lacking:
        with pytest.raises(WorkbenchError) as e:
            run(PatchingSpec(model=str(path), pairs=json.dumps(TEXT_PAIRS), components=PATCH_COMPONENTS,
                             metric="logit_diff", methods=("activation",)), store=store)
        message = str(e.value)
        assert family in message and all(c in message for c in lacking), message
        assert f"It has: resid_pre, resid_post, {'mlp_out' if 'mlp_out' in components else ''}".rstrip(", ") \
            in message, message
        assert "Traceback" not in message
    out = run(PatchingSpec(model=str(path), pairs=json.dumps(TEXT_PAIRS), components=components,
                           metric="logit_diff", methods=("activation",)), store=store)
    pairs = json.loads(out.spec.pairs)
    for component in components:
        ref = _tl_reference(handle, pairs, component, "denoise", "logit_diff")
        ours = _grid(out.result.table, component, AXES[component])
        assert ours.shape == ref.shape, (family, component)
        assert (ours - ref).abs().max().item() <= 1e-4, (family, component)
        assert ref.abs().max().item() > 1e-3, (family, component)  # the sweep measures something


@pytest.mark.parametrize("family", ["lfm2", "mamba", "default"])
def test_the_patching_page_opens_on_components_the_model_has(family, tmp_path, monkeypatch):
    """The Patching page's default components include attention and MLP outputs, which LFM2's convolution blocks
    and Mamba's blocks lack: opened on such a model it used to refuse its own defaults. It now opens on the
    components every block has and says what it left out; the default model keeps all four (its run keys with
    them); a link that asks for a component the model lacks still gets the message naming what it has."""
    from test_app import _errors, _run
    from test_model_switch import ran, use_model

    from analysis.runner import get_store

    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    get_store.cache_clear()
    model = "default" if family == "default" else str(write_tiny_gguf(family, tmp_path / "model"))
    link = dict(pairs=json.dumps(TEXT_PAIRS), methods="activation", metric="logit_diff")
    at = use_model(_run("patching", **link), model)  # picked in the sidebar, as a person does
    assert not at.exception and not _errors(at), (at.exception, _errors(at))
    full = PatchingSpec().components
    spec = ran(at, tmp_path / "app.duckdb", "patching")
    assert spec["_model"] == model
    components = tuple(spec["components"])
    left_out = [c.value for c in at.caption if "left out of the components" in c.value]
    if family == "default":
        assert components == full and not left_out
    else:
        have = load_model(model).info["activations"]
        assert components == tuple(c for c in full if c in have) and "resid_pre" in components, components
        assert left_out and all(c in left_out[0] for c in full if c not in have), left_out
        [pick] = [m for m in at.multiselect if m.label == "Components"]  # a person asks for heads: refused, said why
        pick.set_value(["z_all_pos"])
        [press] = [b for b in at.button if b.label == "Run"]
        press.click().run()
        assert not at.exception and any(family in e and "It has: resid_pre" in e for e in _errors(at)), _errors(at)
    get_store.cache_clear()


# --- errors ------------------------------------------------------------------------------------------------------

def _incomplete(message: str) -> bool:
    return any(w in message.lower() for w in ("incomplete", "truncated"))


@pytest.fixture(scope="module")
def complete_file(tmp_path_factory):
    return write_tiny_gguf("llama", tmp_path_factory.mktemp("gguf-complete"))


def test_a_truncated_file_is_called_incomplete(complete_file, tmp_path):
    import gguf

    reader = gguf.GGUFReader(str(complete_file))
    start = reader.data_offset
    size = complete_file.stat().st_size
    cut = tmp_path / "cut.gguf"
    with open(complete_file, "rb") as f:
        cut.write_bytes(f.read(start + (size - start) // 2))  # inside the tensor data
    with pytest.raises(WorkbenchError) as e:
        load_model(str(cut))
    assert _incomplete(str(e.value)), str(e.value)


def _write_minimal(path, arch: str) -> None:
    """A complete GGUF file of architecture `arch`: its metadata, a tokenizer and one tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.add_token_types([1, 1, 1])
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["rwkv7", "command-r"])
def test_an_architecture_transformers_cannot_read_is_named_and_not_called_incomplete(arch, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert arch not in GGUF_SUPPORTED_ARCHITECTURES
    path = tmp_path / f"{arch}.gguf"
    _write_minimal(path, arch)
    with pytest.raises(WorkbenchError) as e:
        load_model(str(path))
    message = f"{e.value} {getattr(e.value, 'hint', '')}"
    assert arch in str(e.value), message
    assert not _incomplete(message), message


def test_an_unknown_tensor_type_is_named_and_not_called_incomplete(complete_file, tmp_path):
    """A tensor whose ggml type id no `gguf` release knows (77): the message names it, and does not call a
    complete file incomplete."""
    import gguf

    reader = gguf.GGUFReader(str(complete_file))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    # the tensor's info record: name length (u64), name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
    data = bytearray(complete_file.read_bytes())
    assert int.from_bytes(data[at:at + 4], "little") == t.tensor_type.value
    data[at:at + 4] = (77).to_bytes(4, "little")
    bad = tmp_path / "unknown-type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WorkbenchError) as e:
        load_model(str(bad))
    message = f"{e.value} {getattr(e.value, 'hint', '')}"
    assert "77" in str(e.value), message
    assert not _incomplete(message), message


def test_a_copy_of_a_complete_file_loads(complete_file, tmp_path):
    """The same bytes under another name load (the refusals above are about their changes, nothing else)."""
    copy = tmp_path / "copy.gguf"
    shutil.copy(complete_file, copy)
    assert load_model(str(copy)).source == "gguf"
