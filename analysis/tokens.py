"""Token ids for a model: encoding prompts, checking ids a link or a file supplies, single-token answers.

Only the tokenizer is used, so none of this needs the model's lock. `model` is a `ModelHandle` or a
`ModelSession` (anything with `.tokenizer` and `.summary`; `.prepends_bos` of the handle).
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from .errors import WorkbenchError

MAX_PROMPT_CHARS = 20_000


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what a tokenizer's ids mean (every token's text and id, and its BOS and EOS ids): the same
    for every model that shares a tokenizer (the default model's checkpoints), different for another vocabulary
    even where the ids happen to be in range. Links carry it next to the token ids they replay."""
    vocab = sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items())
    special = [getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    payload = json.dumps([vocab, special], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def bos_flag(model, bos: str = "auto") -> bool:
    """Whether texts get a BOS token in front: "auto" follows the model's tokenizer (does it add one itself?),
    "yes" and "no" override it."""
    if bos == "auto":
        handle = model.handle if hasattr(model, "handle") else model
        return bool(handle.prepends_bos)
    if bos == "yes":
        if model.tokenizer.bos_token_id is None:
            raise WorkbenchError("This model's tokenizer has no BOS token to put in front.",
                                 hint="Set the BOS option to 'no' or 'auto'.")
        return True
    if bos == "no":
        return False
    raise WorkbenchError(f"The BOS option must be auto, yes or no, not {bos!r}.")


def encode(model, prompt: str, bos: str = "auto") -> list[int]:
    """Token ids of a prompt, without the special tokens a tokenizer adds, and with its BOS token in front when
    `bos` says so (see `bos_flag`)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkbenchError("The prompt is empty.", hint="Type some text to run the model on.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise WorkbenchError(f"The prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}.")
    ids = list(model.tokenizer.encode(prompt, add_special_tokens=False))
    if bos_flag(model, bos):
        ids = [model.tokenizer.bos_token_id, *ids]
    check_token_ids(model, ids)
    return ids


def check_token_ids(model, ids: list[int]) -> None:
    """Token ids a link or a file supplied must fit the model: in vocabulary range and context length."""
    n_ctx, d_vocab = model.summary.n_ctx, model.summary.d_vocab
    if not ids:
        raise WorkbenchError("There are no tokens to run.")
    if len(ids) > n_ctx:
        raise WorkbenchError(f"The prompt is {len(ids)} tokens long; this model's context is {n_ctx} tokens.",
                             hint="Shorten the prompt.")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < d_vocab]
    if bad:
        raise WorkbenchError(f"Token ids {bad[:5]} are outside this model's vocabulary (0..{d_vocab - 1}).",
                             hint="Was the link made with another model?")


def single_token_ids(model, tokens, what: str = "token", where: str = "") -> list[int]:
    """One id per token string (leading spaces count); a string that is not one token is refused, naming its
    pieces."""
    ids = []
    for t in tokens:
        enc = model.tokenizer.encode(t, add_special_tokens=False)
        if len(enc) != 1:
            pieces = [model.tokenizer.decode([i]) for i in enc]
            lead = f"{where}: the" if where else "The"
            raise WorkbenchError(f"{lead} {what} {t!r} is {len(enc)} tokens ({pieces}) for this model, not one; "
                                 "each must be one token.",
                                 hint="Leading spaces matter: ' Paris' and 'Paris' are different tokens.")
        ids.append(enc[0])
    return ids


def token_strings(model, ids: list[int]) -> list[str]:
    return [model.tokenizer.decode([i]) for i in ids]


def tokenize(model, ids: list[int]) -> pd.DataFrame:
    """One row per position: pos, token_id, token (its text)."""
    return pd.DataFrame({"pos": range(len(ids)), "token_id": ids, "token": token_strings(model, ids)})


def encode_texts(model, texts, drop_last: int = 0, bos: str = "auto") -> list[list[int]]:
    """Each text encoded, with `drop_last` final tokens cut (at least two tokens must remain)."""
    seqs = []
    for i, text in enumerate(texts):
        ids = encode(model, text, bos)
        if len(ids) - drop_last < 2:
            raise WorkbenchError(f"Text {i + 1} ({text[:40]!r}) has {len(ids)} tokens; dropping {drop_last} "
                                 "leaves too few.", hint="Lower 'drop last' or use longer texts.")
        seqs.append(ids[:len(ids) - drop_last])
    return seqs
