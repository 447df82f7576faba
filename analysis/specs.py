"""Specs: what an analysis run is, as a frozen, validated, JSON-serialisable dataclass.

A spec comes from one of three places (a page's widgets, a URL query string, the command line or a JSON file)
and is validated the same way for all of them: `SpecClass.from_dict(d)` coerces strings (URL and CLI values) to
the field types, rejects unknown keys and out-of-range values with a `WorkbenchError`, and returns the spec.

Field metadata drives validation, the URL format and the CLI flags:
    help     one line for --help
    min/max  bounds for numbers; max_len for strings and sequences
    choices  allowed values
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import WorkbenchError
from .models import DEFAULT_MODEL, DTYPES

MAX_TOKENS = 4096
BOS_CHOICES = ("auto", "yes", "no")


def param(default, help: str, **meta):
    """A spec field: its default, one line of help, and metadata (min, max, max_len, choices)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Spec:
    """Fields every analysis has: which model, in which revision and dtype, and whether texts get a BOS token."""

    analysis: ClassVar[str] = ""
    title: ClassVar[str] = ""
    # fields added after stores were written: left out of the run key at the value that reproduces what ran
    # before they existed, so those runs stay hits (every text used to get a BOS token in front)
    key_legacy: ClassVar[dict[str, Any]] = {"bos": "yes"}
    # fields holding token ids made by a tokenizer, each with the field holding the text they were made from:
    # a link carries its tokenizer's fingerprint beside them, and they are made again from the text (or refused)
    # when the model that opens the link has another tokenizer (views/page.py)
    token_id_fields: ClassVar[dict[str, str]] = {}
    model: str = param(DEFAULT_MODEL, "model: 'default', a Hugging Face id or a local folder", max_len=1024)
    revision: str = param("", "hub revision (branch, tag or commit); empty for the default", max_len=128)
    dtype: str = param("float32", "weights dtype", choices=tuple(DTYPES))
    bos: str = param("auto", "a BOS token in front of each text: auto (as the model's tokenizer does), yes, no",
                     choices=BOS_CHOICES)

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self) -> str:
        return json.dumps({"analysis": self.analysis, **self.to_dict()}, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_unknown: bool = False):
        if not isinstance(data, dict):
            raise WorkbenchError("A spec must be a JSON object.")
        data = dict(data)
        if data.get("analysis", cls.analysis) != cls.analysis:
            raise WorkbenchError(f"This spec is for {data.get('analysis')!r}, not {cls.analysis!r}.")
        data.pop("analysis", None)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown and not ignore_unknown:
            raise WorkbenchError(f"Unknown field(s) for {cls.analysis}: {', '.join(unknown[:10])}.",
                                 hint=f"Known fields: {', '.join(known)}.")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, f in known.items():
            if name in data:
                values[name] = coerce(name, data[name], hints[name], f.metadata)
        spec = cls(**values)
        spec.validate()
        return spec

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Cross-field checks; subclasses extend it. Field-level checks happen in from_dict."""

    # -- token ids and the tokenizer that made them --------------------------------------------------------
    @classmethod
    def holds_ids(cls, name: str, value) -> bool:
        """Does this value of the token-id field `name` hold any ids?"""
        return bool(value)

    def holds_token_ids(self) -> bool:
        return any(self.holds_ids(f, getattr(self, f)) for f in self.token_id_fields)

    def without_token_ids(self) -> "Spec":
        """This spec with its token ids dropped, so that `resolve` makes them again from the text under the model
        it runs on. Ids with no text to make them from are refused (they belong to another tokenizer)."""
        changes = {}
        for ids_field, text_field in self.token_id_fields.items():
            if not self.holds_ids(ids_field, getattr(self, ids_field)):
                continue
            text = getattr(self, text_field) if text_field else ""
            if not (text.strip() if isinstance(text, str) else text):
                raise WorkbenchError(f"It gives {ids_field} and no {text_field or 'text'} to tokenise again.")
            changes[ids_field] = type(getattr(self, ids_field))()
        return self.replace(**changes) if changes else self

    def resolve(self, model) -> "Spec":
        """This spec with what depends on the model filled in (token ids of pairs or targets), checked against
        it; the runner calls it before deriving the run key. Only the tokenizer and the config may be read."""
        return self


def coerce(name: str, value: Any, typ, meta: dict) -> Any:
    """Turn a JSON, URL or CLI value into the field's type and check its bounds."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(value)
                value = value.lower() in {"1", "true", "yes"}
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if isinstance(value, str) and not re.fullmatch(r"-?\d{1,12}", value.strip()):
                raise ValueError(value)
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(value)
        elif typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            if "\x00" in value:
                raise ValueError("NUL character")
        elif origin is tuple:
            (inner, *_rest) = typing.get_args(typ)
            if isinstance(value, str) and inner is str and "choices" not in meta:
                # free text items (e.g. target tokens ' Paris'): split on commas only, spaces are part of them
                value = [v for v in value.split(",") if v.strip()]
            elif isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value.strip()) if v] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            if len(value) > meta.get("max_len", MAX_TOKENS):
                raise WorkbenchError(f"{name} has {len(value)} items; at most {meta.get('max_len', MAX_TOKENS)}.")
            value = tuple(coerce(name, v, inner, {k: v2 for k, v2 in meta.items() if k != "max_len"})
                          for v in value)
            return value
        else:
            raise TypeError(f"unsupported field type {typ}")
    except WorkbenchError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise WorkbenchError(f"{name} = {str(value)[:60]!r} is not a valid {getattr(typ, '__name__', typ)}.") from e
    if "choices" in meta and value not in meta["choices"]:
        raise WorkbenchError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, not {str(value)[:60]!r}.")
    if "min" in meta and value < meta["min"]:
        raise WorkbenchError(f"{name} must be at least {meta['min']}, not {value}.")
    if "max" in meta and value > meta["max"]:
        raise WorkbenchError(f"{name} must be at most {meta['max']}, not {value}.")
    if isinstance(value, str) and len(value) > meta.get("max_len", 100_000):
        raise WorkbenchError(f"{name} is {len(value):,} characters long; at most {meta['max_len']:,}.")
    return value


@dataclass(frozen=True)
class PromptSpec(Spec):
    """A spec over one prompt. `token_ids` is canonical: a link replays from it, so it cannot drift when a
    tokenizer changes; `prompt` is kept for display and is tokenized only when no ids are given."""

    # text fields that only label what ran once their token ids are known (left out of the run key then)
    display_only: ClassVar[dict[str, str]] = {"prompt": "token_ids"}
    token_id_fields: ClassVar[dict[str, str]] = {"token_ids": "prompt"}
    prompt: str = param("", "the prompt text", max_len=20_000)
    token_ids: tuple[int, ...] = param((), "token ids (with BOS); replaces the prompt's tokenization when given",
                                    min=0, max_len=MAX_TOKENS)

    def validate(self) -> None:
        if not self.prompt.strip() and not self.token_ids:
            raise WorkbenchError("The prompt is empty.", hint="Type some text to run the model on.")
