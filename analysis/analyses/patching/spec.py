"""The patching spec: prompt pairs (shipped or given), components, methods, metric, direction."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from kernels.patching import ACTIVATIONS, available_activations, hook_layers, is_parallel

from ...errors import WorkbenchError
from ...models import ModelHandle
from ...specs import Spec, param
from ...tasks import ioi_pairs
from ...tokens import check_token_ids, encode, single_token_ids

COMPONENTS = tuple(ACTIVATIONS)
METRICS = ("logit_diff_normalized", "logit_diff", "answer_prob", "kl")
DIRECTIONS = ("denoise", "noise")
METHODS = ("activation", "atp", "relp", "ig")
RELP_RULES = ("ln", "identity", "half", "attention")
MAX_PAIRS = 256


PAIR_TEXTS = {"clean_ids": "clean", "corrupted_ids": "corrupted", "answer_id": "answer", "wrong_id": "wrong"}


class PairIds:
    """Token ids in a spec's prompt pairs (`pairs`, JSON): they belong to the tokenizer that made them (see
    Spec.token_id_fields). Dropped for another tokenizer: shipped pairs are built again for it, a person's pairs are
    tokenised again from their text; pairs given only as ids are refused."""

    token_id_fields: ClassVar[dict[str, str]] = {"pairs": "pairs"}

    @classmethod
    def holds_ids(cls, name: str, value) -> bool:
        return name == "pairs" and bool(value) and any(k in p for p in _parse_pairs(value) for k in PAIR_TEXTS)

    def without_token_ids(self):
        if not self.holds_token_ids():
            return self
        if self.pairs_note:  # the shipped pairs, as built for the link's model: build them for this one
            return self.replace(pairs="", dataset="ioi", pairs_note="")
        return self.replace(pairs=pairs_without_ids(self.pairs))


@dataclass(frozen=True)
class PromptPairs(PairIds):
    """The prompt-pair fields a spec shares with the Patching page: the shipped IOI pairs built for the model's
    tokenizer (`dataset`, `n_pairs`), or pairs given as JSON (`pairs`); `pairs_note` says how shipped pairs were
    built (shown with the result, out of the run key)."""

    display_only: ClassVar[dict[str, str]] = {"pairs_note": "pairs"}
    dataset: str = param("ioi", "shipped pairs to use when `pairs` is empty", choices=("ioi", ""))
    n_pairs: int = param(8, "how many shipped pairs (the first ones of the first pair's token length)", min=1,
                         max=MAX_PAIRS)
    pairs: str = param("", 'JSON list of {"clean", "corrupted", "answer", "wrong"} (text) or '
                        '{"clean_ids", "corrupted_ids", "answer_id", "wrong_id"} (token ids)', max_len=200_000)
    pairs_note: str = param("", "how the shipped pairs were built for this model (filled in when they are)",
                            max_len=2_000)

    def validate_pairs(self) -> None:
        if not self.pairs and not self.dataset:
            raise WorkbenchError("Give prompt pairs, or pick the shipped IOI pairs.")
        if self.pairs:
            _parse_pairs(self.pairs)


def pairs_without_ids(text: str) -> str:
    """The pairs with their token ids dropped, keeping the text they were made from; a pair given by ids alone is
    refused."""
    out = []
    for i, p in enumerate(_parse_pairs(text)):
        for ids, kind in PAIR_TEXTS.items():
            if ids in p and not (isinstance(p.get(kind), str) and p[kind]):
                raise WorkbenchError(f"Pair {i + 1} gives {ids} and no {kind!r} text to tokenise again.")
        out.append({k: v for k, v in p.items() if k not in PAIR_TEXTS})
    return json.dumps(out, ensure_ascii=False)


CHARS_PER_TOKEN = 4  # English text under a byte-pair vocabulary, for an estimate made before tokenising


def pair_ids_or_guess(pair: dict, kind: str = "clean") -> list:
    """A pair's token ids of one run (`clean` or `corrupted`), or, for a pair given as text (a link's pairs before
    the page tokenises them), a stand-in of its likely length (the BOS and a token per 4 characters) whose ids
    differ from the other run's only where the text does: what an estimate needs before a tokenizer has run."""
    if f"{kind}_ids" in pair:
        return list(pair[f"{kind}_ids"])
    text, other = str(pair.get(kind, "")), str(pair.get("corrupted" if kind == "clean" else "clean", ""))
    same = next((i for i, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    n = 1 + max(1, -(-len(text) // CHARS_PER_TOKEN))
    first = 1 + same // CHARS_PER_TOKEN
    return [0] * min(first, n) + [1 if kind == "clean" else 2] * max(0, n - first)


def pairs_with_text(resolved: str, given: str) -> str:
    """Resolved pairs (token ids only) with the text of the pairs they were resolved from beside their ids, so that a
    link can tokenise them again for another tokenizer."""
    texts = _parse_pairs(given) if given else []
    out = []
    for i, p in enumerate(_parse_pairs(resolved)):
        typed = texts[i] if i < len(texts) else {}
        out.append({**{k: typed[k] for k in PAIR_TEXTS.values() if isinstance(typed.get(k), str)}, **p})
    return json.dumps(out, ensure_ascii=False)


@dataclass(frozen=True)
class PatchingSpec(PromptPairs, Spec):
    """Patching sweeps over prompt pairs: the shipped IOI pairs (built for the model's tokenizer), or pairs given
    as JSON. Pairs of different token lengths run as one batch per length, combined into one result."""

    analysis: ClassVar[str] = "patching"
    title: ClassVar[str] = "Patching: activation, attribution and relevance patching, integrated gradients"
    components: tuple[str, ...] = param(("resid_pre", "attn_out", "mlp_out", "z_all_pos"),
                                     "component sweeps to run", choices=COMPONENTS, max_len=len(COMPONENTS))
    methods: tuple[str, ...] = param(("activation", "atp", "relp"), "estimators: activation patching (ground truth), "
                                  "attribution patching, relevance patching, ig: integrated gradients", choices=METHODS,
                                  max_len=len(METHODS))
    relp_rules: tuple[str, ...] = param(("ln", "identity", "half"), "LRP rules for RelP (attention = the AH rule)",
                                     choices=RELP_RULES, max_len=len(RELP_RULES))
    ig_steps: int = param(16, "integration steps for integrated gradients", min=2, max=256)
    overlap_k: int = param(10, "k of the top-k overlap in the faithfulness report", min=1, max=1000)
    metric: str = param("logit_diff_normalized", "metric at the final position", choices=METRICS)
    direction: str = param("denoise", "denoise: clean into corrupted; noise: corrupted into clean",
                        choices=DIRECTIONS)

    def validate(self) -> None:
        if not self.components:
            raise WorkbenchError("Pick at least one component to patch.")
        if not self.methods:
            raise WorkbenchError("Pick at least one method.")
        self.validate_pairs()

    def resolve(self, handle: ModelHandle) -> "PatchingSpec":
        """Token ids for every pair (a link replays from them); checks lengths and single-token answers."""
        if "resid_mid" in self.components and is_parallel(handle.bridge):
            raise WorkbenchError(f"{handle.name} runs attention and MLP in parallel (both read resid_pre), so it has "
                                 "no residual stream between them: resid_mid does not exist.",
                                 hint="Patch resid_pre, resid_post, attn_out or mlp_out instead.")
        check_components(handle, self.components)
        return resolve_pairs(self, handle)


def check_components(handle: ModelHandle, components) -> None:
    """Refuses, before anything runs, components that not every block of the model has (a convolution block has no
    attention, Mamba's blocks have neither attention nor an MLP), naming the architecture and what it has."""
    bridge = handle.bridge
    have = available_activations(bridge)
    missing = [c for c in components if c not in have]
    if not missing:
        return
    arch = getattr(getattr(bridge, "original_model", None), "config", None)
    arch = getattr(arch, "model_type", None) or type(getattr(bridge, "original_model", bridge)).__name__
    n_layers = bridge.cfg.n_layers
    parts = []
    for c in missing:
        layers = hook_layers(bridge, c)
        parts.append(f"{c} (only blocks {', '.join(map(str, layers))} of 0-{n_layers - 1} have it)" if layers else c)
    raise WorkbenchError(f"{handle.name} is a {arch} model whose blocks do not all have "
                         f"{', '.join(parts)}: a sweep over its layers cannot patch "
                         f"{'it' if len(missing) == 1 else 'them'}. It has: {', '.join(have)}.",
                         hint=f"Patch {', '.join(have)} instead.")


def resolve_pairs(spec, handle: ModelHandle):
    """The spec (fields pairs, n_pairs, bos, pairs_note, dataset) with token ids for every pair, given or the
    shipped ones built for this model; lengths and single-token answers checked."""
    note = spec.pairs_note
    if spec.pairs:
        pairs = _parse_pairs(spec.pairs)
    else:
        pairs, note = _shipped_pairs(handle, spec.n_pairs, spec.bos)
    resolved = [_resolve_pair(handle, i, p, spec.bos) for i, p in enumerate(pairs)]
    return spec.replace(pairs=json.dumps(resolved, separators=(",", ":")), dataset="", pairs_note=note)


def _parse_pairs(text: str) -> list[dict]:
    try:
        pairs = json.loads(text)
    except ValueError as e:
        raise WorkbenchError(f"The prompt pairs are not valid JSON: {e}") from e
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, dict) for p in pairs):
        raise WorkbenchError("The prompt pairs must be a non-empty JSON list of objects.")
    if len(pairs) > MAX_PAIRS:
        raise WorkbenchError(f"{len(pairs)} pairs; at most {MAX_PAIRS} run at once.")
    return pairs


def _shipped_pairs(handle: ModelHandle, n: int, bos: str) -> tuple[list[dict], str]:
    """The first n shipped IOI pairs of the first pair's token length, built for this model, and a note
    saying how they were built."""
    data = ioi_pairs(handle, bos)
    if not data.rows:
        raise WorkbenchError(f"None of the shipped IOI pairs fits this model's tokenizer: {data.describe()}.",
                             hint="Give your own pairs.")
    length = len(data.rows[0]["clean_ids"])
    same = [r for r in data.rows if len(r["clean_ids"]) == length][:n]
    note = f"{data.describe()}. Used: the first {len(same)} pairs of {length} tokens."
    return [{"clean_ids": r["clean_ids"], "corrupted_ids": r["corrupted_ids"], "answer_id": r["io_id"],
             "wrong_id": r["s_id"]} for r in same], note


def _resolve_pair(handle: ModelHandle, i: int, p: dict, bos: str) -> dict:
    where = f"Pair {i + 1}"

    def ids(kind: str) -> list[int]:
        if f"{kind}_ids" in p:
            v = p[f"{kind}_ids"]
            if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise WorkbenchError(f"{where}: {kind}_ids must be a list of integers.")
            check_token_ids(handle, v)
            return v
        if not isinstance(p.get(kind), str):
            raise WorkbenchError(f"{where}: give {kind!r} (text) or {kind}_ids (token ids).")
        return encode(handle, p[kind], bos)

    def token(kind: str) -> int:
        if f"{kind}_id" in p:
            t = p[f"{kind}_id"]
            if not isinstance(t, int) or isinstance(t, bool):
                raise WorkbenchError(f"{where}: {kind}_id must be an integer.")
            check_token_ids(handle, [t])
            return t
        text = p.get(kind)
        if not isinstance(text, str) or not text:
            raise WorkbenchError(f"{where}: give {kind!r} (text) or {kind}_id (a token id).")
        return single_token_ids(handle, [text], kind, where)[0]

    clean, corrupted = ids("clean"), ids("corrupted")
    if len(clean) != len(corrupted):
        raise WorkbenchError(f"{where}: the clean prompt is {len(clean)} tokens and the corrupted one "
                             f"{len(corrupted)}; patching needs equal lengths.",
                             hint="Change the corruption so that it keeps the token count.")
    answer, wrong = token("answer"), token("wrong")
    if answer == wrong:
        raise WorkbenchError(f"{where}: the answer and the wrong answer are the same token.")
    return {"clean_ids": clean, "corrupted_ids": corrupted, "answer_id": answer, "wrong_id": wrong}


