"""A sparse autoencoder for one hook point of a model: trained here on the model's activations, or loaded from a
folder in SAELens's format; either way evaluated on held-out text and stored by (model fingerprint, spec).

Training text: the shipped task and concept sentences (tokenised for the model), or the user's text; whole
sentences are held out before training (or the user's held-out text is used), and every reported figure is
measured on them: fraction of variance explained (FVE), L0, dead features, and the model's next-token loss with
the SAE spliced in, as "CE loss recovered" = (CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean).
Position 0 is left out everywhere (not trained on, not read, not spliced): whether or not it is a BOS token, the
first position is the attention sink whose residual norm is tens to hundreds of times the others' (SmolLM2, which
has no BOS, included), and an SAE that spends its features on it reconstructs nothing else. SAE training
conventionally skips it.

The folder format (SAELens 6): `cfg.json` with architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, k (topk) and `metadata` (model_name, hook_name, hook_layer,
prepend_bos, context_size, ...); `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec (and threshold for jumprelu). Older SAELens configs (hook_name and activation_fn_str at the top level) load
too.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.patching import is_parallel
from kernels.sae import ARCHITECTURES, SparseAutoencoder, TrainSettings, splice_hook, train_sae

from ...errors import WorkbenchError
from ...estimate import ENTRY_FLOPS, SHIPPED_CORPUS_TOKENS, Estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession, check_layer
from ...settings import allow_local_folders, review_mode
from ...specs import Spec, param
from ..tuned_lens.compute import split_sentences

SITES = ("resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out")
SOURCES = ("train", "folder")
DEAD = ("auxk", "resample", "none")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
MAX_CFG_BYTES = 1 << 20
SAELENS_FORMAT = "6.0.0"  # the SAELens config format these folders follow (its `metadata.sae_lens_version`)
SKIP_FIRST = True  # position 0 is never an SAE's input (see above)
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|resid_mid|mlp_out|attn_out)")


@dataclass(frozen=True)
class SAESpec(Spec):
    """Train a sparse autoencoder on one hook point's activations, or load one from a SAELens-format folder."""

    analysis: ClassVar[str] = "sae"
    title: ClassVar[str] = "Sparse autoencoder: train one on a layer's activations, or load one in SAELens's format"
    source: str = param("train", "train: train one here; folder: load a SAELens-format folder (cfg.json + "
                                 "sae_weights.safetensors)", choices=SOURCES)
    folder: str = param("", "the SAELens-format folder on the server (source 'folder')", max_len=1024)
    folder_sha256: str = param("", "hash of the folder's cfg.json and weights (filled in when it is read)", max_len=64)
    site: str = param("resid_post", "hook point: the residual after (resid_post) or before (resid_pre) the block, "
                                    "between attention and MLP (resid_mid), or a sublayer's output", choices=SITES)
    layer: int = param(-1, "block of the hook point; -1: the middle block", min=-1, max=1024)
    architecture: str = param("topk", "topk: the k largest pre-activations fire (AuxK loss for dead features); "
                                      "standard: ReLU with an L1 penalty (jumprelu: loaded only)",
                              choices=ARCHITECTURES)
    width: int = param(512, "number of features (d_sae)", min=8, max=262_144)
    k: int = param(16, "active features per token (topk)", min=1, max=4096)
    l1_coefficient: float = param(5.0, "L1 penalty on activations times decoder norms (standard)", min=0.0, max=1e4)
    dead: str = param("auxk", "dead features: auxk (auxiliary loss, topk only), resample (reinitialise them at 20, "
                              "40 and 60% of training) or none", choices=DEAD)
    steps: int = param(1500, "Adam steps", min=1, max=200_000)
    lr: float = param(2e-3, "peak learning rate (warm-up over 5% of the steps, decay over the last 20%)",
                      min=1e-6, max=1.0)
    batch_tokens: int = param(1024, "tokens per step", min=16, max=65_536)
    max_tokens: int = param(65_536, "training tokens gathered", min=256, max=2_000_000)
    corpus: str = param("default", "training text: default, the shipped task and concept sentences; text, the "
                                   "text given", choices=("default", "text"))
    text: str = param("", "training text, one passage per line, when corpus is 'text'", max_len=500_000)
    heldout_text: str = param("", "text to evaluate on, one passage per line (empty: 10% of the training "
                                  "sentences, held out whole before training)", max_len=500_000)
    seed: int = param(0, "seed for the split, the initialisation and the batches", min=0, max=2**31 - 1)

    def validate(self) -> None:
        if self.source == "folder":
            if not self.folder.strip():
                raise WorkbenchError("Name the folder that holds the SAE (cfg.json and sae_weights.safetensors).")
            return
        if self.architecture == "jumprelu":
            raise WorkbenchError("JumpReLU SAEs can be loaded from a folder but not trained here.",
                                 hint="Train a topk or a standard (ReLU + L1) SAE.")
        if self.architecture == "topk" and self.k > self.width:
            raise WorkbenchError(f"k = {self.k} is more than the SAE's {self.width} features.")
        if self.dead == "auxk" and self.architecture != "topk":
            raise WorkbenchError("The AuxK loss is for TopK SAEs.", hint="Use dead = resample or none for ReLU + L1.")
        if self.corpus == "text" and not self.text.strip():
            raise WorkbenchError("Give training text, or use the shipped sentences.")

    def resolve(self, model) -> "SAESpec":
        """The middle block for layer -1; for a folder, its site, layer, architecture, width and k (from its
        cfg.json) and its content hash, checked against the model."""
        n_layers = model.summary.n_layers
        if self.source == "folder":
            cfg, sha = read_folder_cfg(self.folder)
            site, layer = parse_hook(cfg["hook_name"])
            spec = self.replace(site=site, layer=layer, architecture=cfg["architecture"], width=cfg["d_sae"],
                                k=cfg.get("k") or self.k, folder_sha256=sha)
            check_fits(cfg, model)
        else:
            spec = self.replace(layer=(n_layers - 1) // 2 if self.layer == -1 else self.layer, folder_sha256="")
        check_layer(spec.layer, n_layers, what="SAE layer", lowest=0)
        if spec.site == "resid_mid" and is_parallel(model.bridge):
            raise WorkbenchError(f"{model.name} runs attention and MLP in parallel: it has no resid_mid.",
                                 hint="Use resid_pre, resid_post, attn_out or mlp_out.")
        return spec

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"


SAE_FIELDS = tuple(f for f in SAESpec.field_names() if f not in Spec.field_names())


def sae_spec(spec) -> SAESpec:
    """The SAE a feature analysis builds on (its spec carries the SAE's fields)."""
    base = {f: getattr(spec, f) for f in Spec.field_names()}
    return SAESpec(**base, **{f: getattr(spec, f) for f in SAE_FIELDS})


# ----------------------------------------------------------------------------------------------------------
# SAELens folders
# ----------------------------------------------------------------------------------------------------------
def parse_hook(hook_name: str) -> tuple[str, int]:
    m = _HOOK.fullmatch(str(hook_name))
    if not m:
        raise WorkbenchError(f"This SAE reads hook {hook_name!r}; the workbench reads SAEs on "
                             "blocks.<l>.hook_resid_pre/resid_mid/resid_post/mlp_out/attn_out.",
                             hint="Attention-output (hook_z) and embedding SAEs are not supported yet.")
    return m.group(2), int(m.group(1))


def _folder(path: str) -> Path:
    if review_mode():
        raise WorkbenchError("Review mode: this server loads no SAE and computes nothing.")
    if not allow_local_folders():
        raise WorkbenchError("This deployment does not read folders on the server.",
                             hint="Train an SAE here instead, or ask whoever runs the server to allow local folders.")
    p = Path(path.strip()).expanduser()
    if not p.is_dir() or not (p / CFG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise WorkbenchError(f"{path[:200]!r} is not a folder holding {CFG_FILE} and {WEIGHTS_FILE}.",
                             hint="Give the folder SAELens saved (or a pretrained SAE's folder you downloaded).")
    return p


def normalise_cfg(raw: dict) -> dict:
    """A SAELens cfg.json (format 6, or older) as {architecture, d_in, d_sae, k, apply_b_dec_to_input, hook_name,
    model_name, prepend_bos, context_size, dataset_path}; what the workbench cannot honour is refused."""
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{CFG_FILE} is not a JSON object.")
    meta = raw.get("metadata") or raw.get("meta") or {}
    if not isinstance(meta, dict):
        meta = {}
    get = lambda k, default=None: raw.get(k, meta.get(k, default))  # noqa: E731 - format 6 keeps these in metadata
    act = str(raw.get("activation_fn", raw.get("activation_fn_str", "relu")))
    arch = str(raw.get("architecture", "standard"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    if arch == "standard" and act == "topk":  # older SAELens wrote TopK SAEs as standard + a topk activation
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise WorkbenchError(f"This SAE's architecture is {arch!r}; the workbench reads topk, standard (ReLU) and "
                             "jumprelu SAEs.")
    hook = get("hook_name") or get("hook_point")
    if not hook:
        raise WorkbenchError(f"{CFG_FILE} names no hook point (hook_name).")
    norm = raw.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise WorkbenchError(f"This SAE expects its inputs normalised ({norm!r}); the workbench reads SAEs with "
                             "normalize_activations 'none'.", hint="Fold the normalisation into the weights first "
                                                                   "(SAELens: fold_activation_norm_scaling_factor).")
    if raw.get("reshape_activations", "none") not in (None, "none"):
        raise WorkbenchError("This SAE reshapes its input (hook_z); that is not supported yet.")
    if raw.get("finetuning_scaling_factor"):
        raise WorkbenchError("This SAE has a finetuning scaling factor; that is not supported.")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        k = int(raw.get("k", kwargs.get("k", 0)) or 0) if arch == "topk" else None
    except (KeyError, TypeError, ValueError) as e:
        raise WorkbenchError(f"{CFG_FILE} lacks a valid d_in, d_sae (or k for topk): {e}") from e
    if arch == "topk" and not 0 < k <= d_sae:
        raise WorkbenchError(f"{CFG_FILE} gives no valid k (active features) for this TopK SAE.")
    return {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "k": k,
            "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)), "hook_name": str(hook),
            "model_name": str(get("model_name") or ""), "prepend_bos": get("prepend_bos"),
            "context_size": get("context_size"), "dataset_path": get("dataset_path")}


def _cfg_bytes(p: Path) -> tuple[bytes, dict]:
    """cfg.json of a SAELens folder: its bytes (bounded) and the JSON they hold."""
    raw_bytes = (p / CFG_FILE).read_bytes()[:MAX_CFG_BYTES + 1]
    if len(raw_bytes) > MAX_CFG_BYTES:
        raise WorkbenchError(f"{CFG_FILE} is larger than {MAX_CFG_BYTES // 1024} KiB; it cannot be an SAE config.")
    try:
        return raw_bytes, json.loads(raw_bytes)
    except ValueError as e:
        raise WorkbenchError(f"{CFG_FILE} is not valid JSON: {e}") from e


def read_folder_cfg(path: str) -> tuple[dict, str]:
    """(normalised cfg, sha256 of cfg.json and the weights file) of a SAELens folder."""
    p = _folder(path)
    raw_bytes, raw = _cfg_bytes(p)
    h = hashlib.sha256(raw_bytes)
    with open(p / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return normalise_cfg(raw), h.hexdigest()


def folder_hook(path: str) -> str:
    """The hook a SAELens folder's SAE reads (its cfg.json alone, not the weights' hash)."""
    return normalise_cfg(_cfg_bytes(_folder(path))[1])["hook_name"]


def check_fits(cfg: dict, model) -> None:
    """An SAE fits this model: its input width is the model's d_model at a hook point the model has."""
    site, layer = parse_hook(cfg["hook_name"])
    d_model = model.summary.d_model
    if cfg["d_in"] != d_model:
        raise WorkbenchError(f"This SAE reads {cfg['d_in']}-dimensional activations ({cfg['hook_name']}"
                             f"{', of ' + cfg['model_name'] if cfg['model_name'] else ''}); {model.name} has d_model "
                             f"{d_model}.", hint="Load the model the SAE was trained on.")
    if layer >= model.summary.n_layers:
        raise WorkbenchError(f"This SAE reads {cfg['hook_name']}; {model.name} has blocks 0 to "
                             f"{model.summary.n_layers - 1}.", hint="Load the model the SAE was trained on.")


def sae_from_state(cfg: dict, state: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """An SAE from a normalised cfg and SAELens weights, every tensor's shape checked."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        want["threshold"] = (d_sae,)
    missing = sorted(set(want) - set(state))
    unknown = sorted(set(state) - set(want))
    if missing or unknown:
        raise WorkbenchError(f"{WEIGHTS_FILE} does not hold this architecture's weights"
                             f"{': missing ' + ', '.join(missing) if missing else ''}"
                             f"{'; unexpected ' + ', '.join(unknown[:8]) if unknown else ''}.")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise WorkbenchError(f"{WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}; cfg.json (d_in "
                                 f"{d_in}, d_sae {d_sae}) implies {shape}.")
        if not torch.isfinite(state[name].float()).all():
            raise WorkbenchError(f"{WEIGHTS_FILE}: {name} holds values that are not finite.")
    sae = SparseAutoencoder(d_in, d_sae, cfg["architecture"], cfg.get("k") or 1, cfg["apply_b_dec_to_input"])
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(state[name].float())
    return sae.requires_grad_(False)  # for reading; training builds its own


def load_folder(path: str) -> tuple[SparseAutoencoder, dict, str]:
    """(SAE, normalised cfg, content hash) of a SAELens folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg, sha = read_folder_cfg(path)
    try:
        state = load_file(str(_folder(path) / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise WorkbenchError(f"{WEIGHTS_FILE} could not be read as safetensors: {e}") from e
    return sae_from_state(cfg, state), cfg, sha


def saelens_cfg(sae: SparseAutoencoder, hook_name: str, layer: int, model_name: str, prepend_bos: bool,
                context_size: int, dataset_path: str) -> dict:
    """The cfg.json SAELens (format 6) writes for this SAE."""
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": model_name, "hook_name": hook_name, "hook_layer": layer,
                        "hook_head_index": None, "prepend_bos": prepend_bos, "context_size": context_size,
                        "dataset_path": dataset_path, "sae_lens_version": SAELENS_FORMAT,
                        "sae_lens_training_version": SAELENS_FORMAT}}
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    return cfg


def save_folder(sae: SparseAutoencoder, cfg: dict, path: str | Path) -> Path:
    """Write cfg.json and sae_weights.safetensors into `path` (created)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    save_file(sae.state(), str(p / WEIGHTS_FILE))
    (p / CFG_FILE).write_text(json.dumps(cfg, indent=1))
    return p


def weights_frame(sae: SparseAutoencoder, cfg: dict) -> pd.DataFrame:
    """The SAE as a one-row table for the store: its cfg.json and its safetensors bytes."""
    from safetensors.torch import save

    return pd.DataFrame({"cfg": [json.dumps(cfg)], "safetensors": [save(sae.state())]})


def saelens_zip(result: Result) -> bytes:
    """A stored SAE as a zip of its SAELens folder (cfg.json and sae_weights.safetensors): what the page offers
    for download, for SAELens's `SAE.load_from_disk` once unpacked."""
    import io
    import zipfile

    row = result.extra["weights"].iloc[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(CFG_FILE, json.dumps(json.loads(row["cfg"]), indent=1))
        z.writestr(WEIGHTS_FILE, bytes(row["safetensors"]))
    return buf.getvalue()


def sae_from_result(result: Result) -> tuple[SparseAutoencoder, dict]:
    """(SAE, its SAELens cfg) back from a stored SAE run."""
    from safetensors.torch import load

    row = result.extra["weights"].iloc[0]
    cfg = json.loads(row["cfg"])
    return sae_from_state(normalise_cfg(cfg), load(bytes(row["safetensors"]))), cfg


# ----------------------------------------------------------------------------------------------------------
# Activations and evaluation
# ----------------------------------------------------------------------------------------------------------
def site_activations(session: ModelSession, seqs: list[list[int]], hook: str, skip_first: bool,
                     max_tokens: int | None = None,
                     progress: Progress = no_progress) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(activations [N, d] float32, sequence index [N], position [N]) at `hook` for every token of `seqs` (up to
    max_tokens), position 0 left out with `skip_first`. `progress` hears of each batch of texts."""
    rows, which, where = [], [], []
    total = 0
    kept = []
    for s in seqs:
        if max_tokens is not None and total >= max_tokens:
            break
        kept.append(s)
        total += len(s) - skip_first
    done = 0

    def keep(idx, cache):
        a = cache[hook][:, int(skip_first):].float()  # [b, P', d]
        b, P = a.shape[:2]
        rows.append(a.reshape(b * P, -1).cpu())
        which.append(np.repeat(np.asarray(idx), P))
        where.append(np.tile(np.arange(int(skip_first), int(skip_first) + P), b))
        nonlocal done
        done += b * P
        progress(done / max(1, total), f"{done:,} of {total:,} tokens")

    session.cache_in_batches(kept, [hook], keep)
    if not rows:
        raise WorkbenchError("There is no text to read activations from.")
    X = torch.cat(rows)
    which_a, where_a = np.concatenate(which), np.concatenate(where)
    if max_tokens is not None:
        X, which_a, where_a = X[:max_tokens], which_a[:max_tokens], where_a[:max_tokens]
    return X, which_a, where_a


def next_token_losses(session: ModelSession, seqs: list[list[int]], hooks=(),
                      progress: Progress = no_progress) -> float:
    """Mean next-token cross-entropy over every prediction of `seqs` with these forward hooks attached.
    `progress` hears of each batch."""
    from ...session import same_length_batches

    total, count = 0.0, 0
    batches = list(same_length_batches([s for s in seqs if len(s) > 1]))
    with torch.no_grad():
        for b, (_, toks) in enumerate(batches):
            progress(b / len(batches), f"batch {b + 1} of {len(batches)}")
            toks = toks.to(session.device)
            logits = session.run_with_hooks(toks, list(hooks)).float()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None]).squeeze(-1)
            total += float(-lp.sum())
            count += lp.numel()
    return total / max(1, count)


def encode_rows(width: int) -> int:
    """Rows encoded at once: about 4 MiB per [rows, width] float32 tensor (encoding holds about five)."""
    return max(64, min(4096, 2**20 // width))


def evaluate(session: ModelSession, sae: SparseAutoencoder, hook: str, skip_first: bool, X_train: torch.Tensor,
             held: list[list[int]], progress: Progress = no_progress) -> tuple[dict, pd.DataFrame]:
    """Held-out FVE, L0, dead features (no activation on any training token), CE loss recovered; per-feature
    statistics on the training tokens. `progress` hears of each batch of its parts."""
    X_ev, _, _ = site_activations(session, held, hook, skip_first,
                                  progress=sub_progress(progress, 0.0, 0.1, "held-out activations: "))
    with torch.no_grad():
        acts_ev = sae.encode(X_ev)
        recon = sae.decode(acts_ev)
        fve = 1.0 - float((recon - X_ev).pow(2).sum() / (X_ev - X_ev.mean(0)).pow(2).sum())
        l0 = float((acts_ev > 0).sum(-1).float().mean())
        count = torch.zeros(sae.d_sae)
        total = torch.zeros(sae.d_sae, dtype=torch.float64)
        peak = torch.zeros(sae.d_sae)
        rows = encode_rows(sae.d_sae)
        for c in range(0, X_train.shape[0], rows):
            progress(0.1 + 0.15 * c / X_train.shape[0], f"encoding the training tokens: {c:,} of "
                                                         f"{X_train.shape[0]:,}")
            a = sae.encode(X_train[c:c + rows])
            count += (a > 0).sum(0)
            total += a.double().sum(0)
            peak = torch.maximum(peak, a.max(0).values)
        held_count = (acts_ev > 0).sum(0)
    n = X_train.shape[0]
    per_feature = pd.DataFrame({
        "feature": np.arange(sae.d_sae), "density": (count / n).numpy(),
        "heldout_density": (held_count.float() / max(1, X_ev.shape[0])).numpy(),
        "mean_activation": (total / count.double().clamp(min=1)).float().numpy(), "max_activation": peak.numpy(),
        "decoder_norm": sae.W_dec.detach().norm(dim=1).cpu().numpy(), "dead": (count == 0).numpy()})

    def zero(x, hook=None):
        out = torch.zeros_like(x)
        if skip_first:
            out[:, 0] = x[:, 0]
        return out

    ce_clean = next_token_losses(session, held, progress=sub_progress(progress, 0.25, 0.5, "next-token loss, clean: "))
    ce_sae = next_token_losses(session, held, [(hook, splice_hook(sae, keep_error=False, skip_first=skip_first))],
                               progress=sub_progress(progress, 0.5, 0.75, "next-token loss, the SAE spliced in: "))
    ce_zero = next_token_losses(session, held, [(hook, zero)],
                                progress=sub_progress(progress, 0.75, 1.0, "next-token loss, zero-ablated: "))
    recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")
    return {"fve": fve, "l0": l0, "dead_fraction": float((count == 0).float().mean()),
            "n_dead": int((count == 0).sum()), "ce_clean": ce_clean, "ce_with_sae": ce_sae,
            "ce_zero_ablated": ce_zero, "ce_loss_recovered": recovered,
            "n_heldout_tokens": int(X_ev.shape[0])}, per_feature


def corpus_split(session: ModelSession, spec) -> tuple[list[list[int]], list[list[int]], str]:
    """(training sentences, held-out sentences, what is held out) of an SAE spec's corpus, split as the tuned
    lens splits its text (whole sentences, seeded)."""
    return split_sentences(session, SimpleNamespace(dataset=spec.corpus, text=spec.text, bos=spec.bos,
                                                    heldout_text=spec.heldout_text, seed=spec.seed))


def compute(session: ModelSession, spec: SAESpec, inputs, progress) -> Result:
    hook = session.hook(spec.site, spec.layer)
    skip_first = SKIP_FIRST
    progress(0.0, "the training text")
    train, held, held_what = corpus_split(session, spec)
    X, _, _ = site_activations(session, train, hook, skip_first, spec.max_tokens,
                               progress=sub_progress(progress, 0.02, 0.2, f"activations at {hook}: "))
    started = time.perf_counter()
    loss = pd.DataFrame()
    if spec.source == "folder":
        sae, raw_cfg, sha = load_folder(spec.folder)
        if sha != spec.folder_sha256:
            raise WorkbenchError("The SAE folder changed since this run was set up.", hint="Run it again.")
        check_fits(raw_cfg, session)
        cfg = saelens_cfg(sae, hook, spec.layer, raw_cfg["model_name"], raw_cfg["prepend_bos"],
                          raw_cfg["context_size"], raw_cfg["dataset_path"])
        note = f"loaded from {spec.folder} (SAELens format; {raw_cfg['model_name'] or 'model not named'})"
    else:
        settings = TrainSettings(architecture=spec.architecture, d_sae=spec.width, k=spec.k,
                                 l1_coefficient=spec.l1_coefficient, steps=spec.steps, batch=spec.batch_tokens,
                                 lr=spec.lr, dead=spec.dead, seed=spec.seed)
        torch.manual_seed(spec.seed)
        # training reads only the gathered activations: runs waiting for the model go in between (issue 15)
        sae, log, scale = train_sae(X.to(session.device), settings, lambda f, what: progress(0.2 + 0.65 * f, what),
                                    between=session.let_others_in)
        sae = sae.cpu()
        loss = pd.DataFrame({"step": log.step, "mse_over_variance": log.mse, "aux_loss": log.aux, "l0": log.l0,
                             "dead": log.dead})
        cfg = saelens_cfg(sae, hook, spec.layer, spec.model, spec.bos == "yes", session.summary.n_ctx,
                          "shipped sentences" if spec.corpus == "default" else "text given")
        note = f"trained here: {len(train)} sentences, {X.shape[0]:,} tokens, input scale {scale:.3g}" + (
            f", {log.resampled} features resampled" if log.resampled else "")
    seconds = time.perf_counter() - started
    sae = sae.to(session.device)
    metrics, per_feature = evaluate(session, sae, hook, skip_first, X.to(session.device), held,
                                    progress=sub_progress(progress, 0.85, 1.0, "held-out evaluation: "))
    return Result(table=per_feature, meta={
        **metrics, "hook_name": hook, "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "k": sae.k if sae.architecture == "topk" else None, "n_train_tokens": int(X.shape[0]),
        "held_out": held_what, "source": note, "train_seconds": seconds, "first_position_skipped": skip_first,
        "measured_on": "held-out text: FVE and L0 over its tokens, CE over its next-token predictions; dead = no "
                       "activation on any training token"},
        extra={"weights": weights_frame(sae.cpu(), cfg), "loss": loss})


def corpus_tokens(spec) -> int:
    """Tokens an SAE spec's corpus gives (the shipped text is about 33,000; text guessed at 4 characters each)."""
    return min(spec.max_tokens, SHIPPED_CORPUS_TOKENS) if spec.corpus == "default" else \
        min(spec.max_tokens, len(spec.text) // 4 + 1)


def heldout_tokens(spec) -> int:
    """Tokens of the held-out text: the user's, or the tenth of the sentences held out."""
    if spec.heldout_text.strip():
        return len(spec.heldout_text) // 4 + 1
    corpus = SHIPPED_CORPUS_TOKENS if spec.corpus == "default" else len(spec.text) // 4 + 1
    return corpus // 10 + 1


def heldout_batch(spec) -> tuple[int, int]:
    """(rows, positions) of the held-out evaluation's largest forward: the user's lines (texts of one length run
    together, 64 at most; at most as many as there are lines), or the shipped sentences' (64 of about 16 tokens)."""
    if spec.heldout_text.strip():
        lines = [line for line in spec.heldout_text.splitlines() if line.strip()]
        return min(64, len(lines)), max(len(line) // 4 + 2 for line in lines)
    return 64, 16


def estimate(plan) -> Estimate:
    """The gathered activations (float32: the per-batch pieces and their concatenation), then the larger of: the
    forward batches (the held-out text's with the logits at every position, sized by that text), a training step
    (its dense [batch, width] tensors, the weights, their gradients and Adam's moments) and the evaluation's
    encoding chunks.

    Work: the forwards that gather the training tokens' activations (whole texts, batches of 64); per step the
    SAE's products forward and backward (and AuxK's), its element-wise work over [batch, width] and Adam over
    its weights; the evaluation: the held-out text's activations and its next-token losses three times (clean,
    spliced, zero-ablated: every position's log-softmax over the vocabulary), the training tokens encoded."""
    spec, s = plan.spec, plan.shape
    T = min(corpus_tokens(spec), int(0.9 * SHIPPED_CORPUS_TOKENS) + 1) if spec.corpus == "default" else \
        corpus_tokens(spec)
    H = heldout_tokens(spec)
    d, W, B = s.d_model, spec.width, spec.batch_tokens
    steps = 0 if spec.source == "folder" else spec.steps
    weights = 2 * d * W * 4
    step = 8 * B * W * 4 + 4 * weights
    encode = 6 * encode_rows(W) * W * 4 + weights
    rows, pos = heldout_batch(spec)
    # the held-out losses' forwards (logits at every position), or the training text's (stopping before them)
    forward = max(s.forward_bytes(rows, pos), s.forward_bytes(64, 16, logits_pos=0))
    P = 14  # a typical shipped text
    per_step = 8 * 2.0 * B * d * W + ENTRY_FLOPS * (12 * B * W + 8 * d * W)
    # the training text's activations stop before the unembedding (session.cache_in_batches)
    flops = (s.forward_flops(T / P, P, logits_pos=0) + 4 * s.forward_flops(H / P, P) + s.vocab_flops(H, 3 * 3)
             + steps * per_step + 2.0 * (T + 2 * H) * d * W)
    blocks = s.calls((T + 4 * H) / (P * 64) + 4 * 20) + steps / 2
    return Estimate(parts={"activations": 2 * T * d * 4, "forward, training or encoding": max(forward, step, encode)},
                    flops=flops, blocks=blocks, lower="max_tokens, width or batch_tokens")


def sae_upstream(plan) -> list[Estimate]:
    """The SAE a feature analysis builds on, as its estimate's upstream run (dropped when the store holds it)."""
    from ...estimate import Plan, input_estimate

    return [input_estimate(estimate, Plan(plan.shape, sae_spec(plan.spec), plan.handle, plan.dataset,
                                          plan.get_stored))]
