"""Information-plane estimators over a sample of N representations (bits).

Matrix-based Rényi alpha-entropy (Sanchez Giraldo, Rao & Principe): from a positive semi-definite Gram matrix K,
A = K / tr K and S_alpha(A) = log2(sum_i lambda_i(A)^alpha) / (1 - alpha) (alpha -> 1: von Neumann entropy). The
joint entropy of two representations of the same N samples uses the normalised Hadamard product A o B, and
I(A; B) = S(A) + S(B) - S(A o B). Anchors: K = I gives log2 N, K = 11^T gives 0.

Diffusion spectral entropy (Liao et al.): Gaussian affinities G, symmetric diffusion operator
K = D^-1/2 G D^-1/2, its eigenvalues without the top (trivial) one, raised to the diffusion time t and
normalised, then Shannon entropy. Anchors: G = I gives log2(N - 1), G = 11^T gives 0.

For a deterministic network these estimate how representations cluster (geometry), not mutual information in
Shannon's sense, which is constant or infinite there. All O(N^3) (one symmetric eigendecomposition each).
"""
from __future__ import annotations

import torch


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    sq = (x * x).sum(-1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)


def median_sigma(x: torch.Tensor) -> float:
    """The median heuristic for the Gaussian kernel width: the median pairwise distance (off the diagonal)."""
    d = pairwise_sq_dists(x)
    n = d.shape[0]
    off = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
    return float(off.median().sqrt()) if off.numel() else 1.0


def gaussian_gram(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)), float64. sigma: the median heuristic when None."""
    sigma = median_sigma(x) if sigma is None else sigma
    return torch.exp(-pairwise_sq_dists(x) / (2 * max(sigma, 1e-12) ** 2))


def label_gram(labels: torch.Tensor) -> torch.Tensor:
    """K_ij = 1 where samples i and j share a discrete label (a token id, a class)."""
    return (labels[:, None] == labels[None, :]).double()


def renyi_entropy(K: torch.Tensor, alpha: float = 1.01) -> float:
    """Matrix-based Rényi alpha-entropy of a Gram matrix, in bits."""
    A = K.double() / torch.trace(K.double())
    lam = torch.linalg.eigvalsh(A).clamp_min(0)
    lam = lam[lam > 1e-12]  # round-off eigenvalues of a rank-deficient A would count for alpha < 1
    if abs(alpha - 1.0) < 1e-9:
        return float(-(lam * torch.log2(lam)).sum())
    return float(torch.log2((lam ** alpha).sum()) / (1 - alpha))


def joint_entropy(*grams: torch.Tensor, alpha: float = 1.01) -> float:
    """Matrix-based joint entropy: the Rényi entropy of the normalised Hadamard product."""
    prod = grams[0].double()
    for g in grams[1:]:
        prod = prod * g.double()
    return renyi_entropy(prod, alpha)


def mutual_information(Ka: torch.Tensor, Kb: torch.Tensor, alpha: float = 1.01) -> float:
    """I(A; B) = S(A) + S(B) - S(A o B), bits."""
    return renyi_entropy(Ka, alpha) + renyi_entropy(Kb, alpha) - joint_entropy(Ka, Kb, alpha=alpha)


def diffusion_spectral_entropy(G: torch.Tensor, t: int = 1) -> float:
    """Diffusion spectral entropy of an affinity matrix G (e.g. `gaussian_gram`), bits."""
    G = G.double()
    d = G.sum(-1).clamp_min(1e-300)
    K = G / torch.sqrt(d[:, None] * d[None, :])
    lam = torch.linalg.eigvalsh(K).abs().sort(descending=True).values[1:]  # drop the trivial top eigenvalue
    lam = lam ** t
    total = lam.sum()
    if total <= 1e-12:
        return 0.0
    p = lam / total
    p = p[p > 1e-15]
    return float(-(p * torch.log2(p)).sum())
