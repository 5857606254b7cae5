"""The model, the ELBO and IWAE bounds, training, checkpoints, the
quadrature and SVI, and the parameter checks that run before any work.
Code that only one notebook uses is taken from that notebook's cells."""

import functools
import math

import pytest
import torch
from torch import distributions as D

import helpers as hp
from export import notebook_definitions

NB03 = notebook_definitions("03_training", "train_vae", "elbo_gradient")
NB04 = notebook_definitions("04_log_likelihood", "iwae", "log_joint_sum",
                            "log_integrate_grid")
NB07 = notebook_definitions("07_posterior_inference", "svi", "TOP_HALF",
                            "gaussian_elbo_quadrature", "kl_q_posterior_grid")


def save_checkpoint(ckpt, path):
    """As 03 saves one."""
    hp.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return path


def tiny_model(seed=0, pixels=3, init_std=0.8):
    """A 1-D latent VAE small enough to integrate log p(x) exactly."""
    torch.manual_seed(seed)
    return hp.VAE(latent_dim=1, hidden_dim=4, init_std=init_std,
                  n_pixels=pixels).double()


def exact_log_px(model, x):
    """log p(x) for a 1-D latent by a fine grid (the integrand is smooth)."""
    z = torch.linspace(-12, 12, 24_001, dtype=torch.float64)[:, None]
    dz = (z[1] - z[0]).item()
    log_joint = (hp.log_likelihood(model, x[:, None, :], z[None])
                 + hp.log_prior(z)[None])                 # (N, G)
    return torch.logsumexp(log_joint, dim=1) + math.log(dz)


def test_elbo_and_iwae_bound_the_exact_log_likelihood():
    model = tiny_model()
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    log_px = exact_log_px(model, x)
    g = hp.make_generator(0)
    with torch.no_grad():
        w = hp.log_weights(model, x, 20_000, g)            # (K, N)
    elbo = w.mean(0)
    se = w.std(0) / math.sqrt(w.shape[0])
    assert torch.isfinite(w).all()
    assert (elbo + 4 * se < log_px).all()                # a strict bound here
    iwae = NB04["iwae"](model, x, 20_000, g)
    assert (elbo < iwae).all() and (iwae < log_px + 1e-3).all()
    # with this many samples IWAE is close to log p(x)
    assert (log_px - iwae).max() < 0.05


def test_elbo_is_the_closed_form_kl_elbo_in_expectation():
    model = tiny_model(pixels=5)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    g = hp.make_generator(1)
    with torch.no_grad():
        mc = hp.log_weights(model, x, 200_000, g)[:, 0]
        mu, logvar = model.encode(x)
        z = hp.gaussian_sample(mu, logvar, 200_000, g)
        cf = hp.log_likelihood(model, x, z)[:, 0] - \
            hp.kl_to_std_normal(mu, logvar)[0]
    se = math.sqrt(mc.var() / len(mc) + cf.var() / len(cf))
    assert abs(mc.mean() - cf.mean()) < 4 * se


def test_kl_closed_form_matches_torch():
    g = hp.make_generator(2)
    mu = torch.randn(50, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(50, 3, generator=g, dtype=torch.float64)
    ref = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)),
                          D.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(hp.kl_to_std_normal(mu, logvar), ref)


def test_untrained_model_scores_784_log_2():
    model = hp.VAE()                                # N(0, 0.01^2) weights
    x = (torch.rand(200, 784, generator=hp.make_generator(3)) < 0.13).float()
    with torch.no_grad():
        value = hp.elbo(model, x, 10, hp.make_generator(4)).item()
    assert value == pytest.approx(-784 * math.log(2), abs=0.5)


def test_an_epoch_of_the_training_loop_improves_the_elbo():
    data = hp.load_mnist(n_train=500, n_test=1, verbose=False)
    torch.manual_seed(0)
    model = hp.VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def fixed_elbo():  # common random numbers: the same noise each time
        with torch.no_grad():
            return hp.elbo(model, data.x_train, 20, hp.make_generator(5))

    before = fixed_elbo().item()
    during = hp.train_epoch(model, opt, data.x_train, 50, hp.make_generator(6))
    after = fixed_elbo().item()
    assert after > before + 5
    assert before - 1 < during < after + 1   # the mean while it learned


@pytest.mark.parametrize("latent_dim,hidden_dim,batch,init_std", [
    (2, 500, 100, 0.01), (2, 7, 13, 0.5), (3, 11, 1, 1.0), (1, 4, 6, 2.0)])
def test_the_hand_written_gradient_is_autograds(latent_dim, hidden_dim,
                                                batch, init_std):
    """elbo_gradient gives elbo()'s value, sample and gradient (in float64,
    where the two orders of rounding agree to about 1e-12)."""
    torch.manual_seed(latent_dim + hidden_dim)
    model = hp.VAE(latent_dim, hidden_dim, init_std).double()
    with torch.no_grad():    # biases away from zero, so they are tested too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = (torch.rand(batch, 784, generator=hp.make_generator(12))
         < 0.3).double()
    reference = hp.elbo(model, x, 1, hp.make_generator(13))
    (-reference).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():      # stale values must be overwritten
        p.grad.fill_(float("nan"))

    def assert_gradients_match():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9,
                                       atol=1e-12, msg=name)

    value = NB03["elbo_gradient"](model, x, hp.make_generator(13))
    assert not value.requires_grad
    torch.testing.assert_close(value, reference.detach(), rtol=1e-12, atol=0)
    assert_gradients_match()
    model.zero_grad(set_to_none=True)  # and missing ones are created
    NB03["elbo_gradient"](model, x, hp.make_generator(13))
    assert_gradients_match()


def test_five_epochs_on_1000_images_learn_a_lot():
    data = hp.load_mnist(n_train=1000, verbose=False)
    # 50 steps of M = 100 leave the model on the plateau of the mean image
    # (about -206 nats); 250 smaller steps get past it
    config = hp.VAEConfig(epochs=5, n_train=1000, batch_size=20, lr=3e-3)
    ckpt = NB03["train_vae"](config, data, verbose=False, final_samples=5)
    first_test = ckpt["history"]["test_elbo"][0]
    final = ckpt["results"]["test_elbo"]
    # the snapshot before training decodes to p = 0.5 everywhere
    before = ckpt["snapshots"]["means"][0].float()
    assert (before - 0.5).abs().max() < 0.01
    assert first_test > -543 and final > -200
    per_image = ckpt["results"]["test"]
    assert per_image["elbo"].shape == per_image["elbo_se"].shape == (10_000,)
    assert per_image["elbo"].double().mean().item() == pytest.approx(final)
    assert len(ckpt["history"]["train_elbo"]) == 5
    assert ckpt["snapshots"]["epochs"] == [0, 1, 2, 5]


@pytest.fixture
def small_checkpoint():
    data = hp.load_mnist(n_train=200, n_test=200, verbose=False)
    config = hp.VAEConfig(epochs=1, n_train=200, hidden_dim=20)
    return config, NB03["train_vae"](config, data, verbose=False,
                                     final_samples=2)


def test_checkpoint_round_trip(tmp_path, small_checkpoint):
    config, ckpt = small_checkpoint
    out = hp.output_paths(tmp_path)
    path = save_checkpoint(ckpt, out.checkpoints / config.checkpoint_name())
    assert hp.find_checkpoint(config, out) == path
    model, loaded = hp.load_checkpoint(config, out)
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert loaded["history"] == ckpt["history"]
    assert loaded["config"] == vars(config)


def test_a_failed_save_leaves_the_old_checkpoint_intact(
        tmp_path, small_checkpoint, monkeypatch):
    config, ckpt = small_checkpoint
    path = tmp_path / "model.pt"
    save_checkpoint(ckpt, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_mismatched_or_missing_checkpoints_are_refused(tmp_path,
                                                       small_checkpoint):
    config, ckpt = small_checkpoint
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    other = hp.VAEConfig(epochs=1, n_train=200, hidden_dim=30)
    with pytest.raises(hp.ConfigError, match="hidden_dim=20 \\(asked 30\\)"):
        hp.load_checkpoint(other, path=path)
    missing = hp.VAEConfig(epochs=3, n_train=200, hidden_dim=20)
    with pytest.raises(hp.ConfigError, match="No trained weights"):
        hp.load_checkpoint(missing, hp.output_paths(tmp_path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(hp.ConfigError, match="cannot be read"):
        hp.load_checkpoint(config, path=path)


@pytest.mark.parametrize("kwargs,name", [
    (dict(latent_dim=0), "LATENT_DIM"), (dict(hidden_dim=-1), "HIDDEN_DIM"),
    (dict(epochs=-5), "EPOCHS"), (dict(batch_size=20_000), "BATCH_SIZE"),
    (dict(lr=0), "LR"), (dict(lr=float("nan")), "LR"),
    (dict(latent_dim=2.0), "LATENT_DIM"), (dict(seed=True), "SEED")])
def test_bad_parameters_are_refused_in_one_sentence(kwargs, name):
    with pytest.raises(hp.ConfigError) as err:
        hp.VAEConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(name) and "\n" not in message
    # the batch runner's check sees the same problem by parameter name
    params = {field.upper(): value
              for field, value in {**vars(hp.VAEConfig()), **kwargs}.items()}
    with pytest.raises(hp.ConfigError, match=name):
        hp.check_parameters(params)


def test_the_committed_checkpoint_matches_the_model_code():
    """Fails when the model code or the default configuration drifts away
    from the weights in data/: the file must load into today's VAE and
    reproduce the test ELBO it recorded after its last epoch."""
    config = hp.VAEConfig()
    path = hp.DATA_DIR / config.checkpoint_name()
    assert path.is_file(), f"{path.name} is missing from data/"
    model, ckpt = hp.load_checkpoint(config, path=path)
    data = hp.load_mnist(verbose=False)
    with torch.no_grad():
        value = hp.elbo(model, data.x_test, 4, hp.make_generator(7)).item()
    recorded = ckpt["history"]["test_elbo"][-1]
    assert abs(value - recorded) < 0.5
    stored, _, source = hp.stored_elbo(ckpt, "test", model, data.x_test,
                                       100, hp.make_generator(0))
    assert source == "stored"
    assert stored.mean().item() == pytest.approx(ckpt["results"]["test_elbo"])


def test_top_half_and_masked_likelihood():
    top_half = NB07["TOP_HALF"]
    x = torch.arange(784.0)
    assert torch.equal(x[top_half], x.reshape(28, 28)[:14].flatten())
    model = hp.VAE(init_std=0.3)
    xb = (torch.rand(3, 784, generator=hp.make_generator(8)) < 0.2).float()
    z = torch.randn(5, 3, 2, generator=hp.make_generator(9))
    everything = torch.ones(784, dtype=torch.bool)
    with torch.no_grad():
        full = hp.log_likelihood(model, xb, z)
        torch.testing.assert_close(
            hp.log_likelihood(model, xb, z, everything), full)
        top = hp.log_likelihood(model, xb, z, top_half)
        bottom = hp.log_likelihood(model, xb, z, ~top_half)
    torch.testing.assert_close(top + bottom, full)   # pixels independent


def conjugate_problem(dtype=torch.float32):
    """y_i ~ N(z_i, s^2 I), z_i ~ N(0, I): p(z|y) = N(y / (1 + s^2),
    s^2 / (1 + s^2)), which the Gaussian family contains exactly."""
    s2 = 0.25
    y = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-3.0, 1.5]], dtype=dtype)
    noise = torch.full((2,), math.log(s2), dtype=dtype)

    def log_joint(z):
        return hp.gaussian_log_pdf(y, z, noise) + hp.log_prior(z)
    return s2, y, log_joint


@pytest.mark.parametrize("antithetic", [False, True])
def test_svi_recovers_a_conjugate_gaussian_posterior(antithetic):
    s2, y, log_joint = conjugate_problem()
    g = hp.make_generator(10)
    mu, logvar, hist, _ = NB07["svi"](log_joint, torch.zeros(3, 2),
                                      torch.zeros(3, 2), n_steps=1500,
                                      n_samples=32, lr=0.03, generator=g,
                                      antithetic=antithetic)
    # a second stage with a smaller step lets Adam's noise settle
    mu, logvar, _, _ = NB07["svi"](log_joint, mu, logvar, n_steps=1000,
                                   n_samples=32, lr=0.003, generator=g,
                                   antithetic=antithetic)
    torch.testing.assert_close(mu, y / (1 + s2), atol=0.02, rtol=0)
    torch.testing.assert_close(logvar.exp(),
                               torch.full((3, 2), s2 / (1 + s2)),
                               atol=0.02, rtol=0)
    assert hist[-1] > hist[0]


def test_antithetic_svi_draws_mirrored_pairs():
    mu0, logvar0 = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.3, -0.5]])
    seen = []

    def log_joint(z):
        seen.append(z.detach().clone())
        return hp.log_prior(z)

    NB07["svi"](log_joint, mu0, logvar0, n_steps=1, n_samples=6,
           generator=hp.make_generator(0), antithetic=True)
    z = seen[0]                                      # (6, 1, 2)
    torch.testing.assert_close(z[:3] + z[3:], 2 * mu0.expand(3, 1, 2))
    assert (z[:3] != z[3:]).all()
    with pytest.raises(hp.ConfigError, match="even number"):
        NB07["svi"](log_joint, mu0, logvar0, n_steps=1, n_samples=5,
               antithetic=True)


def test_quadrature_elbo_is_exact_for_a_quadratic_log_joint():
    # in the conjugate problem the log joint is quadratic in z, so the
    # Gauss-Hermite rules of both orders are exact: ELBO = log p(y) - KL
    s2, y, log_joint = conjugate_problem(torch.float64)
    mu = torch.tensor([[0.1, -0.2], [1.0, 1.0], [-2.0, 0.5]],
                      dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.0], [-2.0, -1.5], [0.5, -3.0]],
                          dtype=torch.float64)
    elbo, error = NB07["gaussian_elbo_quadrature"](log_joint, mu, logvar)
    log_py = hp.gaussian_log_pdf(
        y, torch.zeros_like(y), torch.full_like(y, math.log(1 + s2)))
    post_var = s2 / (1 + s2)
    q = D.Normal(mu, (0.5 * logvar).exp())
    post = D.Normal(y / (1 + s2), math.sqrt(post_var))
    kl = D.kl_divergence(q, post).sum(-1)
    torch.testing.assert_close(elbo, log_py - kl, atol=1e-9, rtol=0)
    assert error.max() < 1e-9


def test_quadrature_elbo_agrees_with_monte_carlo_for_a_vae():
    """The committed model's encoder Gaussians, as in 07: the rule has
    converged, and it agrees with a 20,000-sample estimate."""
    config = hp.VAEConfig()
    model, _ = hp.load_checkpoint(config, path=hp.DATA_DIR
                                  / config.checkpoint_name())
    x = hp.load_mnist(n_train=1, n_test=8, verbose=False).x_test
    with torch.no_grad():
        mu, logvar = model.encode(x)
    log_joint = functools.partial(hp.log_joint, model, x)
    elbo, error = NB07["gaussian_elbo_quadrature"](log_joint, mu, logvar)
    with torch.no_grad():
        z = hp.gaussian_sample(mu, logvar, 20_000, hp.make_generator(12))
        w = (log_joint(z) - hp.gaussian_log_pdf(z, mu, logvar)).double()
    se = w.std(0) / math.sqrt(len(w))
    assert error.max() < 1e-4
    assert ((elbo - w.mean(0)).abs() < 4 * se).all()


def test_the_plot_window_holds_the_posterior_mass():
    """plot_posterior's window (the tiles within 12 nats of the coarse
    peak) holds all but 1e-4 of p(z|x) on the whole fine grid, for the
    narrowest trained posteriors, the one spread widest and two top
    halves."""
    config = hp.VAEConfig()
    model, _ = hp.load_checkpoint(config)
    x = hp.load_mnist(n_train=1, n_test=500, verbose=False).x_test
    top_half = NB07["TOP_HALF"]
    with torch.no_grad():
        _, _, cov = hp.log_px_quadrature(model, x, moments=True)
    sd = torch.linalg.eigvalsh(cov)[:, 0].sqrt()
    cases = [(int(i), None) for i in sd.argsort()[:2]]
    cases += [(int(torch.linalg.det(cov).argmax()), None), (0, top_half),
              (7, top_half)]
    for i, mask in cases:
        plan = hp.plan_grid(model, x[i][None], mask=mask, drop=12.0)
        low, high = hp.tile_box(plan, plan.tiles[0])
        points = hp.grid_points(plan.lim, plan.spacing)
        with torch.no_grad():
            w = torch.softmax(hp.log_joint(model, x[i], points, mask)
                              .double(), 0)
        inside = ((points >= low) & (points <= high)).all(1)
        assert w[~inside].sum() < 1e-4, (i, mask is None)
        assert (high - low).max() < 2 * plan.lim   # and is not the grid


def test_kl_on_the_grid_equals_log_px_minus_elbo():
    data = hp.load_mnist(n_train=1, n_test=1, verbose=False)
    torch.manual_seed(1)
    model = hp.VAE(init_std=0.3)
    x = data.x_test[0]
    log_px, mean, cov = hp.log_px_quadrature(model, x[None], moments=True)
    # a Gaussian near the posterior, so that the Monte Carlo check is sharp
    mu = mean[0].float() + 0.1
    logvar = torch.log(cov[0].diagonal()).float()
    kl = NB07["kl_q_posterior_grid"](model, x, mu, logvar, log_px[0].item())
    with torch.no_grad():
        z = hp.gaussian_sample(mu, logvar, 200_000, hp.make_generator(11))
        w = hp.log_joint(model, x, z) - hp.gaussian_log_pdf(z, mu, logvar)
    w = w.double()
    gap = log_px[0].item() - w.mean().item()
    se = w.std().item() / math.sqrt(len(w))
    assert kl > 0
    assert abs(gap - kl) < 4 * se + 1e-3


def test_the_log_likelihood_is_linear_in_the_image():
    """log p(x|z) = x . l(z) + log p(0|z): the identity the grid rests on."""
    torch.manual_seed(3)
    model = hp.VAE(init_std=0.5).double()
    x = (torch.rand(6, 784, generator=hp.make_generator(4)) < 0.3).double()
    z = torch.randn(9, 2, generator=hp.make_generator(5), dtype=torch.float64)
    with torch.no_grad():
        logits = model.decode(z)                               # (9, 784)
        direct = hp.log_likelihood(model, x[:, None], z[None])  # (6, 9)
        linear = x @ logits.T + hp.log_p_x_given_zero(logits)
    torch.testing.assert_close(direct, linear, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("lim,spacing", [(4.0, 0.3), (4.0, -0.1), (0, 0.1)])
def test_a_grid_that_cannot_be_laid_out_is_refused(lim, spacing):
    with pytest.raises(hp.ConfigError, match="divides"):
        hp.grid_axis(lim, spacing)


def test_fast_quadrature_equals_the_plain_sum_with_moments():
    torch.manual_seed(2)
    model = hp.VAE(init_std=0.3)
    data = hp.load_mnist(n_train=1, n_test=40, verbose=False)
    x = data.x_test
    plan = hp.plan_grid(model, x, 0.1, 6.0)
    log_px, mean, cov = hp.integrate_posteriors(model, x, plan,
                                                moments=True)
    points = hp.grid_points(plan.lim, 0.1)
    with torch.no_grad():
        lj = (hp.log_likelihood(model, x[:, None], points)
              + hp.log_prior(points)).double()                 # (N, G)
    dense = torch.logsumexp(lj, 1) + 2 * math.log(0.1)
    torch.testing.assert_close(log_px, dense, atol=1e-4, rtol=1e-6)
    w = torch.softmax(lj, 1)
    m = w @ points.double()
    d = points.double()[None] - m[:, None]
    c = torch.einsum("ng,nga,ngb->nab", w, d, d)
    torch.testing.assert_close(mean, m, atol=1e-5, rtol=0)
    torch.testing.assert_close(cov, c, atol=1e-5, rtol=1e-4)
    assert plan.tiles.double().mean() < 0.5     # it did skip most points


class FarPosterior(torch.nn.Module):
    """Every pixel on with log-odds z1 - 8: with all pixels on, the
    posterior sits near z1 = 12, far outside [-7, 7]^2."""
    latent_dim = 2

    def decode(self, z):
        return (z[..., :1] - 8.0).expand(*z.shape[:-1], 784)


def test_the_grid_grows_until_no_posterior_reaches_its_edge():
    x = torch.ones(1, 784)
    plan = hp.plan_grid(FarPosterior(), x, 0.05, 7.0)
    assert plan.lim > 12 and plan.edge_share.max() < math.log(1e-9)
    log_px = hp.integrate_posteriors(FarPosterior(), x, plan)
    # independent: z2 integrates out of N(0, 1) exactly; z1 in float64
    z1 = torch.linspace(-5, 30, 350_001, dtype=torch.float64)
    lf = 784 * torch.nn.functional.logsigmoid(z1 - 8) - z1 ** 2 / 2
    exact = (torch.logsumexp(lf, 0) + math.log(z1[1] - z1[0])
             - 0.5 * math.log(2 * math.pi))
    assert abs(log_px.item() - exact.item()) < 1e-3


def test_posterior_tables_hold_each_images_log_joint():
    # every image of a chunk is tabled at the points of its chunk, with
    # the value hp.log_joint gives there; summed, they are log p(x)
    data = hp.load_mnist(n_train=1, n_test=40, verbose=False)
    model = hp.VAE()
    torch.manual_seed(3)
    model.dec_out.weight.data.normal_(0, 0.3)
    plan = hp.plan_grid(model, data.x_test, 0.1, 5.0)
    log_px = hp.integrate_posteriors(model, data.x_test, plan)
    seen = torch.zeros(40, dtype=torch.bool)
    for idx, z, lj in hp.posterior_tables(model, data.x_test, plan, chunk=8):
        seen[idx] = True
        on = torch.isfinite(lj[0])
        direct = hp.log_joint(model, data.x_test[idx][:, None], z[on][None])
        assert torch.allclose(lj[:, on], direct, atol=1e-3)
        total = hp.logsumexp(lj, dim=1).double() + 2 * math.log(0.1)
        assert torch.allclose(total, log_px[idx], atol=1e-6)
    assert seen.all()
