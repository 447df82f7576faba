"""The circuit spec: the Patching page's prompt pairs, metric and direction, plus edge-scoring methods and the
faithfulness curve."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kernels.circuits import EdgeGraph, check_edge_hooks

from ...errors import WorkbenchError
from ...models import ModelHandle
from ...specs import Spec, param
from ..patching.spec import DIRECTIONS, MAX_PAIRS, METRICS, RELP_RULES, PairIds, _parse_pairs, resolve_pairs

METHODS = ("activation", "eap", "eap_ig", "relp")
LEVELS = ("components",)
METHOD_NAMES = {"activation": "edge activation patching", "eap": "EAP (edge attribution patching)",
                "eap_ig": "EAP-IG (integrated gradients)", "relp": "RelP on edges (LRP rules)"}


@dataclass(frozen=True)
class CircuitSpec(PairIds, Spec):
    """Edges of the residual-stream graph scored on prompt pairs (the shipped IOI pairs built for the model's
    tokenizer, or given as JSON), each method's circuits pruned to paths from the input to the logits, and their
    faithfulness."""

    analysis: ClassVar[str] = "circuit"
    display_only: ClassVar[dict[str, str]] = {"pairs_note": "pairs"}
    title: ClassVar[str] = "Circuits: edges between components, pruned by faithfulness"
    dataset: str = param("ioi", "shipped pairs to use when `pairs` is empty", choices=("ioi", ""))
    n_pairs: int = param(8, "how many shipped pairs (the first ones of the first pair's token length)", min=1,
                         max=MAX_PAIRS)
    pairs: str = param("", 'JSON list of {"clean", "corrupted", "answer", "wrong"} (text) or '
                        '{"clean_ids", "corrupted_ids", "answer_id", "wrong_id"} (token ids)', max_len=200_000)
    level: str = param("components", "components: heads, MLPs, the input and the logits", choices=LEVELS)
    methods: tuple[str, ...] = param(METHODS, "edge scores: activation patching of each edge alone (the ground "
                                     "truth), EAP, EAP-IG, RelP", choices=METHODS, max_len=len(METHODS))
    ig_steps: int = param(8, "EAP-IG's integration steps (points on the path between the two runs' inputs)", min=1,
                          max=128)
    relp_rules: tuple[str, ...] = param(("ln", "identity", "half"), "LRP rules for RelP", choices=RELP_RULES,
                                        max_len=len(RELP_RULES))
    metric: str = param("logit_diff_normalized", "metric at the final position", choices=METRICS)
    direction: str = param("denoise", "denoise: an edge carries its clean value into the corrupted run; noise: its "
                           "corrupted value into the clean run", choices=DIRECTIONS)
    n_points: int = param(12, "circuit sizes on each method's faithfulness curve (1 edge to all, spaced "
                          "logarithmically)", min=2, max=64)
    patch_limit: int = param(5000, "edges activation patching runs on at most (the largest by the first gradient "
                             "method when the graph has more)", min=1, max=1_000_000)
    pairs_note: str = param("", "how the shipped pairs were built for this model (filled in when they are)",
                            max_len=2_000)

    def validate(self) -> None:
        if not self.methods:
            raise WorkbenchError("Pick at least one method.")
        if not self.pairs and not self.dataset:
            raise WorkbenchError("Give prompt pairs, or pick the shipped IOI pairs.")
        if self.pairs:
            _parse_pairs(self.pairs)

    def resolve(self, handle: ModelHandle) -> "CircuitSpec":
        check_graph(handle)
        spec = resolve_pairs(self, handle)
        n_edges = len(EdgeGraph.of(handle.bridge).edges)
        if self.methods == ("activation",) and n_edges > self.patch_limit:
            raise WorkbenchError(f"{handle.name}'s graph has {n_edges:,} edges and activation patching runs on at "
                                 f"most {self.patch_limit:,} (patch_limit).",
                                 hint="Add a gradient method (EAP-IG picks the edges to patch), or raise patch_limit.")
        return spec


def check_graph(handle: ModelHandle) -> None:
    """Refuses, before anything runs, a model whose blocks the edge graph cannot describe: every block needs
    attention whose heads' results add up to its output (a convolution or state-space block, or a norm after the
    head sum, has no per-head edges)."""
    try:
        check_edge_hooks(handle.bridge)
    except ValueError as e:
        arch = getattr(getattr(handle.bridge, "original_model", None), "config", None)
        arch = getattr(arch, "model_type", None) or "this"
        raise WorkbenchError(f"{handle.name} is a {arch} model: {e}. A circuit of heads and MLPs needs attention in "
                             "every block.", hint="Use the Patching page's node sweeps on this model.") from e
