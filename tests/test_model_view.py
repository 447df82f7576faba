"""The Model page's computations, checked against plain transformers on the same weights."""
from __future__ import annotations

import pytest
import torch

from analysis import WorkbenchError
from analysis.analyses.model_view.compute import attention_patterns, next_token_predictions
from analysis.tokens import check_token_ids, encode, tokenize

PROMPT = "Then, John and Mary went to the store. John gave a ring to"


def _hf(handle):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(handle.path, attn_implementation="eager").eval()


def test_tokenization_round_trips(default_handle):
    ids = encode(default_handle, PROMPT)
    toks = tokenize(default_handle, ids)
    assert toks["token"][0] == "<|endoftext|>" and ids[0] == default_handle.tokenizer.bos_token_id
    assert "".join(toks["token"][1:]) == PROMPT
    assert toks["pos"].tolist() == list(range(len(ids)))


def test_next_token_predictions_match_transformers(default_handle):
    ids = encode(default_handle, PROMPT)
    with torch.no_grad():
        probs = _hf(default_handle)(torch.tensor([ids])).logits[0, -1].softmax(-1)
    top = next_token_predictions(default_handle, ids, k=10)
    ref = probs.topk(10)
    assert top["token_id"].tolist() == ref.indices.tolist()
    torch.testing.assert_close(torch.tensor(top["prob"].tolist()), ref.values, rtol=1e-4, atol=1e-6)
    assert top["rank"].tolist() == list(range(1, 11))
    assert (top["prob"].diff().dropna() <= 0).all()


def test_attention_patterns_match_transformers(tiny_handle):
    ids = encode(tiny_handle, PROMPT)
    att = attention_patterns(tiny_handle, ids)
    n, s = len(ids), tiny_handle.summary
    assert len(att) == s.n_layers * s.n_heads * n * (n + 1) // 2
    assert (att["key_pos"] <= att["query_pos"]).all()
    sums = att.groupby(["layer", "head", "query_pos"])["weight"].sum()
    assert torch.allclose(torch.tensor(sums.values, dtype=torch.float64), torch.ones(len(sums), dtype=torch.float64), atol=1e-5)
    with torch.no_grad():
        ref = _hf(tiny_handle)(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, head, q, k]
    for layer in range(s.n_layers):
        for head in range(s.n_heads):
            sub = att[(att["layer"] == layer) & (att["head"] == head)]
            expect = ref[layer][0, head][torch.as_tensor(sub["query_pos"].to_numpy().copy()), torch.as_tensor(sub["key_pos"].to_numpy().copy())]
            torch.testing.assert_close(torch.tensor(sub["weight"].values, dtype=torch.float32), expect, rtol=1e-4, atol=1e-5)


def test_bad_prompts_and_token_ids(default_handle):
    with pytest.raises(WorkbenchError, match="empty"):
        encode(default_handle, "   ")
    with pytest.raises(WorkbenchError, match="context is 128 tokens"):
        encode(default_handle, "John " * 200)
    with pytest.raises(WorkbenchError, match="outside this model's vocabulary"):
        check_token_ids(default_handle, [0, 5, 10**6])
    with pytest.raises(WorkbenchError, match="outside this model's vocabulary"):
        check_token_ids(default_handle, [0, -1])
    with pytest.raises(WorkbenchError, match="Layers must be between"):
        attention_patterns(default_handle, [0, 5], layers=[99])
