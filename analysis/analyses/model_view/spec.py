from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...specs import PromptSpec, param


@dataclass(frozen=True)
class ModelViewSpec(PromptSpec):
    """The Model page: tokenization, top-k next-token predictions and every head's attention pattern."""

    analysis: ClassVar[str] = "model"
    title: ClassVar[str] = "Model view: tokens, next-token predictions, attention patterns"
    top_k: int = param(10, "how many next-token predictions to keep", min=1, max=100)
