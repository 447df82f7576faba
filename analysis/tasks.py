"""The task data shipped in data/tasks, tokenised by whichever model a spec names.

The shipped tasks are text plus the pieces they are built from (entities.json: templates, names, places,
objects, countries, capitals), never one tokenizer's ids, so they fit any model:

- IOI pairs (`ioi_pairs`): each shipped pair (template, order, subject, indirect object, place, object and the
  three names of its ABC corruption) is rebuilt for the model's tokenizer. A name that is several tokens for
  it (with its leading space) is replaced by a single-token name, chosen reproducibly from the pair's id; a pair
  whose clean and corrupted prompts still differ in token count is dropped. What was replaced or dropped is
  counted in `TaskData.notes`.
- Facts (`fact_prompts`): "The capital of France is" → " Paris"; a capital that is several tokens is dropped.
- Induction prompts (`induction_prompts`): a random span of ordinary word tokens repeated once. The shipped
  spans are ids of the default model's vocabulary and are used for any model with that exact vocabulary (its
  checkpoints); other models get spans of the same lengths drawn from their own vocabulary (seeded by row).
- Concept sentences (`task_rows("concepts")`): text and labels; encoded by the analysis that uses them.

Whether a BOS token goes in front follows `tokens.encode` (the tokenizer's convention unless the spec says).
For the default model nothing is replaced or dropped, so its token ids (and run keys) are what they always were.
"""
from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field

from .models import DATA_DIR, DEFAULT_MODEL_DIR
from .tokens import bos_flag, encode

TASKS_DIR = DATA_DIR / "tasks"


@functools.lru_cache(maxsize=8)
def _rows(name: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines())


def task_rows(name: str) -> list[dict]:
    """The rows of a shipped task file (copies: callers may change them)."""
    return [dict(r) for r in _rows(name)]


def task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))


@functools.lru_cache(maxsize=1)
def entities() -> dict:
    return json.loads((TASKS_DIR / "entities.json").read_text())


@dataclass(frozen=True)
class TaskData:
    """A shipped task tokenised for one model: the rows kept, how many there were, and why any changed."""

    rows: list[dict]
    total: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        head = f"{len(self.rows)} of {self.total} shipped prompts"
        return head + (": " + "; ".join(self.notes) if self.notes else " (all of them, as shipped)")


@dataclass(frozen=True)
class _Vocab:
    """What tokenising needs of a model (its tokenizer and config summary): the caches below hold this, never
    the model's weights."""

    tokenizer: object = field(hash=False, compare=False)
    summary: object
    key: int  # id of the tokenizer object

    @classmethod
    def of(cls, model) -> "_Vocab":
        return cls(model.tokenizer, model.summary, id(model.tokenizer))


def _single(model, word: str) -> int | None:
    """The id of ' word' when it is one token for this model, else None."""
    ids = model.tokenizer.encode(" " + word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _several(model, words) -> list[str]:
    return [w for w in words if _single(model, w) is None]


# ----------------------------------------------------------------------------------------------------------
# IOI
# ----------------------------------------------------------------------------------------------------------
def _ioi_template(t: int, order: str) -> str:
    """Template t in the pair's order: written BABA ({B} the subject, named twice); ABBA swaps the first two."""
    tpl = entities()["ioi_templates"][t]
    return tpl.replace("{B} and {A}", "{A} and {B}", 1) if order == "ABBA" else tpl


def ioi_texts(row: dict) -> tuple[str, str]:
    """(clean, corrupted) text of a shipped IOI row: the corruption puts its three names, in order of appearance,
    into the three name slots."""
    tpl = _ioi_template(row["template"], row["order"])
    clean = tpl.format(A=row["io"], B=row["s"], PLACE=row["place"], OBJECT=row["object"])
    fresh = iter(row["abc"])
    corrupted = re.sub(r"\{[AB]\}", lambda _: next(fresh), tpl).format(PLACE=row["place"], OBJECT=row["object"])
    return clean, corrupted


def ioi_pairs(model, bos: str = "auto") -> TaskData:
    """The shipped IOI pairs for this model: clean/corrupted ids of equal length, single-token answers."""
    return _ioi_pairs(_Vocab.of(model), bos_flag(model, bos))


@functools.lru_cache(maxsize=16)
def _ioi_pairs(vocab: _Vocab, bos: bool) -> TaskData:
    rows = _rows("ioi")
    names = entities()["names"]
    multi = set(_several(vocab, names))
    usable = [n for n in names if n not in multi]
    out, replaced, dropped = [], 0, 0
    for r in rows:
        r = dict(r)
        if multi & {r["io"], r["s"], *r["abc"]}:
            rng = random.Random(f"ioi-{r['id']}")
            keep = [n for n in (r["io"], r["s"], *r["abc"]) if n not in multi]
            pool = [n for n in usable if n not in keep]
            rng.shuffle(pool)
            swap = iter(pool)
            r["io"], r["s"] = [n if n not in multi else next(swap) for n in (r["io"], r["s"])]
            r["abc"] = [n if n not in multi else next(swap) for n in r["abc"]]
            replaced += 1
        r["clean"], r["corrupted"] = ioi_texts(r)
        clean = encode(vocab, r["clean"], "yes" if bos else "no")
        corrupted = encode(vocab, r["corrupted"], "yes" if bos else "no")
        if len(clean) != len(corrupted):
            dropped += 1
            continue
        out.append({**r, "clean_ids": clean, "corrupted_ids": corrupted, "io_id": _single(vocab, r["io"]),
                    "s_id": _single(vocab, r["s"])})
    notes = []
    if multi:
        notes.append(f"{len(multi)} shipped names are several tokens for this tokenizer ({', '.join(sorted(multi))}); "
                     f"{replaced} pairs use single-token names in their place")
    if dropped:
        notes.append(f"{dropped} pairs dropped: their clean and corrupted prompts differ in token count")
    return TaskData(out, len(rows), tuple(notes))


# ----------------------------------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------------------------------
def fact_prompts(model, bos: str = "auto") -> TaskData:
    """Country → capital prompts whose answer (with its leading space) is one token for this model."""
    return _fact_prompts(_Vocab.of(model), bos_flag(model, bos))


@functools.lru_cache(maxsize=16)
def _fact_prompts(vocab: _Vocab, bos: bool) -> TaskData:
    rows = _rows("facts")
    out, multi = [], set()
    for r in rows:
        answer = _single(vocab, r["answer"])
        if answer is None:
            multi.add(r["answer"])
            continue
        out.append({**r, "ids": encode(vocab, r["prompt"], "yes" if bos else "no"), "answer_id": answer})
    notes = ()
    if multi:
        notes = (f"{len(rows) - len(out)} prompts dropped: {len(multi)} capitals are several tokens for this "
                 f"tokenizer ({', '.join(sorted(multi)[:8])}{', …' if len(multi) > 8 else ''})",)
    return TaskData(out, len(rows), notes)


# ----------------------------------------------------------------------------------------------------------
# Induction
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _default_vocab() -> dict[str, int]:
    return json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]


def word_pool(model) -> list[int]:
    """Ids of ordinary word tokens (a leading space, then two or more letters) in this model's vocabulary."""
    return _word_pool(_Vocab.of(model))


@functools.lru_cache(maxsize=16)
def _word_pool(vocab: _Vocab) -> list[int]:
    tok = vocab.tokenizer
    n = min(len(tok), vocab.summary.d_vocab)
    special = set(tok.all_special_ids)
    texts = tok.batch_decode([[i] for i in range(n)])
    return [i for i, t in enumerate(texts) if i not in special and t.startswith(" ") and t[1:].isalpha()
            and len(t) > 2]


def induction_prompts(model, bos: str = "auto") -> TaskData:
    """Repeated random spans: the shipped ids for the default vocabulary, else spans from the model's own."""
    return _induction_prompts(_Vocab.of(model), bos_flag(model, bos))


@functools.lru_cache(maxsize=16)
def _induction_prompts(vocab: _Vocab, bos: bool) -> TaskData:
    rows = _rows("induction")
    bos_id = [vocab.tokenizer.bos_token_id] if bos else []
    if vocab.tokenizer.get_vocab() == _default_vocab():
        out = [{**r, "ids": bos_id + r["ids"][1:]} for r in rows]  # shipped with the default BOS in front
        return TaskData(out, len(rows))
    pool = _word_pool(vocab)
    out = []
    for r in rows:
        rng = random.Random(f"induction-{r['id']}")
        span = [rng.choice(pool) for _ in range(r["span_length"])]
        out.append({**r, "ids": bos_id + span + span})
    return TaskData(out, len(rows), (f"spans drawn from this model's {len(pool):,} word tokens (seeded per "
                                     "prompt), not the shipped ones",))
