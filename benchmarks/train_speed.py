"""How fast does the series train? A benchmark with ratios, not seconds.

Five things run side by side in one process, one epoch of each in turn, so
that the load of a shared machine falls on all of them alike:

(a) baseline: the loop of pytorch/examples' vae/main.py for this same model
    (TensorDataset + DataLoader with shuffling, sigmoid + binary cross
    entropy, closed-form KL, Adam with default settings, loss.item() every
    step);
(b) the series' loop, helpers.train_epoch (notebook 03): the training set
    resident as one tensor, minibatches indexed from a permutation, the
    Monte Carlo ELBO of notebook 02 differentiated by autograd, fused Adam,
    no copy to the host in a step;
(c) the same loop with the gradient written out by hand (notebook 03's
    exhibit elbo_gradient, taken from the notebook itself);
(d) the bound: the same matrix multiplications as one training epoch
    (forward and backward shapes, into preallocated outputs), with no
    autograd, no elementwise work and no optimiser;
(e) Adam alone: the fused optimiser step of (b), as many times as an epoch
    takes it, on fixed gradients. Adding it to (d) gives the floor of any
    loop that trains this model with Adam.

The three models start from the same weights and train for the same
epochs; their test ELBOs are then estimated the same way (K = 10, the same
noise), so the speed-ups are at equal quality. Run `make bench`;
`--record` also writes the ratios into data/metrics.json for the README's
results table.
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
from export import notebook_definitions


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


def hand_epoch(model, optimizer, x_train, batch_size, generator,
               elbo_gradient) -> float:
    """helpers.train_epoch with the hand-written gradient in place of
    autograd's: the same samples, the same steps."""
    total = torch.zeros((), dtype=torch.float64)
    for idx in hp.minibatch_indices(len(x_train), batch_size, generator):
        total += elbo_gradient(model, x_train[idx], generator) * len(idx)
        optimizer.step()
    return total.item() / len(x_train)


class AdamAlone:
    """The fused Adam step of the series' loop, on a copy with fixed grads."""

    def __init__(self, model: hp.VAE, lr: float):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr,
                                          fused=True)

    def epoch(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--record", action="store_true",
                    help="write the ratios into data/metrics.json")
    args = ap.parse_args(argv)
    if not 1 <= args.epochs <= 1000:
        raise SystemExit(f"error: --epochs must be from 1 to 1,000, got "
                         f"{args.epochs}.")

    config = hp.VAEConfig()
    data = hp.load_mnist(config.n_train, verbose=False)
    elbo_gradient = notebook_definitions("03_training",
                                         "elbo_gradient")["elbo_gradient"]
    torch.manual_seed(config.seed)
    ours = hp.VAE(config.latent_dim, config.hidden_dim, config.init_std)
    theirs = ExamplesVAE(ours)
    hand = copy.deepcopy(ours)
    opt_ours, opt_hand = (torch.optim.Adam(m.parameters(), lr=config.lr,
                                           fused=True) for m in (ours, hand))
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=config.lr)
    loader = DataLoader(TensorDataset(data.x_train),
                        batch_size=config.batch_size, shuffle=True)
    gen, gen_hand = (hp.make_generator(config.seed) for _ in range(2))
    steps = len(loader)
    bound = MatmulBound(config.batch_size, 784, config.hidden_dim,
                        config.latent_dim)
    adam = AdamAlone(ours, config.lr)

    runs = {
        "dataloader": lambda: baseline_epoch(theirs, opt_theirs, loader),
        "series": lambda: hp.train_epoch(ours, opt_ours, data.x_train,
                                         config.batch_size, gen),
        "hand": lambda: hand_epoch(hand, opt_hand, data.x_train,
                                   config.batch_size, gen_hand,
                                   elbo_gradient),
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
                        ("series", ours), ("hand", hand)):
        # the same noise for each model: common random numbers
        quality[name] = hp.evaluate_elbo(model, data.x_test, 10,
                                         hp.make_generator(123)
                                         )[0].mean().item()
    ratios = {"speedup": med["dataloader"] / med["series"],
              "hand_speedup": med["series"] / med["hand"],
              "over_bound": med["series"] / med["matmuls"],
              "adam_floor": (med["matmuls"] + med["adam"]) / med["matmuls"]}
    print("\nmedians: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    epochs = f"{args.epochs} epoch{'s' * (args.epochs != 1)}"
    print(f"test ELBO after {epochs} (K = 10): "
          + ", ".join(f"{k} {v:.2f}" for k, v in quality.items()))
    print(f"speed-up of the series' loop over the DataLoader loop: "
          f"{ratios['speedup']:.2f}x (goal: at least 1.4x)")
    print(f"speed-up of the hand-written gradient over autograd: "
          f"{ratios['hand_speedup']:.2f}x")
    print(f"series' loop / matmul bound: {ratios['over_bound']:.2f}x")
    print(f"(matmuls + Adam alone) / matmul bound: "
          f"{ratios['adam_floor']:.2f}x, the floor of any loop that takes "
          "these Adam steps")
    if args.record:
        hp.update_metrics(
            hp.output_paths(), train_speedup_vs_dataloader=ratios["speedup"],
            train_hand_gradient_speedup=ratios["hand_speedup"],
            train_time_over_matmul_bound=ratios["over_bound"],
            train_adam_floor_over_matmul_bound=ratios["adam_floor"])
        print("recorded in data/metrics.json")
    return {"median_seconds": med, "test_elbo": quality, **ratios}


if __name__ == "__main__":
    main()
