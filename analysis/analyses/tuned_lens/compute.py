"""The tuned lens: one affine translator per layer, trained so that each layer's residual decodes like the final one.

Translator l maps the residual entering block l (hidden state l; the residual after block l is hidden state l + 1)
to h + A_l h + b_l, then the final norm and the unembedding as in the logit lens. A_l and b_l start at zero, so an
untrained tuned lens is the logit lens. Training minimises KL(final || tuned lens), averaged over layers and
tokens, on the model's own text (the default model's task and concept sentences, or text the user gives), with
Adam. The model is frozen; its hidden states are computed once. The trained translators are a stored result like
any other, keyed by the model's fingerprint and the training settings.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ...errors import WorkbenchError
from ...result import Result
from ...session import ModelSession
from ...specs import Spec, param
from ...tasks import fact_prompts, induction_prompts, ioi_pairs, task_rows
from ...tokens import encode


@dataclass(frozen=True)
class TunedLensSpec(Spec):
    """Train a tuned lens for a model."""

    analysis: ClassVar[str] = "tuned_lens"
    title: ClassVar[str] = "Tuned lens: per-layer affine translators trained by KL to the final distribution"
    dataset: str = param("default", "default: the shipped task and concept sentences; text: the text given",
                      choices=("default", "text"))
    text: str = param("", "training text, one passage per line, when dataset is 'text'", max_len=500_000)
    steps: int = param(250, "Adam steps", min=0, max=20_000)
    lr: float = param(3e-3, "learning rate", min=1e-6, max=1.0)
    batch_tokens: int = param(512, "tokens per step", min=16, max=65_536)
    max_tokens: int = param(16_384, "tokens of text used (10% held out for evaluation)", min=256, max=262_144)
    seed: int = param(0, "seed for the split and the batches", min=0, max=2**31 - 1)

    def validate(self) -> None:
        if self.dataset == "text" and not self.text.strip():
            raise WorkbenchError("Give training text, or use the shipped sentences.")


def _training_sequences(session: ModelSession, spec: TunedLensSpec) -> list[list[int]]:
    if spec.dataset == "default":  # the shipped sentences and prompts, tokenised for this model
        seqs = [encode(session, row["text"], spec.bos) for row in task_rows("concepts")]
        seqs += [row["clean_ids"] for row in ioi_pairs(session, spec.bos).rows]
        seqs += [row["ids"] for row in fact_prompts(session, spec.bos).rows]
        return seqs + [row["ids"] for row in induction_prompts(session, spec.bos).rows]
    return [encode(session, line, spec.bos)[: session.summary.n_ctx] for line in spec.text.splitlines() if line.strip()]


def hidden_states(session: ModelSession, seqs: list[list[int]], max_tokens: int):
    """(hidden states [N, L, d] entering each block, final residual [N, d]) for up to max_tokens tokens."""
    L, d = session.n_layers, session.cfg.d_model
    pre = [session.hook("resid_pre", layer) for layer in range(L)]
    last = session.hook("resid_post", L - 1)
    kept, total = [], 0
    for s in seqs:
        if total >= max_tokens:
            break
        kept.append(s)
        total += len(s)
    hs, finals = [], []

    def keep(idx, cache):
        hs.append(torch.stack([cache[name] for name in pre], 2).float().reshape(-1, L, d))
        finals.append(cache[last].float().reshape(-1, d))

    session.cache_in_batches(kept, [*pre, last], keep)  # sequences of one length run as one batch
    if not hs:
        raise WorkbenchError("There is no text to train on.")
    return torch.cat(hs)[:max_tokens], torch.cat(finals)[:max_tokens]


class Translators(torch.nn.Module):
    """h_l -> h_l + A_l h_l + b_l for every layer, zero-initialised (the identity)."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.A = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, h: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """h [N, L, d] (every layer), or [N, d] with `layers` [N] saying whose translator each row takes."""
        if layers is None:
            return h + torch.einsum("nld,lde->nle", h, self.A) + self.b
        return h + torch.einsum("nd,nde->ne", h, self.A[layers]) + self.b[layers]

    def to_frame(self) -> pd.DataFrame:
        buf = io.BytesIO()
        np.save(buf, torch.cat([self.A.detach().reshape(-1), self.b.detach().reshape(-1)]).cpu().numpy())
        return pd.DataFrame({"n_layers": [self.A.shape[0]], "d_model": [self.A.shape[1]], "weights": [buf.getvalue()]})

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "Translators":
        L, d = int(df["n_layers"].iloc[0]), int(df["d_model"].iloc[0])
        flat = torch.from_numpy(np.load(io.BytesIO(df["weights"].iloc[0])))
        t = cls(L, d)
        with torch.no_grad():
            t.A.copy_(flat[: L * d * d].view(L, d, d))
            t.b.copy_(flat[L * d * d:].view(L, d))
        return t


def _kl_per_layer(bridge, translators, h, final, chunk: int = 256) -> np.ndarray:
    """Mean KL(final || lens) per layer over the rows of h [N, L, d]."""
    out = torch.zeros(h.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for c in range(0, h.shape[0], chunk):
            hb, fb = h[c:c + chunk], final[c:c + chunk]
            ref = bridge.unembed(bridge.ln_final(fb)).float().log_softmax(-1)  # [n, V]
            x = translators(hb) if translators is not None else hb
            lp = bridge.unembed(bridge.ln_final(x)).float().log_softmax(-1)  # [n, L, V]
            out += (ref.exp()[:, None] * (ref[:, None] - lp)).sum(-1).sum(0).double()
    return (out / h.shape[0]).numpy()


def compute(session: ModelSession, spec: TunedLensSpec, inputs, progress) -> Result:
    bridge = session.bridge
    L, d = session.n_layers, session.cfg.d_model
    progress(0.05, "hidden states")
    h, final = hidden_states(session, _training_sequences(session, spec), spec.max_tokens)
    g = torch.Generator().manual_seed(spec.seed)
    perm = torch.randperm(h.shape[0], generator=g)
    n_eval = max(1, h.shape[0] // 10)
    ev, tr = perm[:n_eval], perm[n_eval:]
    translators = Translators(L, d).to(h.device)
    opt = torch.optim.Adam(translators.parameters(), lr=spec.lr)
    losses = []
    with session.frozen():  # the model's parameters get no gradient; their flags come back after
        n_tok = max(1, spec.batch_tokens // L)  # every layer of each sampled token
        for step in range(spec.steps):
            idx = tr[torch.randint(len(tr), (n_tok,), generator=g)].to(h.device)
            with torch.no_grad():
                ref = bridge.unembed(bridge.ln_final(final[idx])).float().log_softmax(-1)[:, None]  # [n, 1, V]
            with torch.enable_grad():
                lp = bridge.unembed(bridge.ln_final(translators(h[idx]))).float().log_softmax(-1)  # [n, L, V]
                loss = (ref.exp() * (ref - lp)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(loss.item())
            if step % 25 == 0:
                progress(0.1 + 0.8 * step / max(1, spec.steps), f"training, step {step}: KL {losses[-1]:.3f}")
        progress(0.92, "held-out evaluation")
        logit_kl = _kl_per_layer(bridge, None, h[ev], final[ev])
        tuned_kl = _kl_per_layer(bridge, translators, h[ev], final[ev])
    table = pd.DataFrame({"layer": np.arange(L), "logit_lens_kl": logit_kl, "tuned_lens_kl": tuned_kl})
    return Result(table=table, meta={"n_tokens": int(h.shape[0]), "n_eval_tokens": int(n_eval),
                                     "final_train_kl": losses[-1] if losses else None},
                  extra={"translators": translators.cpu().to_frame(),
                         "loss": pd.DataFrame({"step": np.arange(len(losses)), "kl": losses})})


def translate(translators: Translators, keys: list[tuple[str, int]], h: torch.Tensor, n_pos: int,
              n_layers: int) -> tuple[torch.Tensor, list[bool]]:
    """Apply the translator of each (site, layer) block of rows in h [len(keys) * n_pos, d]: resid_pre of layer l
    is hidden state l, resid_post of layer l is hidden state l + 1 (the last is the model's output: identity).
    resid_mid has no translator: its rows are flagged False."""
    out = h.clone()
    ok = []
    for k, (site, layer) in enumerate(keys):
        rows = slice(k * n_pos, (k + 1) * n_pos)
        hidden = layer if site == "resid_pre" else layer + 1 if site == "resid_post" else None
        ok.append(hidden is not None)
        if hidden is not None and hidden < n_layers:
            idx = torch.full((n_pos,), hidden, dtype=torch.long, device=h.device)
            out[rows] = translators(h[rows].float(), idx).to(h.dtype)
    return out, ok
