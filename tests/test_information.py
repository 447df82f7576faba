"""Information-plane estimators against analytic values."""
from __future__ import annotations

import math

import pytest
import torch

from kernels.information import (
    diffusion_spectral_entropy,
    gaussian_gram,
    joint_entropy,
    label_gram,
    mutual_information,
    renyi_entropy,
)


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0, 0.5])
def test_identity_and_all_ones_kernels(alpha):
    for n in (8, 64, 300):
        assert renyi_entropy(torch.eye(n), alpha) == pytest.approx(math.log2(n), abs=1e-9)
        assert renyi_entropy(torch.ones(n, n), alpha) == pytest.approx(0.0, abs=1e-9)
        # joint with the all-ones kernel adds nothing; MI with it is 0
        assert joint_entropy(torch.eye(n), torch.ones(n, n), alpha=alpha) == pytest.approx(math.log2(n), abs=1e-9)
        assert mutual_information(torch.eye(n), torch.ones(n, n), alpha) == pytest.approx(0.0, abs=1e-9)
    assert diffusion_spectral_entropy(torch.eye(64)) == pytest.approx(math.log2(63), abs=1e-9)
    assert diffusion_spectral_entropy(torch.ones(64, 64)) == pytest.approx(0.0, abs=1e-9)


def test_label_kernels_give_the_entropy_of_the_labels():
    """k equally frequent classes: S = log2 k; a label and a copy of it share all of it; independent labels
    share nothing."""
    labels = torch.arange(120) % 4
    assert renyi_entropy(label_gram(labels), 1.0) == pytest.approx(2.0, abs=1e-9)
    assert mutual_information(label_gram(labels), label_gram(labels), 1.0) == pytest.approx(2.0, abs=1e-9)
    other = (torch.arange(120) // 4) % 3  # balanced against `labels`: independent
    assert mutual_information(label_gram(labels), label_gram(other), 1.0) == pytest.approx(0.0, abs=1e-9)


def _gaussian_s2(cov_eigs, sigma):
    """Matrix-based alpha = 2 entropy of N(0, C) under a Gaussian kernel of width sigma, as N grows:
    -log2 E exp(-|X - X'|^2 / sigma^2) = 1/2 sum log2(1 + 4 lambda / sigma^2)."""
    return 0.5 * sum(math.log2(1 + 4 * lam / sigma ** 2) for lam in cov_eigs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_data_with_known_covariance(seed):
    """N = 1000 samples (the app's default): the entropy of a 5-d Gaussian and the mutual information of a
    correlated pair within 5% of their analytic values."""
    g = torch.Generator().manual_seed(seed)
    N, sigma = 1000, 1.0
    lam = [3.0, 1.0, 0.5, 0.2, 0.1]
    X = torch.randn(N, 5, generator=g, dtype=torch.float64) * torch.tensor(lam, dtype=torch.float64).sqrt()
    est = renyi_entropy(gaussian_gram(X, sigma), alpha=2.0)
    assert est == pytest.approx(_gaussian_s2(lam, sigma), rel=0.05)
    rho = 0.8
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x, y = z[:, :1], rho * z[:, :1] + math.sqrt(1 - rho ** 2) * z[:, 1:]
    mi = mutual_information(gaussian_gram(x, sigma), gaussian_gram(y, sigma), alpha=2.0)
    # I = S(x) + S(y) - S(x, y); the joint kernel is the Gaussian kernel on (x, y), covariance [[1, r], [r, 1]]
    truth = 2 * _gaussian_s2([1.0], sigma) - _gaussian_s2([1 + rho, 1 - rho], sigma)
    assert mi == pytest.approx(truth, rel=0.05)
    # and it tends to Shannon's -1/2 log2(1 - rho^2) as the kernel narrows: below it, above the wide-kernel value
    assert truth < -0.5 * math.log2(1 - rho ** 2)
