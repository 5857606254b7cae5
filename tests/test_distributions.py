"""The hand-written samplers and log-pdfs against torch.distributions and
scipy.stats, on random and extreme inputs."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import distributions as D

import helpers as hp
from export import notebook_definitions

GEN_SEED = 1234


def gen():
    return hp.make_generator(GEN_SEED)


def test_gaussian_log_pdf_matches_torch_on_random_inputs():
    g = gen()
    x, mu = torch.randn(2, 500, 7, generator=g, dtype=torch.float64)
    logvar = 4 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    ref = D.Normal(mu, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    torch.testing.assert_close(hp.gaussian_log_pdf(x, mu, logvar), ref,
                               rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("logvar", [-30.0, 30.0])
def test_gaussian_log_pdf_is_exact_for_extreme_log_variances(logvar):
    x = torch.tensor([[1e-7, -2e-6], [3e6, -1e6]], dtype=torch.float64)
    mu = torch.zeros(2, dtype=torch.float64)
    lv = torch.full((2,), logvar, dtype=torch.float64)
    out = hp.gaussian_log_pdf(x, mu, lv)
    ref = D.Normal(mu, torch.exp(0.5 * lv)).log_prob(x).sum(-1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)


def test_the_prior_is_the_zero_mean_unit_variance_gaussian():
    z = torch.randn(100, 3, generator=gen(), dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(hp.log_prior(z),
                               hp.gaussian_log_pdf(z, zeros, zeros))


@pytest.mark.parametrize("mu,logvar", [(0.0, 0.0), (3.0, -4.0),
                                       (-1.5, 2.5)])
def test_gaussian_sample_moments_within_standard_errors(mu, logvar):
    n = 200_000
    mu_t = torch.full((2,), mu, dtype=torch.float64)
    lv_t = torch.full((2,), logvar, dtype=torch.float64)
    z = hp.gaussian_sample(mu_t, lv_t, n, gen())             # (n, 2)
    var = math.exp(logvar)
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2.0 / (n - 1))
    assert (z.mean(0) - mu).abs().max() < 4 * se_mean
    assert (z.var(0) - var).abs().max() < 4 * se_var
    # and the whole distribution, not only two moments
    ks = stats.kstest(z[:, 0].numpy(), stats.norm(mu, math.sqrt(var)).cdf)
    assert ks.pvalue > 1e-3


def test_gaussian_sample_is_reparameterised():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    logvar = torch.tensor([0.2, -0.4], requires_grad=True)
    g = gen()
    z = hp.gaussian_sample(mu, logvar, 10, g)
    z.sum().backward()
    eps = torch.randn(10, 2, generator=gen())
    torch.testing.assert_close(mu.grad, torch.full((2,), 10.0))
    expected = (0.5 * torch.exp(0.5 * logvar) * eps).sum(0)
    torch.testing.assert_close(logvar.grad, expected.detach())


def test_bernoulli_log_pdf_matches_torch_including_huge_logits():
    g = gen()
    logits = 10 * torch.randn(300, 784, generator=g, dtype=torch.float64)
    logits[0, :4] = torch.tensor([100.0, -100.0, 100.0, -100.0])
    x = (torch.rand(300, 784, generator=g, dtype=torch.float64) < 0.5)
    x = x.double()
    x[0, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ref = D.Bernoulli(logits=logits).log_prob(x).sum(-1)
    out = hp.bernoulli_log_pdf(x, logits)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)
    # each extreme pixel alone: right answers are ~0 and exactly -100
    four = hp.bernoulli_log_pdf(x[0, :4, None], logits[0, :4, None])
    torch.testing.assert_close(four, torch.tensor(
        [-3.7e-44, -3.7e-44, -100.0, -100.0], dtype=torch.float64),
        atol=1e-12, rtol=0)


def test_bernoulli_sample_frequencies_within_standard_errors():
    p = torch.tensor([0.0, 0.03, 0.5, 0.9, 1.0], dtype=torch.float64)
    n = 100_000
    x = hp.bernoulli_sample(p.expand(n, 5), gen())
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    se = torch.sqrt(p * (1 - p) / n).clamp_min(1e-12)
    assert ((x.mean(0) - p).abs() <= 4 * se).all()


def test_laplace_sampler_and_log_pdf_against_references():
    nb = notebook_definitions("01_distributions", "laplace_sample",
                              "laplace_log_pdf")
    loc = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.7], dtype=torch.float64)
    z = nb["laplace_sample"](loc, scale, 100_000, gen())      # (n, 1)
    ks = stats.kstest(z[:, 0].detach().numpy(),
                      stats.laplace(1.0, 0.7).cdf)
    assert ks.pvalue > 1e-3
    z.sum().backward()                                         # dz/dloc = 1
    assert loc.grad.item() == pytest.approx(100_000)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)[:, None]
    ref = D.Laplace(loc.detach(), scale).log_prob(x).sum(-1)
    torch.testing.assert_close(nb["laplace_log_pdf"](x, loc.detach(), scale),
                               ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,args", [
    (hp.gaussian_log_pdf, (torch.zeros(0), torch.zeros(0), torch.zeros(0))),
    (hp.bernoulli_log_pdf, (torch.tensor(1.0), torch.tensor(0.0))),
    (hp.gaussian_sample, (torch.zeros(3, 0), torch.zeros(3, 0))),
])
def test_empty_or_scalar_inputs_get_a_clear_error(fn, args):
    with pytest.raises(ValueError, match="last \\(event\\) dimension"):
        fn(*args)
    with pytest.raises(ValueError, match="must be a tensor"):
        fn(np.zeros(2), *args[1:])


def test_mismatched_shapes_get_a_clear_error():
    with pytest.raises(ValueError, match="do not broadcast"):
        hp.gaussian_log_pdf(torch.zeros(4, 2), torch.zeros(4, 3),
                            torch.zeros(4, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        hp.bernoulli_log_pdf(torch.zeros(5, 784), torch.zeros(5, 10))


def test_to_image_and_tiling():
    x = torch.arange(3 * 784, dtype=torch.float32).reshape(3, 784) / 3000
    img = hp.to_image(x)
    assert img.shape == (3, 28, 28)
    assert img[1, 2, 5] == x[1, 2 * 28 + 5]
    grid = hp.tile_images(x, nrow=2, pad=2)
    assert grid.shape == (2 + 2 * 30, 2 + 2 * 30)
    np.testing.assert_array_equal(grid[2:30, 32:60], img[1].numpy())
    with pytest.raises(ValueError, match="784"):
        hp.to_image(torch.zeros(5, 100))


def test_logsumexp_is_exact_where_the_naive_sum_fails():
    logsumexp = hp.logsumexp
    a = torch.tensor([[-1000.0, -1000.0], [1000.0, 1000.0],
                      [-math.inf, -math.inf], [math.inf, 0.0],
                      [math.nan, 0.0], [0.0, -200.0]], dtype=torch.float64)
    out = logsumexp(a, dim=1)
    expected = [-1000 + math.log(2), 1000 + math.log(2), -math.inf,
                math.inf, math.nan, 0.0]
    torch.testing.assert_close(out, torch.tensor(expected,
                                                 dtype=torch.float64),
                               equal_nan=True, rtol=1e-15, atol=0)
    # against torch on random float32 rows of every scale, any dimension
    x = 300 * torch.randn(6, 50, 7, generator=gen())
    for dim in (0, 1, 2):
        torch.testing.assert_close(logsumexp(x, dim=dim),
                                   torch.logsumexp(x, dim=dim),
                                   rtol=1e-6, atol=1e-4)
    assert logsumexp(x, 1, keepdim=True).shape == (6, 1, 7)


def test_grid_integration_of_a_known_density():
    # a Gaussian of sd 0.3 at (1, -2), scaled by e^-500: log integral -500
    log_integrate_grid = notebook_definitions(
        "04_log_likelihood", "log_integrate_grid")["log_integrate_grid"]
    z = hp.grid_points(4.0, 0.05).double()
    log_f = hp.gaussian_log_pdf(
        z, torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.full((2,), math.log(0.09), dtype=torch.float64)) - 500
    value = log_integrate_grid(log_f.reshape(161, 161), 0.05)
    assert abs(value.item() + 500) < 1e-6  # the grid points are float32


def test_bernoulli_mixture_is_normalised_and_em_climbs():
    # D = 4 pixels: the mixture's probabilities of all 16 images sum to 1
    nb = notebook_definitions("04_log_likelihood", "fit_bernoulli_mixture",
                              "bernoulli_mixture_log_px")
    g = hp.make_generator(3)
    x = (torch.rand(200, 4, generator=g) < torch.tensor([0.9, 0.1, 0.5, 0.7])
         ).float()
    log_pi, logits, hist = nb["fit_bernoulli_mixture"](x, 3, n_iter=20,
                                                       generator=g)
    every = torch.tensor([[(i >> b) & 1 for b in range(4)]
                          for i in range(16)], dtype=torch.float32)
    total = nb["bernoulli_mixture_log_px"](every, log_pi, logits).exp().sum()
    assert abs(total.item() - 1.0) < 1e-5
    assert all(b >= a - 1e-6 for a, b in zip(hist, hist[1:]))
    # continuing from the fit on more data starts where it left off
    _, _, more = nb["fit_bernoulli_mixture"](x, 3, n_iter=5,
                                             start=(log_pi, logits))
    assert more[0] >= hist[-1] - 1e-6
    assert all(b >= a - 1e-6 for a, b in zip(more, more[1:]))
