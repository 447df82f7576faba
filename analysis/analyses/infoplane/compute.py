"""The information plane: per layer, how much a representation keeps of the input and of a target, over training.

A sample of token positions is drawn from text (the default model's concept sentences, or text the user gives);
at each position T_l is the residual after block l, X the input embedding (the residual entering block 0) and Y
the target (the next token, or the sentence's concept label). Per layer and model:

- matrix-based Rényi entropy S(T) and the mutual informations I(X; T), I(T; Y) (Gaussian kernels with the median
  width for X and T, a label kernel for Y), `kernels.information`;
- diffusion spectral entropy of T and its conditional ("diffusion spectral mutual information") versions:
  S_D(T) - sum_c p(c) S_D(T | c), conditioning on the input token for X and on the target for Y.

For a deterministic network the true I(X; T) is constant or infinite: these numbers measure how representations
cluster (geometry), not Shannon information. Options: normalise each residual to unit length, drop position 0
(whose residual norm dwarfs the others), the sample size and its seed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.information import diffusion_spectral_entropy, gaussian_gram, label_gram, mutual_information, renyi_entropy

from ...errors import WorkbenchError
from ...estimate import Estimate, batches, largest, other_models_bytes, other_models_seconds
from ...models import checkpoint_series
from ...result import Result
from ...session import ModelSession
from ...specs import Spec, param
from ...tasks import task_rows
from ...tokens import encode, encode_texts
from ..entropy.compute import checkpoint_columns, series_sessions

CONCEPTS = ("sentiment", "tense", "number", "topic")
TARGETS = ("next_token",) + CONCEPTS
CAVEAT = ("For a deterministic network the true mutual information between input and representation is constant "
          "or infinite; these estimates measure how tightly the representations cluster (their geometry), not "
          "Shannon information.")


@dataclass(frozen=True)
class InfoPlaneSpec(Spec):
    """Information-plane estimates per layer over sampled token representations, over checkpoints."""

    analysis: ClassVar[str] = "infoplane"
    title: ClassVar[str] = "Information plane: entropy and mutual information of each layer, over training"
    dataset: str = param("concepts", "concepts: the shipped concept sentences; text: the text given",
                      choices=("concepts", "text"))
    text: str = param("", "text to sample from (one sentence or passage per line) when dataset is 'text'",
                   max_len=200_000)
    target: str = param("next_token", "Y: the next token, or a concept label of the shipped sentences", choices=TARGETS)
    n_samples: int = param(1000, "token positions sampled", min=50, max=4000)
    alpha: float = param(1.01, "Rényi order (1.01: close to Shannon)", min=0.1, max=10.0)
    diffusion_t: int = param(1, "diffusion time of the spectral entropy", min=1, max=64)
    normalize: bool = param(True, "scale every residual to unit length")
    drop_first: bool = param(True, "leave out position 0")
    seed: int = param(0, "sampling seed", min=0, max=2**31 - 1)
    checkpoints: tuple[str, ...] = param((), "models to track in training order (as on the Entropy page); empty: the "
                                          "default model's shipped checkpoints, or the model alone", max_len=32)

    def validate(self) -> None:
        if self.dataset == "text" and not self.text.strip():
            raise WorkbenchError("Give some text to sample from, or pick the shipped concept sentences.")
        if self.dataset == "text" and self.target != "next_token":
            raise WorkbenchError(f"Concept labels ({self.target}) exist only for the shipped concept sentences.",
                                 hint="Use next_token as the target for your own text.")


def _sequences(session: ModelSession, spec: InfoPlaneSpec) -> tuple[list[list[int]], list[str | None]]:
    if spec.dataset == "concepts":
        rows = task_rows("concepts")
        seqs = encode_texts(session, [r["text"] for r in rows], bos=spec.bos)
        return seqs, [r[spec.target] if spec.target in CONCEPTS else None for r in rows]
    seqs = [encode(session, line, spec.bos) for line in spec.text.splitlines() if line.strip()]
    return [s[: session.summary.n_ctx] for s in seqs], [None] * len(seqs)


def _sample(seqs, labels, spec: InfoPlaneSpec):
    """(sequence index, position, input token, target) for the sampled positions."""
    cand = []
    for i, s in enumerate(seqs):
        last = len(s) - 1 if spec.target == "next_token" else len(s)  # the next token must exist
        for p in range(1 if spec.drop_first else 0, last):
            y = s[p + 1] if spec.target == "next_token" else labels[i]
            cand.append((i, p, s[p], y))
    if len(cand) < 50:
        raise WorkbenchError(f"The text has only {len(cand)} usable token positions; at least 50 are needed.",
                             hint="Give more text.")
    rng = np.random.default_rng(spec.seed)
    pick = rng.choice(len(cand), size=min(spec.n_samples, len(cand)), replace=False)
    return [cand[k] for k in sorted(pick)]


def representations(session: ModelSession, seqs, sample, normalize: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """X [N, d] (the input embedding) and T_l [N, d] per layer at the sampled positions."""
    L = session.n_layers
    embed, post = session.resid_after(-1), [session.resid_after(layer) for layer in range(L)]
    by_seq: dict[int, list[int]] = {}
    for k, (i, p, _, _) in enumerate(sample):
        by_seq.setdefault(i, []).append(k)
    d = session.cfg.d_model
    X = torch.empty(len(sample), d)
    T = [torch.empty(len(sample), d) for _ in range(L)]

    def gather(idx, cache):
        for row, i in enumerate(idx):
            ks = by_seq[i]
            pos = [sample[k][1] for k in ks]
            X[ks] = cache[embed][row, pos].float().cpu()
            for layer in range(L):
                T[layer][ks] = cache[post[layer]][row, pos].float().cpu()

    session.cache_in_batches(seqs, [embed, *post], gather, indices=list(by_seq))
    if normalize:
        X = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        T = [t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12) for t in T]
    return X, T


def _conditional_dse(G: torch.Tensor, groups: np.ndarray, t: int) -> float:
    """sum_c p(c) S_D(G restricted to class c)."""
    total, n = 0.0, len(groups)
    for c in np.unique(groups):
        m = np.flatnonzero(groups == c)
        if len(m) > 1:
            total += len(m) / n * diffusion_spectral_entropy(G[np.ix_(m, m)], t)
    return total


def compute(session: ModelSession, spec: InfoPlaneSpec, inputs, progress) -> Result:
    seqs, labels = _sequences(session, spec)
    sample = _sample(seqs, labels, spec)
    x_tok = np.array([s[2] for s in sample])
    y_vals = [s[3] for s in sample]
    y_codes = np.unique(np.array([str(v) for v in y_vals]), return_inverse=True)[1]
    Ky = label_gram(torch.tensor(y_codes))
    rows, models = [], []
    n_models = len(checkpoint_series(spec.model, spec.revision, spec.checkpoints))
    with contextlib.closing(series_sessions(session, spec, progress)) as series:  # a failure releases the model
        for i, (ckpt, h) in enumerate(series):
            X, T = representations(h, seqs, sample, spec.normalize)
            Kx = gaussian_gram(X)
            s_y = renyi_entropy(Ky, spec.alpha)
            for layer, t in enumerate(T):  # each layer's estimators are most of a model's part: report each one
                progress((i + (layer + 1) / (len(T) + 1)) / n_models,
                         f"model {i + 1} of {n_models} ({ckpt.label}): layer {layer + 1} of {len(T)}")
                Kt = gaussian_gram(t)
                s_t = renyi_entropy(Kt, spec.alpha)
                dse = diffusion_spectral_entropy(Kt, spec.diffusion_t)
                rows.append({**checkpoint_columns(ckpt), "layer": layer, "estimator": "renyi", "entropy": s_t,
                             "i_xt": mutual_information(Kx, Kt, spec.alpha),
                             "i_ty": mutual_information(Kt, Ky, spec.alpha),
                             "h_y": s_y})
                rows.append({**checkpoint_columns(ckpt), "layer": layer, "estimator": "dse", "entropy": dse,
                             "i_xt": dse - _conditional_dse(Kt, x_tok, spec.diffusion_t),
                             "i_ty": dse - _conditional_dse(Kt, y_codes, spec.diffusion_t), "h_y": np.nan})
            models.append({**checkpoint_columns(ckpt), "model": h.name, "revision": h.handle.revision or "",
                           "fingerprint": h.fingerprint})
    progress(1.0, "done")
    table = pd.DataFrame(rows)
    meta = {"n_samples": len(sample), "target": spec.target, "checkpoints": [m["checkpoint"] for m in models],
            "steps": [None if m["step"] != m["step"] else int(m["step"]) for m in models],
            "caveat": CAVEAT}
    return Result(table=table, meta=meta, extra={"models": pd.DataFrame(models)})


# seconds per layer on the reference machine: the per-class conditional entropies (about linear in N) and the
# float64 eigendecompositions of N x N Gram matrices (cubic); measured on the default model and SmolLM2
LAYER_SECONDS_PER_N, LAYER_SECONDS_PER_N3 = 6e-4, 5e-11


def estimate(plan) -> Estimate:
    """Per model of the series: the texts holding the sampled positions run in batches of 64 (every layer's
    residual cached), the sampled residuals per layer, and float64 N x N Gram matrices with their
    eigendecompositions (about nine per layer: the entropies and the two mutual informations).

    Work: per model, the forwards of the texts a sample of N positions falls in (each text is run when one of
    its positions is drawn), the Gram matrices and eigendecompositions per layer, and loading the checkpoints
    not loaded yet."""
    spec, s = plan.spec, plan.shape
    series = checkpoint_series(spec.model, spec.revision, spec.checkpoints)
    if spec.dataset == "concepts":
        lengths = plan.text_lengths([r["text"] for r in task_rows("concepts")])
    else:
        lengths = [max(2, len(line) // 4) for line in spec.text.splitlines() if line.strip()]
    usable = [max(0, n - (1 if spec.target == "next_token" else 0) - int(spec.drop_first)) for n in lengths]
    C = max(1, sum(usable))
    N = min(spec.n_samples, max(50, C))
    miss = max(0.0, 1 - N / C)
    hit: dict[int, float] = {}  # texts of each length expected to hold a sampled position
    for n, u in zip(lengths, usable):
        if u:
            hit[n] = hit.get(n, 0.0) + 1 - miss ** u
    run = [n for n, k in hit.items() for _ in range(max(1, round(k)))]  # the texts run, by length
    batch = largest(batches(run), lambda r, n: s.forward_bytes(r, n) + s.resid_bytes(r, n, s.n_layers + 1))
    grams = 7 * N * N * 8
    per_model = batch + (s.n_layers + 1) * N * s.d_model * 4 * 2
    return Estimate(parts={"checkpoints' weights": other_models_bytes(plan, series), "forward": per_model,
                           "Gram matrices": grams},
                    flops=len(series) * sum(s.forward_flops(r, n, logits_pos=0) for r, n in batches(run)),
                    blocks=len(series) * s.batched_calls(run),
                    extra_seconds=other_models_seconds(plan, series) + len(series) * s.n_layers * (
                        LAYER_SECONDS_PER_N * N + LAYER_SECONDS_PER_N3 * N**3),
                    lower="n_samples (the Gram matrices grow with its square, their eigendecompositions with its cube)")
