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

from kernels.readout import residual_logits

from ...errors import WorkbenchError
from ...estimate import ENTRY_FLOPS, SHIPPED_CORPUS_TOKENS, Estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession
from ...specs import Spec, param
from ...stats import N_BOOT, mean_ci
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
    max_tokens: int = param(16_384, "tokens of training text used", min=256, max=262_144)
    seed: int = param(0, "seed for the split and the batches", min=0, max=2**31 - 1)
    heldout_text: str = param("", "text to evaluate on, one passage per line (empty: 10% of the training "
                                  "sentences, held out whole before training)", max_len=500_000)

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


def split_sentences(session: ModelSession, spec: TunedLensSpec) -> tuple[list[list[int]], list[list[int]], str]:
    """(training sequences, held-out sequences, what the held-out figure is measured on): the user's held-out
    text, else 10% of the sentences (at least one), drawn with the seed and held out whole, so that no token of
    an evaluation sentence is trained on."""
    seqs = list(dict.fromkeys(map(tuple, _training_sequences(session, spec))))  # a repeated sentence is one
    seqs = [list(q) for q in seqs]
    if spec.heldout_text.strip():
        held = [encode(session, line, spec.bos)[: session.summary.n_ctx]
                for line in spec.heldout_text.splitlines() if line.strip()]
        return seqs, held, f"{len(held)} passages of held-out text the user gave"
    if len(seqs) < 2:
        raise WorkbenchError("Held-out evaluation needs at least two sentences (one is held out).",
                             hint="Give more lines of text, or held-out text of your own.")
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    n_held = max(1, len(seqs) // 10)
    held = [seqs[i] for i in sorted(order[:n_held])]
    train = [seqs[i] for i in sorted(order[n_held:])]
    return train, held, f"{n_held} of {len(seqs)} sentences held out whole before training (seed {spec.seed})"


def hidden_states(session: ModelSession, seqs: list[list[int]], max_tokens: int, with_sequence: bool = False,
                  progress: Progress = no_progress):
    """(hidden states [N, L, d] entering each block, final residual [N, d]) for up to max_tokens tokens; with
    `with_sequence`, also the index in `seqs` of each row's sequence [N]. `progress` hears of each batch."""
    L, d = session.n_layers, session.cfg.d_model
    pre = [session.hook("resid_pre", layer) for layer in range(L)]
    last = session.hook("resid_post", L - 1)
    kept, total = [], 0
    for s in seqs:
        if total >= max_tokens:
            break
        kept.append(s)
        total += len(s)
    hs, finals, which = [], [], []
    done = 0

    def keep(idx, cache):
        nonlocal done
        hs.append(torch.stack([cache[name] for name in pre], 2).float().reshape(-1, L, d))
        finals.append(cache[last].float().reshape(-1, d))
        n_pos = cache[last].shape[1]
        which.append(torch.as_tensor(list(idx)).repeat_interleave(n_pos))
        done += len(idx)
        progress(done / len(kept), f"{done:,} of {len(kept):,} texts")

    session.cache_in_batches(kept, [*pre, last], keep)  # sequences of one length run as one batch
    if not hs:
        raise WorkbenchError("There is no text to train on.")
    out = torch.cat(hs)[:max_tokens], torch.cat(finals)[:max_tokens]
    return (*out, torch.cat(which)[:max_tokens]) if with_sequence else out


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


EVAL_BLOCK_BYTES = 128 * 2**20  # float32 [rows, L, vocab] temporaries of one evaluation chunk


def eval_chunk(n_layers: int, d_vocab: int) -> int:
    """Rows per evaluation chunk: 256, fewer where ~4 float32 [rows, L, vocab] tensors would pass the budget."""
    return max(1, min(256, EVAL_BLOCK_BYTES // (16 * n_layers * d_vocab)))


def _kl_per_token(bridge, translators, h, final, chunk: int | None = None,
                  progress: Progress = no_progress) -> np.ndarray:
    """KL(final || lens) of every row of h [N, L, d] at every layer: [N, L]. `progress` hears of each chunk."""
    chunk = chunk or eval_chunk(h.shape[1], bridge.cfg.d_vocab)
    out = []
    with torch.no_grad():
        for c in range(0, h.shape[0], chunk):
            progress(c / h.shape[0], f"tokens {c:,} of {h.shape[0]:,}")
            hb, fb = h[c:c + chunk], final[c:c + chunk]
            ref = residual_logits(bridge, fb).float().log_softmax(-1)  # [n, V]
            x = translators(hb) if translators is not None else hb
            lp = residual_logits(bridge, x).float().log_softmax(-1)  # [n, L, V]
            out.append((ref.exp()[:, None] * (ref[:, None] - lp)).sum(-1).double())
    return torch.cat(out).numpy()


def compute(session: ModelSession, spec: TunedLensSpec, inputs, progress) -> Result:
    bridge = session.bridge
    L, d = session.n_layers, session.cfg.d_model
    progress(0.0, "tokenizing the text")
    train_seqs, held_seqs, held_what = split_sentences(session, spec)
    # the parts' spans: the forwards that gather the hidden states, the steps, the held-out evaluation (measured
    # on the default model's defaults: about 0.45, 0.5 and 0.05 of the run)
    h, final = hidden_states(session, train_seqs, spec.max_tokens,
                             progress=sub_progress(progress, 0.02, 0.4, "hidden states of the training text: "))
    h_ev, final_ev, ev_seq = hidden_states(session, held_seqs, max(256, spec.max_tokens // 9), with_sequence=True,
                                           progress=sub_progress(progress, 0.4, 0.45, "hidden states of the "
                                                                                      "held-out text: "))
    g = torch.Generator().manual_seed(spec.seed)
    translators = Translators(L, d).to(h.device)
    opt = torch.optim.Adam(translators.parameters(), lr=spec.lr)
    losses = []
    with session.frozen():  # the model's parameters get no gradient; their flags come back after
        n_tok = max(1, spec.batch_tokens // L)  # every layer of each sampled token
        every = max(1, spec.steps // 50)
        for step in range(spec.steps):
            idx = torch.randint(h.shape[0], (n_tok,), generator=g).to(h.device)
            with torch.no_grad():
                ref = residual_logits(bridge, final[idx]).float().log_softmax(-1)[:, None]  # [n, 1, V]
            with torch.enable_grad():
                lp = residual_logits(bridge, translators(h[idx])).float().log_softmax(-1)  # [n, L, V]
                loss = (ref.exp() * (ref - lp)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(loss.item())
            if step % every == 0:  # 50 reports over the training, whatever its length
                progress(0.45 + 0.5 * step / spec.steps, f"training, step {step + 1} of {spec.steps}: "
                                                        f"KL {losses[-1]:.3f}")
        logit_tok = _kl_per_token(bridge, None, h_ev, final_ev,  # [N_eval, L]
                                  progress=sub_progress(progress, 0.95, 0.975, "held-out evaluation, logit lens: "))
        tuned_tok = _kl_per_token(bridge, translators, h_ev, final_ev,
                                  progress=sub_progress(progress, 0.975, 1.0, "held-out evaluation, tuned lens: "))
    # per sentence (the unit held out), then the mean over sentences with a bootstrap interval over them
    sentences = torch.unique(ev_seq)
    per_sentence = {name: np.stack([kl[(ev_seq == i).numpy()].mean(0) for i in sentences.tolist()], 1)  # [L, S]
                    for name, kl in (("logit_lens", logit_tok), ("tuned_lens", tuned_tok))}
    table = pd.DataFrame({"layer": np.arange(L)})
    for name, v in per_sentence.items():
        m, lo, hi = mean_ci(v)
        table[f"{name}_kl"], table[f"{name}_low"], table[f"{name}_high"] = m, lo, hi
    return Result(table=table, meta={"n_tokens": int(h.shape[0]), "n_eval_tokens": int(h_ev.shape[0]),
                                     "n_eval_sentences": int(len(sentences)), "held_out": held_what,
                                     "statistics": "KL per layer on held-out text: the mean over held-out sentences "
                                                   "(each its tokens' mean) with a 95% bootstrap interval over them "
                                                   f"({N_BOOT} resamples)",
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


def estimate(plan) -> Estimate:
    """The hidden states entering every block for the training tokens (float32, gathered then concatenated),
    the forward batches that cache them, and a training step: every layer's translated rows decoded to the
    vocabulary with log-softmax, their gradients, the translators and Adam's moments.

    Work: the forwards of the training and held-out text; per step the final rows' reference distribution, the
    translators, the decoding of every layer's row and its log-softmax and KL, the backward through them (twice
    the products) and Adam over the translators; the held-out KL of both lenses."""
    spec, s = plan.spec, plan.shape
    corpus = SHIPPED_CORPUS_TOKENS if spec.dataset == "default" else len(spec.text) // 4 + 1
    T = min(spec.max_tokens, int(0.9 * corpus) + 1)
    L, d, V = s.n_layers, s.d_model, s.d_vocab
    n_tok = max(1, spec.batch_tokens // L)
    rows = n_tok * L  # every layer of each sampled token
    P = 14  # a typical shipped text (the forward batches hold 64 texts of one length)
    batch = 64
    n_eval = max(1, min(max(256, spec.max_tokens // 9), corpus // 10 + 1))
    states = 2 * T * (L + 1) * d * 4
    forward = s.forward_bytes(batch, P) + s.resid_bytes(batch, P, L + 1) * (1 + 4 // s.itemsize)
    step = 6 * rows * V * 4 + 3 * rows * d * 4 * 3
    translators = 4 * L * (d * d + d) * 4
    evaluation = 4 * eval_chunk(L, V) * L * V * 4
    texts = (T + n_eval) / P
    per_step = (2.0 * n_tok * d * V + s.vocab_flops(n_tok, 2)  # the reference distribution
                + 3 * 2.0 * rows * (d * V + d * d) + s.vocab_flops(rows, 9)  # translate, decode, KL; backward
                + ENTRY_FLOPS * 12 * L * d * d)  # Adam's moments and update
    flops = (s.forward_flops(texts, P, logits_pos=0)  # the hidden states (no unembedding)
             + spec.steps * per_step
             + 2 * (2.0 * n_eval * (L + 1) * d * V + s.vocab_flops(n_eval * (L + 1), 4)))  # held-out KL, both lenses
    blocks = s.calls(texts / batch + 20) + spec.steps + 4 * n_eval / eval_chunk(L, V)
    # the forward batches come first, training and evaluation after them: the peak is the larger phase
    return Estimate(parts={"hidden states": states, "forward, or training": max(forward, step + translators,
                                                                              evaluation + translators)},
                    flops=flops, blocks=blocks, lower="max_tokens, batch_tokens or steps")
