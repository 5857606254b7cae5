"""How fast does the series train? A benchmark with ratios, not seconds.

Five things run side by side in one process, one epoch of each in turn, so
that the load of a shared machine falls on all of them alike:

(a) baseline: the loop of pytorch/examples' vae/main.py for this same model
    (TensorDataset + DataLoader with shuffling, sigmoid + binary cross
    entropy, closed-form KL, Adam with default settings, loss.item() every
    step);
(b) the series' loop with autograd: helpers.train_epoch with
    ``(-elbo(...)).backward()`` in place of the hand-written gradient;
(c) the series' loop, helpers.train_epoch: the training set resident as one
    tensor, minibatches indexed from a permutation, the Monte Carlo ELBO of
    notebook 02 with its gradient written by hand (helpers.elbo_gradient),
    fused Adam;
(d) the bound: the same matrix multiplications as one training epoch
    (forward and backward shapes, into preallocated outputs), with no
    autograd, no elementwise work and no optimiser;
(e) Adam alone: the fused optimiser step of (c), as many times as an epoch
    takes it, on fixed gradients. Adding it to (d) gives the floor of any
    loop that trains this model with Adam.

The three models start from the same weights and train for the same
epochs; their test ELBOs are then estimated the same way (K = 10), so the
speed-ups are at equal quality. Run `make bench`; `--record` also writes
the ratios into data/metrics.json for the README's results table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import helpers as hp


class ExamplesVAE(torch.nn.Module):
    """The model of Appendix C written as pytorch/examples writes its VAE."""

    def __init__(self, source: hp.VAE):
        super().__init__()
        dz = source.latent_dim
        self.fc1 = copy.deepcopy(source.enc_hidden)
        self.fc21 = torch.nn.Linear(source.enc_out.in_features, dz)
        self.fc22 = torch.nn.Linear(source.enc_out.in_features, dz)
        with torch.no_grad():  # the same initial weights as the series' model
            for dst, rows in ((self.fc21, slice(0, dz)),
                              (self.fc22, slice(dz, 2 * dz))):
                dst.weight.copy_(source.enc_out.weight[rows])
                dst.bias.copy_(source.enc_out.bias[rows])
        self.fc3 = copy.deepcopy(source.dec_hidden)
        self.fc4 = copy.deepcopy(source.dec_out)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(torch.tanh(self.fc3(z)))), mu, logvar

    def as_series_model(self) -> hp.VAE:
        """The same weights in the series' class, for a common evaluation."""
        model = hp.VAE(self.fc21.out_features, self.fc1.out_features)
        with torch.no_grad():
            model.enc_hidden.load_state_dict(self.fc1.state_dict())
            model.enc_out.weight.copy_(torch.cat([self.fc21.weight,
                                                  self.fc22.weight]))
            model.enc_out.bias.copy_(torch.cat([self.fc21.bias,
                                                self.fc22.bias]))
            model.dec_hidden.load_state_dict(self.fc3.state_dict())
            model.dec_out.load_state_dict(self.fc4.state_dict())
        return model


def baseline_epoch(model, optimizer, loader):
    train_loss = 0.0
    for (data,) in loader:
        optimizer.zero_grad()
        recon, mu, logvar = model(data)
        bce = F.binary_cross_entropy(recon, data, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = bce + kld
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
    return -train_loss / len(loader.dataset)


class MatmulBound:
    """The matrix products of one training step, and nothing else."""

    def __init__(self, m: int, d: int, h: int, dz: int):
        r = torch.randn
        self.ops = []
        shapes = [  # (rows, inner, cols) of each product in a step
            (m, d, h), (m, h, 2 * dz), (m, dz, h), (m, h, d),      # forward
            (d, m, h), (m, d, h),            # decoder output: dW, dh
            (h, m, dz), (m, h, dz),          # decoder hidden: dW, dz
            (2 * dz, m, h), (m, 2 * dz, h),  # encoder output: dW, dh
            (h, m, d),                       # encoder hidden: dW only
        ]
        for rows, inner, cols in shapes:
            self.ops.append((r(rows, inner), r(inner, cols),
                             torch.empty(rows, cols)))

    def epoch(self, steps: int) -> None:
        for _ in range(steps):
            for a, b, out in self.ops:
                torch.mm(a, b, out=out)


def autograd_gradient(model, x, generator):
    """What helpers.elbo_gradient does, done by autograd on helpers.elbo."""
    model.zero_grad(set_to_none=True)
    value = hp.elbo(model, x, 1, generator)
    (-value).backward()
    return value.detach()


class AdamAlone:
    """The fused Adam step of the series' loop, on a copy with fixed grads."""

    def __init__(self, model: hp.VAE, lr: float):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        self.optimizer = hp.make_optimizer(self.model, lr)

    def epoch(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--record", action="store_true",
                    help="write the ratios into data/metrics.json")
    args = ap.parse_args(argv)
    hp._whole("--epochs", args.epochs, 1, 1000)

    config = hp.VAEConfig()
    data = hp.load_mnist(config.n_train, verbose=False)
    torch.manual_seed(config.seed)
    ours = hp.VAE.from_config(config)
    theirs = ExamplesVAE(ours)
    auto = copy.deepcopy(ours)
    opt_ours = hp.make_optimizer(ours, config.lr)
    opt_auto = hp.make_optimizer(auto, config.lr)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=config.lr)
    loader = DataLoader(TensorDataset(data.x_train),
                        batch_size=config.batch_size, shuffle=True)
    gen, gen_auto = (hp.make_generator(config.seed) for _ in range(2))
    steps = len(loader)
    bound = MatmulBound(config.batch_size, 784, config.hidden_dim,
                        config.latent_dim)
    adam = AdamAlone(ours, config.lr)

    runs = {
        "dataloader": lambda: baseline_epoch(theirs, opt_theirs, loader),
        "autograd": lambda: hp.train_epoch(auto, opt_auto, data.x_train,
                                           config.batch_size, gen_auto,
                                           gradient=autograd_gradient),
        "series": lambda: hp.train_epoch(ours, opt_ours, data.x_train,
                                         config.batch_size, gen),
        "matmuls": lambda: bound.epoch(steps),
        "adam": lambda: adam.epoch(steps),
    }
    times = {name: [] for name in runs}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.epochs} epochs of {steps} steps each\n")
    print("seconds per epoch")
    print("epoch" + "".join(f"{name:>12}" for name in runs))
    for epoch in range(1, args.epochs + 1):
        row = []
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            row.append(time.perf_counter() - start)
            times[name].append(row[-1])
        print(f"{epoch:5d}" + "".join(f"{t:12.3f}" for t in row))

    med = {k: statistics.median(v) for k, v in times.items()}
    quality = {}
    for name, model in (("dataloader", theirs.as_series_model()),
                        ("autograd", auto), ("series", ours)):
        model.eval()   # the same noise for each model: common random numbers
        quality[name] = hp.evaluate_bounds(model, data.x_test, 10,
                                           hp.make_generator(123)
                                           )[0].mean().item()
    speedup = med["dataloader"] / med["series"]
    over_bound = med["series"] / med["matmuls"]
    floor = (med["matmuls"] + med["adam"]) / med["matmuls"]
    print("\nmedians: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    epochs = f"{args.epochs} epoch{'s' * (args.epochs != 1)}"
    print(f"test ELBO after {epochs} (K = 10): "
          + ", ".join(f"{k} {v:.2f}" for k, v in quality.items()))
    print(f"speed-up of the series' loop over the DataLoader loop: "
          f"{speedup:.2f}x (goal: at least 1.5x)")
    print(f"speed-up of the hand-written gradient over autograd: "
          f"{med['autograd'] / med['series']:.2f}x")
    print(f"series' loop / matmul bound: {over_bound:.2f}x "
          f"(goal: at most 1.25x)")
    print(f"(matmuls + Adam alone) / matmul bound: {floor:.2f}x, the floor "
          "of any loop that takes these Adam steps")
    if args.record:
        hp.update_metrics(hp.output_paths(), train_speedup_vs_dataloader=speedup,
                          train_time_over_matmul_bound=over_bound,
                          train_adam_floor_over_matmul_bound=floor)
        print("recorded in data/metrics.json")
    return {"median_seconds": med, "test_elbo": quality, "speedup": speedup,
            "over_bound": over_bound, "adam_floor": floor}


if __name__ == "__main__":
    main()
