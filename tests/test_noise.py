"""The PYoCo prior against its reference formulas (Ge et al. 2023, eqs. 4-5), with fixed seeds.

Tolerances: per-frame variance 1 +- 0.02 and correlation within 0.02 of covariance(T) on 2^23 draws
(the standard error of one correlation estimate there is about 0.003).
"""

from __future__ import annotations

import math

import pytest
import torch

from pyoco.noise import (
    NoisePrior,
    alpha_to_rho,
    clip_generators,
    empirical_frame_correlation,
    make_prior,
    rank_generator,
    rho_to_alpha,
)

SHAPE = (128, 4, 16, 32, 32)  # B, C, T, H, W


def _draw(kind: str, alpha: float, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return make_prior(kind, alpha).sample(shape, generator=torch.Generator().manual_seed(seed))


def reference_covariance(kind: str, alpha: float, t: int) -> torch.Tensor:
    """Covariance built from the paper's generative definition, one coefficient at a time: eps = L z."""
    a2 = alpha * alpha
    sd_ind = math.sqrt(1.0 / (1.0 + a2))
    if kind == "mixed":
        # columns: z_shared, z_0 .. z_{T-1}
        lmat = torch.zeros(t, t + 1, dtype=torch.float64)
        for i in range(t):
            lmat[i, 0] = math.sqrt(a2 / (1.0 + a2))
            lmat[i, i + 1] = sd_ind
    else:
        rho = alpha / math.sqrt(1.0 + a2)
        lmat = torch.zeros(t, t, dtype=torch.float64)
        lmat[0, 0] = 1.0
        for i in range(1, t):
            lmat[i] = rho * lmat[i - 1]
            lmat[i, i] = sd_ind
    return lmat @ lmat.T


@pytest.mark.parametrize("kind", ["mixed", "progressive"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_covariance_matches_generative_definition(kind, alpha):
    torch.testing.assert_close(
        make_prior(kind, alpha).covariance(16), reference_covariance(kind, alpha, 16), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["mixed", "progressive"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_empirical_statistics(kind, alpha):
    prior = make_prior(kind, alpha)
    eps = _draw(kind, alpha)
    per_frame_var = eps.transpose(0, 2).reshape(16, -1).double().var(dim=1)
    torch.testing.assert_close(per_frame_var, torch.ones(16, dtype=torch.float64), rtol=0, atol=0.02)
    corr = empirical_frame_correlation(eps)
    torch.testing.assert_close(corr, prior.covariance(16), rtol=0, atol=0.02)
    # Neighbouring-frame correlation is rho, and the prior really correlates (not iid in disguise).
    assert abs(corr.diagonal(1).mean().item() - prior.rho) < 0.01
    assert prior.rho >= 0.2 and corr.diagonal(1).mean().item() > 0.15


def test_rho_formulas():
    assert alpha_to_rho(1.0, "progressive") == pytest.approx(1 / math.sqrt(2))
    assert alpha_to_rho(1.0, "mixed") == pytest.approx(0.5)
    assert alpha_to_rho(3.0, "iid") == 0.0
    for kind in ("mixed", "progressive"):
        for a in (0.0, 0.3, 1.0, 2.0, 10.0):
            assert rho_to_alpha(alpha_to_rho(a, kind), kind) == pytest.approx(a, rel=1e-9, abs=1e-12)
    assert make_prior("progressive", 2.0).rho == pytest.approx(2 / math.sqrt(5))


def test_mixed_alpha_zero_is_iid():
    g = torch.Generator().manual_seed(7)
    a = make_prior("mixed", 0.0).sample((2, 3, 8, 4, 4), generator=g)
    b = make_prior("iid").sample((2, 3, 8, 4, 4), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(make_prior("mixed", 0.0).covariance(5), torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mixed", "progressive"])
def test_single_frame_reduces_to_iid(kind):
    a = make_prior(kind, 2.0).sample((2, 3, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    b = torch.randn((2, 3, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert make_prior(kind, 2.0).covariance(1).item() == 1.0


def test_same_generator_same_noise_and_ranks_differ():
    prior = make_prior("progressive", 1.0)
    shape = (2, 3, 8, 4, 4)
    a = prior.sample(shape, generator=rank_generator(seed=5, rank=0))
    b = prior.sample(shape, generator=rank_generator(seed=5, rank=0))
    c = prior.sample(shape, generator=rank_generator(seed=5, rank=1))
    d = prior.sample(shape, generator=rank_generator(seed=6, rank=0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, d)
    # (seed, rank) pairs must not collide the way seed * world_size + rank can.
    e = prior.sample(shape, generator=rank_generator(seed=1, rank=0))
    f = prior.sample(shape, generator=rank_generator(seed=0, rank=1))
    assert not torch.allclose(e, f)


def test_per_clip_generators_do_not_depend_on_batch():
    prior = make_prior("mixed", 1.5)
    both = prior.sample((2, 3, 6, 4, 4), generator=clip_generators(11, [0, 1]))
    second = prior.sample((1, 3, 6, 4, 4), generator=clip_generators(11, [1]))
    torch.testing.assert_close(both[1:], second, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        prior.sample((3, 3, 6, 4, 4), generator=clip_generators(11, [0, 1]))


def test_dtype_and_sample_like():
    prior = make_prior("progressive", 1.0)
    x = torch.zeros(2, 3, 4, 4, 4, dtype=torch.bfloat16)
    eps = prior.sample_like(x, generator=torch.Generator().manual_seed(0))
    assert eps.dtype == torch.bfloat16 and eps.shape == x.shape


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_prior("mixed", -1.0), "alpha must be a finite number >= 0 \\(got -1.0\\)"),
        (lambda: make_prior("mixed", float("nan")), "got nan"),
        (lambda: make_prior("progressive", float("inf")), "got inf"),
        (lambda: make_prior("gaussian", 1.0), "unknown noise kind 'gaussian'"),
        (lambda: make_prior("mixed", 1.0).sample((2, 3, 4, 4)), "must be 5-D"),
        (lambda: make_prior("mixed", 1.0).sample((2, 0, 4, 4, 4)), "positive sizes"),
        (lambda: make_prior("mixed", 1.0).covariance(0), "positive integer"),
        (lambda: rho_to_alpha(1.0), "rho must be in"),
        (lambda: NoisePrior("mixed", -2), "got -2"),
    ],
)
def test_bad_input_names_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
