"""Sparse autoencoders: the module, its training (TopK with the AuxK loss, or ReLU + L1 with resampling) and the
splice that puts one into a model's forward pass.

The module follows SAELens's inference formulas and weight names, so a folder moves between the two:

    sae_in      = x - b_dec * apply_b_dec_to_input                    x [..., d_in]
    hidden_pre  = sae_in @ W_enc + b_enc                              W_enc [d_in, d_sae]
    acts        = relu(hidden_pre)                     "standard"
                = topk(hidden_pre, k), relu on the k kept values     "topk"
                = hidden_pre * (hidden_pre > threshold)              "jumprelu" (loaded, not trained here)
    recon       = acts @ W_dec + b_dec                               W_dec [d_sae, d_in]

Training works on inputs divided by one scale (their root mean squared distance to their mean over sqrt(d_in))
so the settings suit any model's residual norm; the trained weights are written back in the model's units with
unit-norm decoder rows (a feature's activation is then the length of what it adds to the residual).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ARCHITECTURES = ("topk", "standard", "jumprelu")


class SparseAutoencoder(torch.nn.Module):
    """An SAE with SAELens's parameter names (W_enc, b_enc, W_dec, b_dec; threshold for jumprelu)."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int = 32,
                 apply_b_dec_to_input: bool = True):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, int(k)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = torch.nn.Parameter(torch.zeros(d_sae))

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations of x [..., d_in]."""
        x = x.to(self.W_enc.dtype)
        sae_in = x - self.b_dec * self.apply_b_dec_to_input
        return sae_in @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            top = pre.topk(min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] feature activations."""
        return self.activate(self.hidden_pre(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., d_in] reconstruction."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def state(self) -> dict[str, torch.Tensor]:
        """The weights under SAELens's names, detached, float32, contiguous (what sae_weights.safetensors holds)."""
        return {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# The splice: the SAE inside the model's forward pass
# ----------------------------------------------------------------------------------------------------------
def splice_hook(sae: SparseAutoencoder, *, keep_error: bool, skip_first: bool = False,
                edit: Callable[[torch.Tensor], torch.Tensor] | None = None, record: dict | None = None):
    """A forward hook that replaces the activation x [B, P, d] by decode(edit(encode(x))) (+ the error term
    x - decode(encode(x)) with `keep_error`, so that without an edit the model's output is unchanged up to float
    rounding). `skip_first` leaves position 0 (a BOS token the SAE was not trained on) as it is. `record` gets
    the feature activations [B, P, d_sae] (a leaf that requires a gradient when the forward runs with grad on)
    under "acts" and the error term under "error"."""
    def hook(x, hook=None):
        acts = sae.encode(x)
        recon_clean = sae.decode(acts)
        if record is not None:
            if torch.is_grad_enabled():
                acts = acts.detach().requires_grad_(True)
            record["acts"] = acts
        edited = edit(acts) if edit is not None else acts
        out = sae.decode(edited)
        if keep_error:
            error = (x.to(out.dtype) - recon_clean).detach()
            if record is not None:
                record["error"] = error
            out = out + error
        out = out.to(x.dtype)
        if skip_first:
            out = torch.cat([x[:, :1], out[:, 1:]], 1)
        return out
    return hook


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    architecture: str = "topk"
    d_sae: int = 1024
    k: int = 32
    l1_coefficient: float = 5.0  # ReLU + L1 only: on sum(acts * |W_dec row|) of normalised inputs
    steps: int = 3000
    batch: int = 1024
    lr: float = 2e-3
    dead: str = "auxk"  # auxk (TopK) | resample | none
    dead_tokens: int = 10_000  # a feature that fired on none of the last this many training tokens is dead
    aux_coefficient: float = 0.25
    seed: int = 0


@dataclass
class TrainLog:
    step: list
    mse: list  # normalised: squared error over the inputs' variance (1 - FVE of the batch)
    aux: list
    l0: list
    dead: list
    resampled: int = 0


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Weiszfeld's iterations for the point of least summed distance to the rows of x [N, d]."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=1e-6)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < 1e-6 * max(1.0, float(m.norm())):
            return new
        m = new
    return m


def train_sae(X: torch.Tensor, s: TrainSettings, progress: Callable[[float, str], None] | None = None,
              between: Callable[[], None] | None = None) -> tuple[SparseAutoencoder, TrainLog, float]:
    """Train an SAE on activations X [N, d_in] (float32, on one device); returns (sae in the model's units,
    training log, the input scale used). `between` is called every 100 steps (the runner's chance to let others
    use the model: this loop does not touch it)."""
    N, d = X.shape
    g = torch.Generator(device="cpu").manual_seed(s.seed)
    center = geometric_median(X[torch.randperm(N, generator=g)[:8192].to(X.device)])
    scale = float(((X - X.mean(0)).pow(2).sum(1).mean() / d).sqrt().clamp(min=1e-8))
    Xn = X / scale
    sae = SparseAutoencoder(d, s.d_sae, s.architecture, s.k).to(X.device)
    with torch.no_grad():
        W = torch.randn(s.d_sae, d, generator=g).to(X.device)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(center / scale)
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(0.9, 0.999))
    var = float(Xn.var(0).sum())
    last_fired = torch.zeros(s.d_sae, dtype=torch.long, device=X.device)
    log = TrainLog([], [], [], [], [])
    seen = 0
    resample_at = {int(s.steps * f) for f in (0.2, 0.4, 0.6)} if s.dead == "resample" else set()
    warmup = max(1, s.steps // 20)
    every = max(1, s.steps // 50)  # progress: 50 reports over the training, whatever its length
    for step in range(s.steps):
        lr = s.lr * min(1.0, (step + 1) / warmup) * (1.0 if step < 0.8 * s.steps else
                                                      max(0.0, (s.steps - step) / (0.2 * s.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(N, (min(s.batch, N),), generator=g).to(X.device)
        x = Xn[idx]
        pre = sae.hidden_pre(x)
        acts = sae.activate(pre)
        recon = sae.decode(acts)
        mse = (recon - x).pow(2).sum(-1).mean()
        loss = mse
        seen += x.shape[0]
        fired = (acts > 0).any(0)
        last_fired[fired] = seen
        dead = (seen - last_fired) > s.dead_tokens
        aux = torch.zeros(())
        if s.dead == "auxk" and s.architecture == "topk" and bool(dead.any()):
            n_dead = int(dead.sum())
            k_aux = min(d // 2, n_dead)
            masked = torch.where(dead[None], pre, torch.tensor(-math.inf, device=pre.device))
            top = masked.topk(k_aux, dim=-1)
            aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            residual = (x - recon).detach()
            aux = (aux_acts @ sae.W_dec - residual).pow(2).sum(-1).mean() * min(1.0, n_dead / (d // 2))
            loss = loss + s.aux_coefficient * aux
        if s.architecture == "standard":
            loss = loss + s.l1_coefficient * (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s.architecture == "topk":
            with torch.no_grad():  # unit decoder rows: the scale lives in the activations
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))
        if step in resample_at and bool(dead.any()):
            log.resampled += _resample(sae, opt, Xn, dead, g)
            last_fired[dead] = seen
        if step % 50 == 0 or step == s.steps - 1:
            log.step.append(step)
            log.mse.append(float(mse.detach()) / var)
            log.aux.append(float(aux.detach()))
            log.l0.append(float((acts > 0).sum(-1).float().mean()))
            log.dead.append(int(dead.sum()))
        if progress is not None and step % every == 0:
            progress(step / s.steps, f"training, step {step + 1} of {s.steps} (at step {log.step[-1]}: 1 - FVE "
                                     f"{log.mse[-1]:.3f}, L0 {log.l0[-1]:.1f}, dead {log.dead[-1]})")
        if between is not None and step % 100 == 99:
            between()
    return _in_model_units(sae, scale), log, scale


def _resample(sae: SparseAutoencoder, opt, Xn: torch.Tensor, dead: torch.Tensor, g) -> int:
    """Anthropic's resampling: each dead feature is set to an input the SAE reconstructs worst (drawn with
    probability proportional to its squared error), its encoder scaled to 0.2 of the live features' mean norm,
    its bias 0 and its optimiser state cleared."""
    with torch.no_grad():
        sample = Xn[torch.randperm(Xn.shape[0], generator=g)[:min(Xn.shape[0], 16384)].to(Xn.device)]
        err = (sae(sample) - sample).pow(2).sum(-1)
        n = int(dead.sum())
        pick = torch.multinomial((err / err.sum()).cpu(), n, replacement=True, generator=g).to(Xn.device)
        v = sample[pick] - sae.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)
        live = ~dead
        enc_norm = float(sae.W_enc[:, live].norm(dim=0).mean()) if bool(live.any()) else 1.0
        ids = dead.nonzero().squeeze(1)
        sae.W_dec[ids] = v
        sae.W_enc[:, ids] = v.T * 0.2 * enc_norm
        sae.b_enc[ids] = 0.0
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):
            st = opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    if p is sae.W_enc:
                        st[key][:, ids] = 0
                    else:
                        st[key][ids] = 0
    return n


def _in_model_units(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The SAE trained on x / scale, rewritten for x with unit-norm decoder rows and the same features (each
    feature's activation multiplied by its decoder row's norm times the scale; the reconstruction is the
    trained one times the scale)."""
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1).clamp(min=1e-8)  # [d_sae]
        out = SparseAutoencoder(sae.d_in, sae.d_sae, sae.architecture, sae.k).to(sae.W_enc.device)
        # acts' = scale * norms * acts: the encoder's pre-activation scales the same way, which topk and relu keep
        out.W_enc.copy_(sae.W_enc * norms)
        out.b_enc.copy_(sae.b_enc * norms * scale)
        out.W_dec.copy_(sae.W_dec / norms[:, None])
        out.b_dec.copy_(sae.b_dec * scale)
    return out
