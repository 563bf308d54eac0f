"""The training objective: reference formulas, prior injection, weighting, dropout."""

from __future__ import annotations

import pytest
import torch

from pyoco.diffusion import DEFAULT_SCHEDULER_CONFIG, DiffusionLoss, alphas_cumprod, make_scheduler_config
from pyoco.noise import make_prior
from tests.toy_models import ToyVideoDenoiser


class RecordingPrior:
    """Delegates to a real prior and records every draw (shape and values)."""

    def __init__(self, prior):
        self.prior = prior
        self.draws: list[torch.Tensor] = []

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        x = self.prior.sample(shape, generator=generator, device=device, dtype=dtype)
        self.draws.append(x.clone())
        return x

    def sample_like(self, x, *, generator=None):
        return self.sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _batch(b=3, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((b, 3, t, 8, 8), generator=g) * 2 - 1
    cond = torch.randn((b, 5, 8), generator=g)
    mask = torch.ones((b, 5), dtype=torch.bool)
    return x0, cond, mask


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_reference_formula_with_prior_noise(prediction_type):
    model = ToyVideoDenoiser()
    x0, cond, mask = _batch()
    prior = RecordingPrior(make_prior("progressive", 1.0))
    loss_fn = DiffusionLoss(prediction_type=prediction_type)
    t = torch.tensor([10, 500, 990])
    out = loss_fn(model, x0, cond, mask, prior, generator=torch.Generator().manual_seed(1), timesteps=t)

    (eps,) = prior.draws  # exactly one draw, and it is what the loss used
    abar = alphas_cumprod(make_scheduler_config()).float()[t].reshape(-1, 1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    expected = ((model(x_t, t, cond, mask) - target) ** 2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
    assert out.per_sample.shape == (3,)


def test_loss_uses_scheduler_prediction_type_and_pretrained_schedule():
    sched = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 100,
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
    }
    loss_fn = DiffusionLoss(sched)
    assert loss_fn.prediction_type == "v_prediction"
    assert loss_fn.num_train_timesteps == 100
    assert DiffusionLoss(sched, prediction_type="epsilon").prediction_type == "epsilon"


def test_scheduler_config_carries_the_resolved_prediction_type():
    """What training exports must say what the model predicts: a pretrained epsilon schedule finetuned as v."""
    pretrained = {**DEFAULT_SCHEDULER_CONFIG, "num_train_timesteps": 100}
    cfg = make_scheduler_config(pretrained, 1000, prediction_type="v_prediction")
    assert cfg["prediction_type"] == "v_prediction" and cfg["num_train_timesteps"] == 100
    assert pretrained["prediction_type"] == "epsilon"  # the caller's dict is not changed
    assert make_scheduler_config(pretrained)["prediction_type"] == "epsilon"
    assert DiffusionLoss(cfg).prediction_type == "v_prediction"


def test_one_timestep_per_clip_shared_by_frames():
    """Frames of a clip see one noise level: x_t - sqrt(abar) x0 scaled back gives eps frame by frame."""
    captured = {}

    class Spy(ToyVideoDenoiser):
        def forward(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None):
            captured["x_t"], captured["t"] = sample.clone(), timesteps.clone()
            return super().forward(sample, timesteps, encoder_hidden_states, encoder_attention_mask)

    x0, cond, mask = _batch(b=4, t=6)
    prior = RecordingPrior(make_prior("mixed", 1.0))
    DiffusionLoss()(Spy(), x0, cond, mask, prior, generator=torch.Generator().manual_seed(3))
    assert captured["t"].shape == (4,)
    abar = alphas_cumprod(make_scheduler_config()).float()[captured["t"]].reshape(-1, 1, 1, 1, 1)
    eps_back = (captured["x_t"] - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(eps_back, prior.draws[0], rtol=1e-4, atol=1e-4)


def test_min_snr_weighting():
    loss_fn = DiffusionLoss(min_snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 999])
    abar = loss_fn.alphas_cumprod[t]
    snr = abar / (1 - abar)
    torch.testing.assert_close(loss_fn.weights(t), (snr.clamp(max=5.0) / snr).float())
    v = DiffusionLoss(min_snr_gamma=5.0, prediction_type="v_prediction")
    torch.testing.assert_close(v.weights(t), (snr.clamp(max=5.0) / (snr + 1)).float())
    assert torch.all(DiffusionLoss().weights(t) == 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_finite_on_zero_terminal_snr(prediction_type):
    """SD-2-style rescaled schedule (abar_T = 0 exactly): the eps weight min(SNR, g) / SNR is 0 / 0 at T,
    its limit is 1; v's is 0. Every other step keeps the reference formula, and the loss stays finite."""
    sched = {**make_scheduler_config(), "rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear"}
    loss_fn = DiffusionLoss(sched, min_snr_gamma=5.0, prediction_type=prediction_type)
    assert loss_fn.alphas_cumprod[-1] == 0.0  # the case being tested
    t = torch.arange(loss_fn.num_train_timesteps)
    w = loss_fn.weights(t)
    assert torch.isfinite(w).all()
    assert w[-1] == (1.0 if prediction_type == "epsilon" else 0.0)
    abar = loss_fn.alphas_cumprod[:-1]
    snr = abar / (1 - abar)
    ref = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(w[:-1], ref.float(), atol=0, rtol=1e-6)
    x0, cond, mask = _batch()
    last = torch.full((x0.shape[0],), loss_fn.num_train_timesteps - 1)
    out = loss_fn(ToyVideoDenoiser(text_dim=8), x0, cond, mask, make_prior("iid", 0.0), timesteps=last)
    assert torch.isfinite(out.loss)


def test_caption_dropout_replaces_with_null_embedding():
    x0, cond, mask = _batch(b=64)
    null = torch.full((1, 5, 8), 7.0)
    null_mask = torch.zeros((1, 5), dtype=torch.bool)
    null_mask[0, 0] = True
    loss_fn = DiffusionLoss(caption_dropout=0.5)
    c2, m2 = loss_fn.drop_captions(cond, mask, null, null_mask, torch.Generator().manual_seed(0))
    dropped = (c2 == 7.0).all(dim=(1, 2))
    assert 16 < int(dropped.sum()) < 48  # Binomial(64, 0.5): 32 +- 4 sd; fixed seed
    assert torch.equal(c2[~dropped], cond[~dropped])
    assert torch.equal(m2[dropped], null_mask.expand(int(dropped.sum()), 5))
    assert torch.equal(
        DiffusionLoss(caption_dropout=0.0).drop_captions(cond, mask, None, None, None)[0], cond
    )
    with pytest.raises(ValueError, match="needs null_cond"):
        loss_fn(ToyVideoDenoiser(), x0, cond, mask, make_prior("iid"))


def test_same_generator_same_loss_and_bad_input():
    model = ToyVideoDenoiser()
    x0, cond, mask = _batch()
    prior = make_prior("progressive", 0.5)
    a = DiffusionLoss()(model, x0, cond, mask, prior, generator=torch.Generator().manual_seed(9)).loss
    b = DiffusionLoss()(model, x0, cond, mask, prior, generator=torch.Generator().manual_seed(9)).loss
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="x0 must be"):
        DiffusionLoss()(model, x0[:, :, 0], cond, mask, prior)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionLoss(prediction_type="sample")


def test_timestep_power_draws_t_with_density_proportional_to_t_to_the_power_minus_1():
    """timestep_power p: P(t < x T) = x^p. Uniform (p = 1) keeps torch.randint's draws exactly, so seeded runs
    (the golden loss curve) are unchanged. 200k draws: the CDF's SE is below 0.0012, tolerance 0.005."""
    n = 200_000
    uniform = DiffusionLoss(None).sample_timesteps(n, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(uniform, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)))
    t = DiffusionLoss(None, timestep_power=3.0).sample_timesteps(n, torch.Generator().manual_seed(0), "cpu")
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    for x in (0.25, 0.5, 0.8):
        assert abs((t < x * 1000).float().mean().item() - x**3) < 0.005, x
    with pytest.raises(ValueError, match="timestep_power must be > 0"):
        DiffusionLoss(None, timestep_power=0.0)
