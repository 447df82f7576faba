"""The lens spec: one prompt, residual sites, lenses, target tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import WorkbenchError
from ...specs import PromptSpec, param
from ...tokens import check_token_ids, single_token_ids

SITES = ("resid_pre", "resid_mid", "resid_post")
LENSES = ("logit", "tuned")
MAX_TARGETS = 8


@dataclass(frozen=True)
class LensSpec(PromptSpec):
    """Logit lens over one prompt."""

    analysis: ClassVar[str] = "lens"
    display_only: ClassVar[dict[str, str]] = {"prompt": "token_ids", "targets": "target_ids"}
    token_id_fields: ClassVar[dict[str, str]] = {"token_ids": "prompt", "target_ids": "targets"}
    title: ClassVar[str] = "Lens: each layer's residual decoded (logit lens, tuned lens) as a next-token distribution"
    sites: tuple[str, ...] = param(SITES, "residual sites to decode", choices=SITES, max_len=len(SITES))
    targets: tuple[str, ...] = param((), "target tokens (text, one token each, e.g. ' Paris') tracked at every cell",
                                  max_len=MAX_TARGETS)
    target_ids: tuple[int, ...] = param((), "target token ids; replace `targets` when given", min=0,
                                     max_len=MAX_TARGETS)
    top_k: int = param(5, "top tokens kept per cell", min=1, max=20)
    lenses: tuple[str, ...] = param(("logit",), "logit: the logit lens; tuned: the tuned lens (trained once per model "
                                             "with the default settings and stored)", choices=LENSES, max_len=2)

    def validate(self) -> None:
        super().validate()
        if not self.sites:
            raise WorkbenchError("Pick at least one residual site.")
        if not self.lenses:
            raise WorkbenchError("Pick at least one lens.")

    def resolve(self, model) -> "LensSpec":
        """Target token ids (a link replays from them): each target must be exactly one token."""
        if self.target_ids:
            check_token_ids(model, list(self.target_ids))
            return self
        return self.replace(target_ids=tuple(single_token_ids(model, self.targets, "target")))


