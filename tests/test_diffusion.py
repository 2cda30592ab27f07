"""Tests for 04_latent_diffusion.py: the schedule, the forward process, the samplers, guidance, EMA."""
import importlib

import pytest
import torch
import torch.nn as nn

D = importlib.import_module("04_latent_diffusion")


class ExactDenoiser(nn.Module):
    """The ideal eps-predictor for a data set of one point x0: eps = (z_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0
        # a dummy parameter: the sampler reads the device and dtype from the network's parameters
        self.dummy = nn.Parameter(torch.zeros((), dtype=x0.dtype))

    def forward(self, z_t, t, y=None):
        ab = self.schedule.alpha_bar[t].to(z_t.dtype)[:, None, None, None]
        return (z_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class LabelStub(nn.Module):
    """Returns eps = 1 + label (a known, label-dependent value) and records the labels it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z_t, t, y=None):
        self.seen.append(y.clone())
        return torch.ones_like(z_t) * (1.0 + y.to(z_t.dtype))[:, None, None, None] * torch.arange(
            1, z_t.shape[1] + 1, dtype=z_t.dtype)[None, :, None, None]


def test_schedule_buffers_match_formula():
    s = D.NoiseSchedule(T=1000, beta_start=0.0015, beta_end=0.0195)
    for name in ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar",
                 "sqrt_one_minus_alpha_bar", "posterior_variance"):
        assert getattr(s, name).dtype == torch.float64, name
        assert name in dict(s.named_buffers())
    t = torch.arange(1000, dtype=torch.float64)
    betas = (0.0015**0.5 + t / 999 * (0.0195**0.5 - 0.0015**0.5)) ** 2
    torch.testing.assert_close(s.betas, betas, rtol=1e-12, atol=1e-15)
    assert s.betas[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    ab = [1.0]
    for b in s.betas.tolist():
        ab.append(ab[-1] * (1 - b))
    torch.testing.assert_close(s.alpha_bar, torch.tensor(ab[1:], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.alpha_bar_prev, torch.tensor(ab[:-1], dtype=torch.float64), rtol=1e-12, atol=0)


def test_closed_form_equals_step_by_step_noising():
    s = D.NoiseSchedule(T=1000)
    # analytic recursion: z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps_t gives
    # mean coefficient c_t = sqrt(1 - beta_t) c_{t-1} and variance v_t = (1 - beta_t) v_{t-1} + beta_t
    c, v, cs, vs = 1.0, 0.0, [], []
    for b in s.betas.tolist():
        c, v = (1 - b) ** 0.5 * c, (1 - b) * v + b
        cs.append(c), vs.append(v)
    t = torch.arange(1000)
    one = torch.ones(1000, 1, 1, 1, dtype=torch.float64)
    # q_sample with eps = 0 returns the mean coefficient, with z0 = 0, eps = 1 the standard deviation
    torch.testing.assert_close(D.q_sample(s, one, t, 0 * one).flatten(), torch.tensor(cs, dtype=torch.float64),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(D.q_sample(s, 0 * one, t, one).flatten() ** 2, torch.tensor(vs, dtype=torch.float64),
                               rtol=1e-10, atol=0)
    # Monte Carlo: iterate the one-step kernel on N samples from z0 = 1.5 and compare moments at a few t
    g = torch.Generator().manual_seed(0)
    N, z0 = 40000, 1.5
    z = torch.full((N,), z0, dtype=torch.float64)
    check = {0, 10, 100, 500, 999}
    for step, b in enumerate(s.betas.tolist()):
        z = (1 - b) ** 0.5 * z + b**0.5 * torch.randn(N, generator=g, dtype=torch.float64)
        if step in check:
            mean, var = s.sqrt_alpha_bar[step].item() * z0, 1 - s.alpha_bar[step].item()
            # 5 standard errors: tight, but a fixed seed keeps it from flaking
            assert abs(z.mean().item() - mean) < 5 * (var / N) ** 0.5, step
            assert abs(z.var().item() - var) < 5 * var * (2 / N) ** 0.5, step


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 50, 0.0), ("ddim", 20, 1.0), ("ddpm", 50, 0.0),
                                               ("ddpm", 1000, 0.0)])
def test_samplers_land_on_the_single_data_point(dtype, atol, sampler, steps, eta):
    s = D.NoiseSchedule(T=1000)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    model = D.LatentDiffusion(ExactDenoiser(s, x0), s)
    # with the exact denoiser every z0_hat is x0; the last step has sigma = 0 and alpha_bar_s = 1,
    # so whatever noise was added on the way, the sample is x0
    z = model.sample((8, 2, 4, 4), steps=steps, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(1))
    assert z.dtype == dtype
    torch.testing.assert_close(z, x0.expand(8, -1, -1, -1), atol=atol, rtol=0)


class ExactVDenoiser(ExactDenoiser):
    """The ideal v-predictor for one point x0: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""

    def forward(self, z_t, t, y=None):
        ab = self.schedule.alpha_bar[t].to(z_t.dtype)[:, None, None, None]
        return ab.sqrt() * super().forward(z_t, t, y) - (1 - ab).sqrt() * self.x0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_v_prediction_samples_and_loss(sampler):
    s = D.NoiseSchedule(T=1000)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = D.LatentDiffusion(ExactVDenoiser(s, x0), s, prediction="v")
    # eps_hat recovered from v_hat is the exact noise: sampling lands on x0, and the v loss is 0
    z = model.sample((8, 2, 4, 4), steps=50, sampler=sampler, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, x0.expand(8, -1, -1, -1), atol=1e-9, rtol=0)
    assert model.loss(x0.expand(16, -1, -1, -1).clone()).item() < 1e-20
    # the eps-denoiser under prediction="v" is wrong, and the loss says so
    assert D.LatentDiffusion(ExactDenoiser(s, x0), s, prediction="v").loss(x0.expand(16, -1, -1, -1).clone()) > 0.01


class GaussianDenoiser(ExactDenoiser):
    """The ideal eps-predictor for data N(m, s^2): eps = sqrt(1 - alpha_bar)(z_t - sqrt(alpha_bar) m) / (alpha_bar s^2 + 1 - alpha_bar)."""

    def __init__(self, schedule, m, s):
        super().__init__(schedule, torch.zeros((), dtype=torch.float64))
        self.m, self.s = m, s

    def forward(self, z_t, t, y=None):
        ab = self.schedule.alpha_bar[t][:, None, None, None]
        return (1 - ab).sqrt() * (z_t - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)


def test_samplers_reproduce_gaussian_data():
    # a one-point data set only checks the last step; a Gaussian checks every intermediate coefficient
    sch = D.NoiseSchedule(T=1000)
    model = D.LatentDiffusion(GaussianDenoiser(sch, 0.5, 2.0), sch)
    g = lambda: torch.Generator().manual_seed(0)
    for sampler in ("ddim", "ddpm"):
        z = model.sample((20000, 1, 1, 1), steps=1000, sampler=sampler, generator=g())
        # mean is off by the terminal signal sqrt(alpha_bar_{T-1}) m the sampler ignores, hence 0.05
        assert abs(z.mean().item() - 0.5) < 0.05 and abs(z.std().item() - 2.0) < 0.05, sampler
    # DDIM with eta = 1 is the DDPM step: identical samples from the same noise
    a = model.sample((64, 1, 2, 2), steps=30, sampler="ddim", eta=1.0, generator=g())
    b = model.sample((64, 1, 2, 2), steps=30, sampler="ddpm", generator=g())
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ddim_eta0_adds_no_noise_and_ddpm_does():
    # with eps_hat = 0 everywhere, DDIM (eta = 0) only rescales the starting noise, while DDPM adds
    # fresh noise at every step but the last, so the two end points differ.
    s = D.NoiseSchedule(T=1000)
    x0 = torch.zeros(1, 1, 2, 2)

    class Zero(ExactDenoiser):
        def forward(self, z_t, t, y=None):
            return torch.zeros_like(z_t)  # a bad denoiser: predicted x0 = z_t / sqrt(alpha_bar_t)

    model = D.LatentDiffusion(Zero(s, x0), s)
    a = model.sample((4, 1, 2, 2), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    b = model.sample((4, 1, 2, 2), steps=10, sampler="ddim", generator=torch.Generator().manual_seed(0))
    # eps_hat = 0 makes DDIM a pure rescaling: z_0 = z_T / sqrt(alpha_bar_{T-1}); DDPM adds noise on top
    zT = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, zT / s.alpha_bar[-1].sqrt().float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)


def test_classifier_free_guidance_formula():
    s = D.NoiseSchedule(T=1000)
    stub = LabelStub()
    model = D.LatentDiffusion(stub, s, num_classes=5)
    z, t = torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 2, 4])
    eps_c = (1.0 + y.float())[:, None, None, None] * torch.tensor([1.0, 2.0])[None, :, None, None].expand(3, 2, 4, 4)
    eps_u = (1.0 + 5.0) * torch.tensor([1.0, 2.0])[None, :, None, None].expand(3, 2, 4, 4)
    for w in (0.0, 1.0, 2.5, 7.0):
        stub.seen.clear()
        out = model.eps(z, t, y, guidance=w)
        torch.testing.assert_close(out, eps_u + w * (eps_c - eps_u))
        # one forward pass either way: B samples for w = 1, 2B (cond + null) otherwise
        assert len(stub.seen) == 1 and len(stub.seen[0]) == (3 if w == 1.0 else 6)
    # no label: the unconditional prediction, whatever w
    torch.testing.assert_close(model.eps(z, t, torch.full((3,), 5), guidance=3.0), eps_u)


def test_label_dropout_with_p_uncond():
    s = D.NoiseSchedule(T=1000)
    z0, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    stub = LabelStub()
    D.LatentDiffusion(stub, s, num_classes=3, p_uncond=1.0).loss(z0, y)
    assert torch.equal(stub.seen[-1], torch.full((64,), 3))
    D.LatentDiffusion(stub, s, num_classes=3, p_uncond=0.0).loss(z0, y)
    assert torch.equal(stub.seen[-1], y)
    torch.manual_seed(0)
    D.LatentDiffusion(stub, s, num_classes=3, p_uncond=0.5).loss(torch.randn(4000, 1, 1, 1), torch.zeros(4000).long())
    assert abs((stub.seen[-1] == 3).float().mean().item() - 0.5) < 0.03


def test_loss_is_seedable_and_zero_for_exact_denoiser():
    s = D.NoiseSchedule(T=1000)
    x0 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    model = D.LatentDiffusion(ExactDenoiser(s, x0), s)
    assert model.loss(x0.expand(16, -1, -1, -1).clone()).item() < 1e-20
    unet = D.UNet(in_ch=2, ch=16, ch_mult=(1, 2), attn_levels=(1,))
    model = D.LatentDiffusion(unet, s)
    z0 = torch.randn(8, 2, 4, 4)
    torch.manual_seed(3)
    a = model.loss(z0)
    torch.manual_seed(3)
    assert torch.equal(a, model.loss(z0))
    # at init the UNet outputs 0, so the loss is the mean of eps^2, about 1
    assert abs(a.item() - 1.0) < 0.3


def test_loss_with_given_draws_is_the_formula():
    # train.py draws t, eps and the label-dropout u itself (for multi-process runs): the loss
    # must then be exactly || eps - eps_theta(sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, t, y') ||^2
    s = D.NoiseSchedule(T=1000)
    stub = LabelStub()
    model = D.LatentDiffusion(stub, s, num_classes=3, p_uncond=0.5)
    z0, y = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 1])
    t, eps, u = torch.tensor([0, 10, 500, 999]), torch.randn(4, 2, 3, 3), torch.tensor([0.9, 0.1, 0.7, 0.2])
    loss = model.loss(z0, y, t, eps, u)
    assert torch.equal(stub.seen[-1], torch.tensor([0, 3, 2, 3]))  # u < 0.5: the null label 3
    ab = s.alpha_bar[t].to(z0.dtype)[:, None, None, None]
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(loss, ((stub(z_t, t, torch.tensor([0, 3, 2, 3])) - eps) ** 2).mean())
    assert torch.equal(model(z0, y, t, eps, u), loss)  # forward = loss (what DDP calls)


def test_ema_update_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = D.EMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3))  # changes the BatchNorm running statistics (buffers)
    ema.update(model)
    for o, p_ema, p in zip(old, ema.model.parameters(), model.parameters()):
        assert torch.equal(p_ema, 0.9 * o + (1 - 0.9) * p.detach())
        assert not torch.equal(p_ema, p)
    for b_ema, b in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(b_ema, b)
    fresh = D.EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    fresh.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), ema.model.parameters()))


def test_unet_shape_zero_init_and_conditioning():
    torch.manual_seed(0)
    unet = D.UNet(in_ch=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(1, 2), num_classes=4)
    z, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.tensor([1, 3])
    out = unet(z, t, y)
    assert out.shape == z.shape
    assert torch.equal(out, torch.zeros_like(z))
    assert unet.label_emb.num_embeddings == 5  # 4 classes + the null label
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = unet(z, t, y)
    assert out.abs().mean() > 1e-3
    assert (unet(z, torch.tensor([11, 700]), y)[0] - out[0]).abs().max() > 1e-4
    assert (unet(z, t, torch.tensor([2, 3]))[0] - out[0]).abs().max() > 1e-4
    # y = None is the null label
    torch.testing.assert_close(unet(z, t, None), unet(z, t, torch.tensor([4, 4])))
    # batch elements do not interact (GroupNorm and attention are per sample)
    torch.testing.assert_close(unet(z[:1], t[:1], y[:1]), out[:1], rtol=1e-4, atol=1e-5)


def test_same_generator_same_samples():
    torch.manual_seed(0)
    unet = D.UNet(in_ch=2, ch=16, ch_mult=(1, 2), num_classes=2)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = D.LatentDiffusion(unet, D.NoiseSchedule(T=1000), num_classes=2)
    y = torch.tensor([0, 1, 1])
    for sampler in ("ddim", "ddpm"):
        kw = dict(steps=5, sampler=sampler, eta=1.0, y=y, guidance=2.0)
        a = model.sample((3, 2, 8, 8), generator=torch.Generator().manual_seed(7), **kw)
        torch.manual_seed(123)  # the global RNG must not matter
        b = model.sample((3, 2, 8, 8), generator=torch.Generator().manual_seed(7), **kw)
        c = model.sample((3, 2, 8, 8), generator=torch.Generator().manual_seed(8), **kw)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_timesteps_are_evenly_spaced_and_complete():
    model = D.LatentDiffusion(LabelStub(), D.NoiseSchedule(T=1000))
    assert model._timesteps(1000) == list(range(999, -1, -1))
    ts = model._timesteps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 50
    assert max(a - b for a, b in zip(ts, ts[1:])) - min(a - b for a, b in zip(ts, ts[1:])) <= 1


def test_estimate_scale_factor_gives_unit_std():
    z = 3.7 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) + 2.0
    f = D.estimate_scale_factor(z)
    assert isinstance(f, float)
    assert abs((z * f).std().item() - 1.0) < 1e-6
    assert abs(f - 1 / 3.7) < 0.01


def test_ema_warmup_decay():
    model = nn.Linear(2, 2)
    ema = D.EMA(model, decay=0.999, warmup=True)
    for n in range(3):
        old = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = (1 + n) / (10 + n)  # below 0.999 early on
        assert torch.allclose(ema.model.weight, d * old + (1 - d) * model.weight)
    ema.num_updates = 10_000  # late in training the constant decay takes over
    old = ema.model.weight.clone()
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.999 * old + 0.001 * model.weight)
