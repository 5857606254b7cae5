"""The perturbed test pass (tests/perturb/sitecustomize.py): the jitter it
gives every model, and how it starts in a fresh Python."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

import helpers as hp

FOLDER = Path(__file__).parent / "perturb"
_spec = importlib.util.spec_from_file_location(
    "perturb", FOLDER / "sitecustomize.py")
perturb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perturb)  # VAE_PERTURB is unset here: no hook yet


def jittered(seed, build):
    """The parameters of build() after its first run under the hook."""
    handle = perturb.perturb_on_first_use(seed)
    try:
        torch.manual_seed(0)
        model = build()
        with torch.no_grad():
            model.decode(torch.zeros(1, model.latent_dim))
            model.encode(torch.zeros(1, 5))
            model.decode(torch.zeros(1, model.latent_dim))  # only once
    finally:
        handle.remove()
    return [p.detach().clone() for p in model.parameters()]


def build():
    return hp.VAE(latent_dim=2, hidden_dim=8, n_pixels=5, init_std=0.5)


def test_perturbation_is_one_part_in_a_million_and_the_same_every_time():
    torch.manual_seed(0)
    base = [p.detach().clone() for p in build().parameters()]
    first, again, other = jittered(1, build), jittered(1, build), \
        jittered(2, build)
    for p0, p1, p2, p3 in zip(base, first, again, other):
        assert torch.equal(p1, p2)
        nonzero = p0 != 0
        if not nonzero.any():    # the biases start at 0 and stay there
            continue
        rel = (p1[nonzero] / p0[nonzero] - 1).double()
        if rel.numel() > 20:     # jitter of the stated size, not zero
            assert 0.5e-6 < rel.std() < 2e-6
        assert 0 < rel.abs().max() < 1e-5
        assert not torch.equal(p1[nonzero], p3[nonzero])


def run_python(code, seed):
    env = {**os.environ, "PYTHONPATH": str(FOLDER), "VAE_PERTURB": seed}
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, cwd=FOLDER.parent.parent)


def test_a_python_started_with_the_folder_perturbs_every_model():
    """What the Makefile's perturbed pass sets up, in a fresh process: a
    model changes by about 1e-6 on its first run, exactly as the hook
    with that seed changes it."""
    code = ("import torch, helpers as hp; torch.manual_seed(0); "
            "m = hp.VAE(latent_dim=2, hidden_dim=8, n_pixels=5, "
            "init_std=0.5); m.decode(torch.zeros(1, 2)); "
            "m.encode(torch.zeros(1, 5)); "
            "print(repr([p.tolist() for p in m.parameters()]))")
    done = run_python(code, "1")
    assert done.returncode == 0, done.stderr
    there = [torch.tensor(p) for p in eval(done.stdout)]
    assert all(torch.equal(a, b) for a, b in zip(there, jittered(1, build)))


def test_a_bad_perturbation_seed_is_one_sentence():
    done = run_python("print('ran')", "yes")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("VAE_PERTURB='yes' is not a whole number; set it "
                           "to a seed (e.g. VAE_PERTURB=1) or unset it.\n")
