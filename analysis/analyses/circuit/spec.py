"""The circuit spec: the Patching page's prompt pairs, metric and direction, plus edge-scoring methods and the
faithfulness curve."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from kernels.circuits import EdgeGraph, check_edge_hooks, positioned_edges

from ...errors import WorkbenchError
from ...models import ModelHandle
from ...specs import Spec, param
from ..patching.spec import DIRECTIONS, METRICS, RELP_RULES, PromptPairs, resolve_pairs

SAE_INPUT = "sae.{}"  # the input name of layer l's SAE run (feature circuits)
METHODS = ("activation", "eap", "eap_ig", "relp")
LEVELS = ("components", "features")
METHOD_NAMES = {"activation": "edge activation patching", "eap": "EAP (edge attribution patching)",
                "eap_ig": "EAP-IG (integrated gradients)", "relp": "RelP on edges (LRP rules)"}


@dataclass(frozen=True)
class SAEFields:
    """The SAE settings of a feature circuit (and of an intervention on its nodes): the Features page's SAE at
    each layer's residual, trained with these."""

    sae_width: int = param(512, "features: each SAE's number of features", min=8, max=262_144)
    sae_k: int = param(16, "features: active features per token (TopK SAEs)", min=1, max=4096)
    sae_steps: int = param(1500, "features: each SAE's training steps", min=1, max=200_000)
    sae_max_tokens: int = param(65_536, "features: each SAE's training tokens", min=256, max=2_000_000)
    sae_folders: tuple[str, ...] = param((), "features: SAELens-format folders to load instead of training, one per "
                                         "site (each cfg.json's hook_name names it: the residual after a block, "
                                         "blocks.<l>.hook_resid_post, or a block's attention or MLP output, "
                                         "blocks.<l>.hook_attn_out / hook_mlp_out)", max_len=64)
    sae_hashes: tuple[str, ...] = param((), "each folder's content hash, in site order (filled in when read)",
                                        max_len=64)
    # loaded SAEs came after circuits and interventions were stored: out of their keys when there are none
    LEGACY: ClassVar[dict] = {"sae_folders": [], "sae_hashes": []}

    def resolve_folders(self, handle: ModelHandle):
        """The folders read and checked against the model, in the order the model computes their sites with their
        content hashes (so a folder whose files change is another run), sae_width their largest width;
        (spec, {(site, block): width}). Without folders: the trained SAEs' fields, and {}."""
        if not self.sae_folders:
            return self.replace(sae_hashes=()), {}
        from ..features.sae import check_fits, read_folder_cfg

        found: dict[tuple[str, int], tuple[str, str, int]] = {}
        for folder in self.sae_folders:
            cfg, sha = read_folder_cfg(folder)
            site = folder_site(folder, cfg["hook_name"])
            check_fits(cfg, handle)
            if site in found:
                raise WorkbenchError(f"Two of the folders hold SAEs of {site_name(site)}.",
                                     hint="Give one folder per site.")
            found[site] = (folder.strip(), sha, int(cfg["d_sae"]))
        sites = sorted(found, key=site_order)
        return (self.replace(sae_folders=tuple(found[s][0] for s in sites),
                             sae_hashes=tuple(found[s][1] for s in sites),
                             sae_width=max(found[s][2] for s in sites)), {s: found[s][2] for s in sites})


SITES = ("attn_out", "mlp_out", "resid_post")  # a block's sites in the order it computes them
SUBLAYERS = SITES[:2]


# the node names of a site's features and its error node: f{l}.{i} / err{l} at a residual, attn{l}.{i} / attnerr{l},
# mlp{l}.{i} / mlperr{l}; and a pattern for either (groups fs, fl, feature; es, el)
NODE_PREFIX = {"resid_post": ("f", "err"), "attn_out": ("attn", "attnerr"), "mlp_out": ("mlp", "mlperr")}
SITE_OF_PREFIX = {prefix: site for site, prefixes in NODE_PREFIX.items() for prefix in prefixes}
FEATURE_NODE = (r"(?P<fs>{})(?P<fl>\d+)\.(?P<feature>\d+)|(?P<es>{})(?P<el>\d+)".format(
    *("|".join(sorted((p[i] for p in NODE_PREFIX.values()), key=len, reverse=True)) for i in (0, 1))))


def site_order(site: tuple[str, int]) -> tuple[int, int]:
    return site[1], SITES.index(site[0])


def site_name(site: tuple[str, int]) -> str:
    kind, layer = site
    return {"resid_post": f"block {layer}'s residual", "attn_out": f"block {layer}'s attention output",
            "mlp_out": f"block {layer}'s MLP output"}[kind]


def sae_input(site: tuple[str, int]) -> str:
    """The input name of a site's SAE run: `sae.{l}` at a residual (as before sublayers), `sae.attn_out.{l}`…"""
    kind, layer = site
    return SAE_INPUT.format(layer) if kind == "resid_post" else f"sae.{kind}.{layer}"


@dataclass(frozen=True)
class CircuitSpec(PromptPairs, SAEFields, Spec):
    """Edges of the residual-stream graph scored on prompt pairs (the shipped IOI pairs built for the model's
    tokenizer, or given as JSON), each method's circuits pruned to paths from the input to the logits, and their
    faithfulness."""

    analysis: ClassVar[str] = "circuit"
    # the feature level's fields, added after component circuits were stored: out of the key at their defaults
    key_legacy: ClassVar[dict] = {**Spec.key_legacy, "layers": [], "sae_width": 512, "sae_k": 16, "sae_steps": 1500,
                                  "sae_max_tokens": 65_536, "ablation": "mean", "edge_nodes": 64,
                                  "edge_ablation": "corrupted", "positions": "summed", "sublayers": [],
                                  **SAEFields.LEGACY}
    title: ClassVar[str] = "Circuits: edges between components and between SAE features, pruned by faithfulness"
    level: str = param("components", "components: heads, MLPs, the input and the logits; features: SAE features "
                       "and error nodes at each chosen layer's residual, by position", choices=LEVELS)
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
    patch_limit: int = param(5000, "edges (features: nodes) activation patching runs on at most (the largest by "
                             "the first gradient method when the graph has more)", min=1, max=1_000_000)
    layers: tuple[int, ...] = param((), "features: the blocks after which an SAE splits the residual (empty: "
                                    "every block)", min=0, max=1024, max_len=1024)
    sublayers: tuple[str, ...] = param((), "features: SAEs also at each of those blocks' attention and/or MLP output "
                                       "(Marks et al.'s full graph; trained here like the residual ones)",
                                       choices=SUBLAYERS, max_len=2)
    ablation: str = param("mean", "features: what a node outside a circuit takes: its mean over the clean prompts "
                          "(position by position), or its value in the corrupted run", choices=("mean", "corrupted"))
    edge_ablation: str = param("corrupted", "components: what an edge outside a circuit carries into its reader: "
                               "its writer's output in the pair's corrupted run, or the writer's mean over the other "
                               "pairs' clean prompts of that length (position by position; held out: never the pair's "
                               "own)", choices=("corrupted", "mean"))
    positions: str = param("summed", "components: an edge summed over positions (u -> d), or one edge per position "
                           "(u@p -> d@p: the residual stream at p carries a writer's output at p to the readers at p; "
                           "pairs of one token length)", choices=("summed", "each"))
    edge_nodes: int = param(64, "features: the nodes per method (the largest by |score|) whose edges are computed",
                            min=1, max=5_000)

    def validate(self) -> None:
        if not self.methods:
            raise WorkbenchError("Pick at least one method.")
        self.validate_pairs()

    def resolve(self, handle: ModelHandle) -> "CircuitSpec":
        if self.level == "features":
            return self.resolve_features(handle)
        check_graph(handle)
        # the feature level's fields at their defaults: out of the key
        spec = resolve_pairs(self.replace(ablation="mean", sae_folders=(), sae_hashes=(), sublayers=()), handle)
        if spec.edge_ablation == "mean":
            counts = Counter(len(p["clean_ids"]) for p in json.loads(spec.pairs))
            alone = sorted(length for length, c in counts.items() if c < 2)
            if alone:
                raise WorkbenchError(f"Mean ablation gives an edge its writer's mean over the other pairs of the "
                                     f"same token length, and {len(alone)} length(s) ({', '.join(map(str, alone))}) "
                                     "have a single pair.",
                                     hint="Add pairs of those lengths, or ablate to the corrupted run.")
        graph = EdgeGraph.of(handle.bridge)
        n_edges, what = len(graph.edges), "edges"
        if spec.positions == "each":
            length = one_length(spec, "Edges by position name their positions")
            n_edges, what = len(positioned_edges(graph, length)), f"edges at {length} positions"
            if n_edges > MAX_POSITIONED_EDGES:
                raise WorkbenchError(f"{handle.name}'s graph has {n_edges:,} {what}; a circuit by position holds at "
                                     f"most {MAX_POSITIONED_EDGES:,}.",
                                     hint="Give shorter prompts, or sum each edge over positions.")
        if self.methods == ("activation",) and n_edges > self.patch_limit:
            raise WorkbenchError(f"{handle.name}'s graph has {n_edges:,} {what} and activation patching runs on at "
                                 f"most {self.patch_limit:,} (patch_limit).",
                                 hint="Add a gradient method (EAP-IG picks the edges to patch), or raise patch_limit.")
        return spec


    def resolve_features(self, handle: ModelHandle) -> "CircuitSpec":
        """Every block's residual when no layers are given; a gradient method for the edges; in-range layers."""
        n_layers = handle.summary.n_layers
        if not any(m != "activation" for m in self.methods):
            raise WorkbenchError("Feature circuits need a gradient method (EAP, EAP-IG or RelP): their edges come "
                                 "from gradients; activation patching scores the nodes.",
                                 hint="Add EAP-IG, EAP or RelP.")
        spec, widths = self.resolve_folders(handle)
        if widths:
            resid = sorted(la for kind, la in widths if kind == "resid_post")
            if not resid:
                raise WorkbenchError("The SAE folders hold no residual SAE (blocks.<l>.hook_resid_post): a feature "
                                     "circuit's residual SAEs are the cuts its graph is complete between.",
                                     hint="Add residual-stream SAEs, one per block.")
            late = [site_name(s) for s in widths if s[0] != "resid_post" and s[1] > resid[-1]]
            if late:
                raise WorkbenchError(f"The SAE of {late[0]} has no residual SAE at or after its block (the last is "
                                     f"after block {resid[-1]}).", hint="Add a residual SAE at or after that block.")
            if self.layers and set(self.layers) != set(resid):
                raise WorkbenchError(f"The SAE folders split the residual after blocks {resid}, and layers asks for "
                                     f"{sorted(set(self.layers))}.", hint="Leave layers empty: the folders name them.")
            if self.sublayers:
                raise WorkbenchError("With SAE folders the folders name every site; sublayers trains attention or "
                                     "MLP SAEs here.", hint="Leave sublayers empty, or add those SAEs' folders.")
        layers = tuple(sorted({la for kind, la in widths if kind == "resid_post"})) or (
            tuple(sorted(set(self.layers))) if self.layers else tuple(range(n_layers)))
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise WorkbenchError(f"{handle.name} has blocks 0 to {n_layers - 1}; the SAE layers {bad} are not among "
                                 "them.", hint="Leave layers empty for every block.")
        spec = spec.replace(sublayers=tuple(x for x in SUBLAYERS if x in self.sublayers))
        missing = sorted({f"blocks.{la}.hook_{kind}" for kind, la in sae_sites(spec.replace(layers=layers))}
                         - set(handle.bridge.hook_dict))
        if missing:
            raise WorkbenchError(f"{handle.name} has no hook {missing[0]}: its blocks lack that site.",
                                 hint="Leave sublayers empty on this model.")
        # the components' fields at their defaults
        spec = resolve_pairs(spec.replace(layers=layers, edge_ablation="corrupted", positions="summed"), handle)
        one_length(spec, "Feature circuits name nodes by position")
        return spec


MAX_POSITIONED_EDGES = 1_500_000  # edges of a circuit by position (its table holds a row per edge and method)


def one_length(spec, why: str) -> int:
    """The token length of a resolved spec's pairs; pairs of several lengths are refused (`why`: what needs one)."""
    lengths = sorted({len(p["clean_ids"]) for p in json.loads(spec.pairs)})
    if len(lengths) > 1:
        raise WorkbenchError(f"{why}, and these pairs have {len(lengths)} token lengths "
                             f"({', '.join(map(str, lengths))}).",
                             hint="Give pairs of one token length (the shipped IOI pairs are).")
    return lengths[0]


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


def sae_spec_at(spec, layer: int, folders: dict | None = None, site: str = "resid_post"):
    """The Features page's SAE at a site (block `layer`'s residual by default, or its attention or MLP output) with a
    circuit spec's SAE settings, or loaded from the spec's folder for that site (`folders`: the spec's
    folders_by_site, when the caller has read them)."""
    from ..features.sae import SAESpec

    base = {f: getattr(spec, f) for f in Spec.field_names()}
    if spec.sae_folders:
        folders = folders_by_site(spec) if folders is None else folders
        if (site, layer) not in folders:
            raise WorkbenchError(f"None of the SAE folders holds the SAE of {site_name((site, layer))}.",
                                 hint="Give a folder for every site whose features or errors are used.")
        folder, sha = folders[(site, layer)]
        return SAESpec(**base, source="folder", folder=folder, folder_sha256=sha, layer=layer, site=site)
    return SAESpec(**base, layer=layer, site=site, width=spec.sae_width, k=spec.sae_k, steps=spec.sae_steps,
                   max_tokens=spec.sae_max_tokens)


def folders_by_site(spec) -> dict[tuple[str, int], tuple[str, str]]:
    """{(site, block): (folder, content hash)} of a spec's SAE folders in the order the model computes the sites,
    from each cfg.json alone (the hashes are resolve's; before it, as when the smaller settings are estimated,
    they are empty); {} without folders."""
    from ..features.sae import folder_hook

    hashes = spec.sae_hashes or ("",) * len(spec.sae_folders)
    found: dict[tuple[str, int], tuple[str, str]] = {}
    for folder, sha in zip(spec.sae_folders, hashes):
        found.setdefault(folder_site(folder, folder_hook(folder)), (folder, sha))
    return dict(sorted(found.items(), key=lambda kv: site_order(kv[0])))


def folder_site(folder: str, hook_name: str) -> tuple[str, int]:
    """The site a folder's SAE reads: (resid_post | attn_out | mlp_out, block); a folder of another hook is refused."""
    from ..features.sae import parse_hook

    site, layer = parse_hook(hook_name)
    if site not in SITES:
        raise WorkbenchError(f"{folder[:200]!r} holds an SAE of {hook_name}; a feature circuit splits the residual "
                             "after each block (blocks.<l>.hook_resid_post) and, where you have them, attention and "
                             "MLP outputs (hook_attn_out, hook_mlp_out).",
                             hint="Give residual-stream SAEs, one per block, and sublayer SAEs beside them.")
    return site, layer


def sae_sites(spec) -> list[tuple[str, int]]:
    """The sites a feature circuit splits, in the order the model computes them: its folders' or the residual
    after each of `layers` with the chosen sublayers of those blocks."""
    if spec.sae_folders:
        return list(folders_by_site(spec))
    sites = [("resid_post", la) for la in spec.layers] + [(s, la) for la in spec.layers
                                                         for s in getattr(spec, "sublayers", ())]
    return sorted(set(sites), key=site_order)


def sae_specs(spec: CircuitSpec, got) -> dict | None:
    """The Features page's SAE at each site a feature circuit splits, by input name (None for components)."""
    if spec.level != "features":
        return None
    folders = folders_by_site(spec)
    return {sae_input(site): sae_spec_at(spec, site[1], folders, site[0]) for site in sae_sites(spec)}
