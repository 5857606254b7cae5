"""The training-speed benchmark runs, and its loops train alike: the series'
autograd loop and the same loop with notebook 03's hand-written gradient
draw the same samples and take the same steps, so after an epoch they
score the same test ELBO to rounding."""

import importlib.util

import helpers as hp


def load_benchmark():
    path = hp.ROOT / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_epoch_of_the_benchmark(capsys):
    result = load_benchmark().main(["--epochs", "1"])
    out = capsys.readouterr().out
    assert "speed-up of the series' loop over the DataLoader loop" in out
    assert set(result["median_seconds"]) == {
        "dataloader", "series", "hand", "matmuls", "adam"}
    elbo = result["test_elbo"]
    assert abs(elbo["series"] - elbo["hand"]) < 0.05
    # one epoch lifts every loop far above the untrained -543 nats
    assert all(-260 < v < -150 for v in elbo.values())
