"""Tiny random models written as GGUF files the way llama.cpp writes them, for the GGUF loading tests.

    path = write_tiny_gguf("gemma2", folder)                    # a Q4_K_M-style mix of tensor types
    path = write_tiny_gguf("llama", folder, types="F32")        # every matrix in one type
    path = write_tiny_gguf("llama", folder, types={"blk.0.attn_q.weight": "IQ2_XS"})  # the rest F32

Each family is a tiny transformers model (hidden 256 so that the 256-element K-quant blocks fit, 2 layers, a
byte-level BPE vocabulary of ~300 tokens stored in the file's `tokenizer.ggml.*` keys), with random weights, written
under llama.cpp's tensor names and metadata keys and with the transforms llama.cpp's `convert_hf_to_gguf.py` applies
(Llama's q/k row permutation, the `w + 1` of Gemma's and Nemotron's norms, GPT-2's transposed Conv1D weights, BLOOM's
regrouped fused q/k/v), so that transformers' reader gives the source model back: an all-F32 file reproduces
`source_model(family)`'s logits.

Types: `gguf.quants.quantize` writes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0 and MXFP4 from the
weights. For the other types `gguf.quants.dequantize` reads (K-quants, IQ types, NVFP4) the blocks are random bytes
whose scale fields are set so that each block dequantises to finite values of the weights' magnitude: the model's
weights are then whatever those blocks dequantise to, which the tests read back with `gguf.quants.dequantize`.

Families: every architecture transformers 5.23 reads from GGUF (`GGUF_SUPPORTED_ARCHITECTURES`) whose causal-LM
class TransformerLens 4.3's bridge has an adapter for, except these, left out and why:
- deci: the bridge has no adapter for DeciLM (no "Deci*" in `ArchitectureAdapterFactory._adapters`).
- t5, umt5: encoder-decoder models, not causal language models.
- gemma4: the reader leaves `vocab_size_per_layer_input` (262,144) and `hidden_size_per_layer_input` (256) at the
  class defaults, so even a 2-layer file must hold a 262,144 x 512 per-layer embedding table (134 M values).
- gpt_oss: transformers cannot read llama.cpp's gpt-oss experts: `get_gguf_hf_weights_map` finds no name for
  `experts.gate_up_proj(_bias)` / `down_proj_bias` (and `blk.N.ffn_down_exps` without the file's `.weight`), and
  its `GptOssTensorProcessor`, registered as "gpt_oss", is never chosen for a file whose architecture is "gpt-oss";
  the experts would keep their random initialisation.
Mistral: llama.cpp writes Mistral models as "llama" named after the model, which transformers reads as Llama (a
file named exactly "mistral" it reads as Mistral, and then fails: "Unknown gguf model_type: mistral in gguf-py").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HIDDEN = 256
INTERMEDIATE = 320  # not a multiple of 256: the down projections fall back to Q5_0 / Q8_0 in a Q4_K_M mix
N_LAYERS = 2
SLIDING_WINDOW = 4  # smaller than the test prompts, so the sliding-window layers cut attention short

# words that get a token of their own, so the IOI-style prompts' names are one token each
WORDS = (" John", " Mary", " Adam", " Lucy", " Nora", " Emma", " Frank", " Oscar", " Julia", " Henry", " the",
         " to", " and", " went", " gave", " store", " park", " ring", " ball", "Then")
EOS = "<|endoftext|>"

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "stablelm", "starcoder2",
            "falcon", "bloom", "nemotron", "qwen2_moe", "qwen3_moe", "minimax_m2", "lfm2", "mamba")

# general.architecture of each family's file (Mistral is written as Llama, as llama.cpp does)
GGUF_ARCH = {"mistral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "minimax_m2": "minimax-m2"}
# families whose norms transformers reads as `w + 1` (llama.cpp adds the 1 that the model adds at run time)
NORM_OFFSET = {"gemma2", "gemma3", "nemotron"}


# --- tokenizer -------------------------------------------------------------------------------------------------

def _byte_chars() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def tokenizer_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a byte-level BPE: the 256 bytes, one merge chain per word of WORDS (each
    word a single token), then the end-of-text token (a control token, BOS and EOS)."""
    chars = _byte_chars()
    tokens = [chars[b] for b in range(256)]
    merges: list[str] = []
    known = set(tokens)
    for word in WORDS:
        spelled = "".join(chars[b] for b in word.encode())
        for i in range(2, len(spelled) + 1):
            if spelled[:i] not in known:
                merges.append(f"{spelled[:i - 1]} {spelled[i - 1]}")
                tokens.append(spelled[:i])
                known.add(spelled[:i])
    types = [1] * len(tokens) + [3]
    return tokens + [EOS], merges, types


def vocab_size() -> int:
    return len(tokenizer_vocab()[0])


# --- source models ---------------------------------------------------------------------------------------------

def tiny_config(family: str, n_layers: int = N_LAYERS):
    """A tiny transformers config of `family`. Fields the GGUF reader does not read stay at the config class's
    defaults (the reader would put those back), e.g. Gemma 2's soft-capping (50 / 30) and query scale (256)."""
    import transformers as tr

    v = vocab_size()
    eos = v - 1
    common = dict(vocab_size=v, hidden_size=HIDDEN, num_hidden_layers=n_layers, max_position_embeddings=128,
                  bos_token_id=eos, eos_token_id=eos)
    rope = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=INTERMEDIATE)
    if family in ("llama", "mistral"):
        cls = tr.LlamaConfig if family == "llama" else tr.MistralConfig
        extra = {"sliding_window": None} if family == "mistral" else {}
        return cls(**common, **rope, head_dim=64, tie_word_embeddings=False, **extra)
    if family == "qwen2":  # q/k/v biases
        return tr.Qwen2Config(**common, **rope, tie_word_embeddings=False)
    if family == "qwen3":  # q/k norms; head_dim is not in the file, so the class default (128)
        return tr.Qwen3Config(**common, **rope, tie_word_embeddings=False)
    if family == "gemma2":  # embedding scale, norm offset, soft-capping, alternating sliding-window layers
        return tr.Gemma2Config(**common, **rope, head_dim=64, sliding_window=SLIDING_WINDOW)
    if family == "gemma3":  # q/k norms, sliding-window layers (the default pattern makes both layers sliding)
        return tr.Gemma3TextConfig(**common, **rope, head_dim=64, sliding_window=SLIDING_WINDOW)
    if family == "phi3":  # fused qkv and gate/up projections
        return tr.Phi3Config(**common, **rope, tie_word_embeddings=False, pad_token_id=eos)
    if family == "gpt2":
        # the reader takes the context length as n_ctx and leaves n_positions (the position table) at 1024
        return tr.GPT2Config(vocab_size=v, n_embd=HIDDEN, n_layer=n_layers, n_head=4, n_positions=1024,
                             n_inner=None, bos_token_id=eos, eos_token_id=eos)
    if family == "stablelm":  # parallel attention and MLP, partial rotary, q/k/v biases
        return tr.StableLmConfig(**common, **rope, use_parallel_residual=True, use_qkv_bias=True,
                                 tie_word_embeddings=False)
    if family == "starcoder2":  # LayerNorm and biases everywhere, GELU MLP
        return tr.Starcoder2Config(**common, **rope, tie_word_embeddings=True)
    if family == "falcon":  # Falcon-7B's shape: parallel attention and MLP, multi-query attention
        return tr.FalconConfig(vocab_size=v, hidden_size=HIDDEN, num_hidden_layers=n_layers, num_attention_heads=4,
                               num_kv_heads=1, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                               max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos)
    if family == "bloom":  # ALiBi positions, an embedding LayerNorm
        return tr.BloomConfig(vocab_size=v, hidden_size=HIDDEN, n_layer=n_layers, n_head=4, bos_token_id=eos,
                              eos_token_id=eos)
    if family == "nemotron":  # LayerNorm1P (norm offset), squared-ReLU MLP, partial rotary; head_dim default 128
        return tr.NemotronConfig(**common, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=INTERMEDIATE, tie_word_embeddings=False)
    if family == "qwen2_moe":  # the expert widths are not in the file: the class defaults (1408, 5632)
        return tr.Qwen2MoeConfig(**common, **rope, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3_moe":  # the expert width is not in the file: the class default (768)
        return tr.Qwen3MoeConfig(**common, **rope, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=True, tie_word_embeddings=False)  # the reader's default for GGUF
    if family == "lfm2":  # a short-convolution layer, then an attention layer with q/k norms
        return tr.Lfm2Config(**common, **rope, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
                             tie_word_embeddings=True)
    if family == "minimax_m2":  # mixture of experts with a routing bias, q/k norms over all heads
        return tr.MiniMaxM2Config(**common, **rope, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                                  use_routing_bias=True, tie_word_embeddings=False)
    if family == "mamba":  # a state-space model: no attention at all
        return tr.MambaConfig(vocab_size=v, hidden_size=HIDDEN, num_hidden_layers=n_layers, state_size=16, expand=2,
                              conv_kernel=4, time_step_rank=16, max_position_embeddings=128, bos_token_id=eos,
                              eos_token_id=eos, pad_token_id=eos)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def source_model(family: str, seed: int = 0, n_layers: int = N_LAYERS):
    """The random float32 model `write_tiny_gguf(family, ..., seed=seed, n_layers=n_layers)` writes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers), dtype=torch.float32,
                                             attn_implementation="eager")
    offset = family in NORM_OFFSET
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                p.copy_((0.0 if offset else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a routing bias that changes which experts are chosen
                b.normal_(0, 0.05)
    return model.eval()


# --- tensor types ----------------------------------------------------------------------------------------------

def _use_more_bits(layer: int, n_layers: int) -> bool:  # llama.cpp's choice of layers that get more bits
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's, for rows not a multiple of 256


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int = N_LAYERS) -> str:
    """The type llama.cpp's Q4_K_M gives a tensor: F32 vectors; Q6_K output; Q6_K / Q4_K value and down
    projections by layer; Q5_K fused qkv; Q4_K the rest; Q5_0 / Q5_1 / Q8_0 where rows are not a multiple of 256."""
    if len(shape) < 2 or "ffn_gate_inp" in name or name.endswith(("conv.weight", "conv1d.weight", "ssm_a")):  # F32 in llama.cpp
        return "F32"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        t = "Q6_K"
    elif "attn_v." in name or "ffn_down" in name:
        t = "Q6_K" if _use_more_bits(layer, n_layers) else "Q4_K"
    elif "attn_qkv." in name:
        t = "Q5_K"
    else:
        t = "Q4_K"
    t = _FALLBACK[t] if shape[-1] % 256 else t
    return t if _fits(shape, t) else "F16"


# byte offsets of each block's float16 scale fields, for the types written as random bytes
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,), "IQ4_NL": (0,),
               "IQ4_XS": (0,)}
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4")


def dequantizable_types() -> list[str]:
    """Every ggml type `gguf.quants.dequantize` reads."""
    from gguf.quants import _type_traits

    return ["F32", "F16"] + [t.name for t in _type_traits]


def _set_f16(blocks: np.ndarray, qtype: str, values: np.ndarray) -> None:
    """Write one float16 scale per block into the blocks' scale fields."""
    h = values.astype(np.float16).view(np.uint16)
    if qtype == "IQ1_M":  # the scale is spread over the high nibbles of the last four uint16s
        scales = blocks[:, -8:].copy().view(np.uint16)
        for i in range(4):
            scales[:, i] = (scales[:, i] & np.uint16(0x0FFF)) | (((h >> np.uint16(4 * i)) & np.uint16(0xF)) << 12)
        blocks[:, -8:] = scales.view(np.uint8)
        return
    for off in _F16_FIELDS[qtype]:
        blocks[:, off:off + 2] = h.reshape(-1, 1).view(np.uint8).reshape(-1, 2)


def _random_blocks(shape: tuple[int, ...], qtype: str, rms: float, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` for a tensor of `shape`, each dequantising to finite values of about `rms`."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    n_blocks = int(np.prod(shape)) // block
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype == "NVFP4":  # four unsigned e4m3 scales: exponent 1, a random mantissa (about 0.01)
        blocks[:, :4] = (1 << 3) | rng.integers(0, 8, (n_blocks, 4), dtype=np.uint8)
    else:
        _set_f16(blocks, qtype, np.ones(n_blocks))
        unit = gguf.quants.dequantize(blocks, t).reshape(n_blocks, block)
        got = np.sqrt((unit.astype(np.float64) ** 2).mean(-1))
        _set_f16(blocks, qtype, np.where(got > 0, rms / np.maximum(got, 1e-12), 0.0))
    out = blocks.reshape(*shape[:-1], shape[-1] // block * size)
    assert np.isfinite(gguf.quants.dequantize(out, t)).all(), qtype
    return out


def encode(array: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or float array, for F32 / F16) of `array` stored as `qtype`."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), t)
    return _random_blocks(array.shape, qtype, float(np.sqrt((array.astype(np.float64) ** 2).mean())), rng)


def _fits(shape: tuple[int, ...], qtype: str) -> bool:
    import gguf

    return shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == 0


def choose_type(types: str | dict, name: str, shape: tuple[int, ...], n_layers: int = N_LAYERS) -> str:
    if isinstance(types, dict):
        return types.get(name, "F32")
    if types.lower() == "q4_k_m":
        return q4_k_m_type(name, shape, n_layers)
    if len(shape) < 2:
        return "F32"
    return types.upper() if _fits(shape, types.upper()) else "Q8_0"


# --- GGUF tensors ----------------------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bloom_qkv(w: np.ndarray, n_head: int, hidden: int) -> np.ndarray:
    """llama.cpp's BLOOM conversion: the per-head interleaved [q k v] rows regrouped as all q, all k, all v."""
    head = hidden // n_head
    w = w.reshape(n_head, 3, head, *w.shape[1:])
    return np.concatenate([w[:, 0].reshape(hidden, *w.shape[3:]), w[:, 1].reshape(hidden, *w.shape[3:]),
                           w[:, 2].reshape(hidden, *w.shape[3:])], axis=0)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k permutation (what transformers applies when it reads a Llama file)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(family: str, model) -> dict[str, np.ndarray]:
    """The model's parameters as float32 arrays under llama.cpp's names, transformed as llama.cpp writes them."""
    return {g: w for g, (_, w) in _convert(family, model).items()}


def hf_names(family: str, model) -> dict[str, str]:
    """llama.cpp tensor name -> the transformers parameter it is read into (fused experts: the fused tensor)."""
    return {g: h for g, (h, _) in _convert(family, model).items()}


def _convert(family: str, model) -> dict[str, tuple[str, np.ndarray]]:
    import gguf

    cfg = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == GGUF_ARCH.get(family, family))
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out: dict[str, tuple[str, np.ndarray]] = {}
    routing_bias = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for hf_name, p in list(model.named_parameters()) + routing_bias:
        w = p.detach().float().numpy().copy()
        if hf_name.endswith("e_score_correction_bias"):  # MiniMax-M2's routing bias, a buffer
            out[f"blk.{hf_name.split('.')[2]}.exp_probs_b.bias"] = hf_name, w
            continue
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith("experts") and suffix in ("gate_up_proj", "down_proj"):  # fused experts [E, 2I, H]
            stem = names.get_name(f"{base}.down_proj")[: -len("ffn_down_exps")]
            if suffix == "down_proj":
                out[f"{stem}ffn_down_exps.weight"] = hf_name, w
            else:
                half = w.shape[1] // 2
                out[f"{stem}ffn_gate_exps.weight"] = hf_name, np.ascontiguousarray(w[:, :half])
                out[f"{stem}ffn_up_exps.weight"] = hf_name, np.ascontiguousarray(w[:, half:])
            continue
        if suffix not in ("weight", "bias"):  # Mamba's A_log and D: named without a suffix
            base, suffix = hf_name, ""
        gname = names.get_name(base)
        if gname is None and "." in base:  # BLOOM's embedding norm is named without its model prefix
            gname = names.get_name(base.split(".", 1)[1])
        if gname is None:
            raise KeyError(f"{family}: no llama.cpp name for {hf_name}")
        gname = f"{gname}.{suffix}" if suffix else gname
        if family in ("llama", "mistral") and suffix == "weight" and ".attn_q." in gname:
            w = _permute(w, cfg.num_attention_heads)
        elif family in ("llama", "mistral") and suffix == "weight" and ".attn_k." in gname:
            w = _permute(w, cfg.num_key_value_heads)
        elif family in NORM_OFFSET and gname.endswith("norm.weight"):
            w = w + 1
        elif family == "gpt2" and suffix == "weight" and any(k in gname for k in ("attn_qkv", "attn_output",
                                                                                   "ffn_up", "ffn_down")):
            w = np.ascontiguousarray(w.T)  # Conv1D [in, out] -> [out, in]
        elif family == "bloom" and ".attn_qkv." in gname:
            w = _bloom_qkv(w, cfg.n_head, cfg.hidden_size)
        elif gname.endswith(".ssm_a"):
            w = -np.exp(w)  # llama.cpp stores A = -exp(A_log)
        elif gname.endswith(("shortconv.conv.weight", "ssm_conv1d.weight")):
            w = w.reshape(w.shape[0], w.shape[-1])  # llama.cpp squeezes LFM2's conv kernel [C, 1, L] to [C, L]
        elif "ffn_gate_inp_shexp" in gname:
            w = w.reshape(-1)  # llama.cpp stores the shared expert's gate as a vector
        out[gname] = hf_name, np.ascontiguousarray(w, dtype=np.float32)
    return out


# --- metadata --------------------------------------------------------------------------------------------------

def _config_value(cfg, key: str):
    if key == "rope_theta":
        rp = getattr(cfg, "rope_parameters", None) or {}
        rp = rp.get("sliding_attention", rp) if "rope_theta" not in rp else rp
        return rp.get("rope_theta")
    try:
        return getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - a config that refuses a global read of a per-layer field
        return None


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def _metadata(family: str, cfg) -> dict:
    """The `<arch>.*` keys: every one transformers reads for this architecture that the config has, plus the ones
    llama.cpp writes that transformers does not read (soft-capping, rotary width)."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    arch = GGUF_ARCH.get(family, family)
    keys = {}
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING[family].items():
        if hf_key is None:
            continue
        value = _config_value(cfg, hf_key)
        if value is not None:
            keys[f"{arch}.{gguf_key}"] = value
    if family in ("gemma2",):
        keys[f"{arch}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        keys[f"{arch}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if family in ("gpt2", "bloom", "falcon"):
        keys.setdefault(f"{arch}.context_length", int(getattr(cfg, "n_positions", 128) or 128))
        keys.setdefault(f"{arch}.feed_forward_length", 4 * HIDDEN)
    if family == "lfm2":  # transformers rebuilds this config itself: the keys llama.cpp writes
        keys = {f"{arch}.{k}": v for k, v in {
            "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "feed_forward_length": cfg.intermediate_size, "block_count": cfg.num_hidden_layers,
            "attention.head_count": cfg.num_attention_heads,
            # one count per layer, 0 on the convolution layers: how the file says which layer is which
            "attention.head_count_kv": [cfg.num_key_value_heads if t == "full_attention" else 0
                                        for t in cfg.layer_types],
            "attention.layer_norm_rms_epsilon": float(cfg.norm_eps), "shortconv.l_cache": cfg.conv_L_cache,
            "rope.freq_base": float(cfg.rope_parameters["rope_theta"]), "vocab_size": cfg.vocab_size}.items()}
    if family == "falcon":
        keys[f"{arch}.attention.head_count_kv"] = 1
        keys[f"{arch}.attention.layer_norm_epsilon"] = float(cfg.layer_norm_epsilon)
        keys.pop(f"{arch}.attention.layer_norm_rms_epsilon", None)
    return keys


def write_tiny_gguf(family: str, folder: Path, types: str | dict = "q4_k_m", seed: int = 0,
                    n_layers: int = N_LAYERS) -> Path:
    """Write `source_model(family, seed)` as a GGUF file in `folder` and return its path.

    `types`: "q4_k_m" (llama.cpp's Q4_K_M mix), one ggml type name for every matrix (vectors stay F32; a matrix
    whose rows do not fit the type's blocks falls back to Q8_0), or a dict from llama.cpp tensor name to type
    (tensors it does not name are F32)."""
    import gguf

    model = source_model(family, seed, n_layers)
    cfg = model.config
    tensors = gguf_tensors(family, model)
    label = "custom" if isinstance(types, dict) else types.lower()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny-{family}-{label}.gguf"
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH.get(family, family))
    # llama.cpp writes Mistral models as "llama" and names them after the model ("Mistral 7B Instruct v0.3"), so
    # transformers reads them as Llama; a file named exactly "mistral" it reads as Mistral, and then fails
    # (5.23: "Unknown gguf model_type: mistral in gguf-py")
    writer.add_name("Mistral tiny" if family == "mistral" else f"tiny-{family}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in _metadata(family, cfg).items():
        _add(writer, key, value)
    tokens, merges, token_types = tokenizer_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_pad_token_id(len(tokens) - 1)  # else the config keeps its class's pad id (Phi-3: 32000)
    writer.add_add_bos_token(False)
    for name, array in tensors.items():
        qtype = choose_type(types, name, array.shape, n_layers)
        data = encode(array, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantised_copy(path: Path, folder: Path) -> Path:
    """The same file with every tensor stored as F32, `gguf.quants.dequantize`'s values: a reference for readers
    that cannot read some of the file's types (transformers' packed-GGUF path, used for LFM2, reads no Q5_0)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{path.stem}-f32.gguf"
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's ggml type name in a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


if __name__ == "__main__":  # python tests/gguf_files.py /tmp/out: write every family's Q4_K_M file
    import sys

    for fam in FAMILIES:
        p = write_tiny_gguf(fam, Path(sys.argv[1]))
        print(p, json.dumps(sorted(set(tensor_types(p).values()))))
