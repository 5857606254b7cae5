"""The perturbed test pass: `make test` runs nbval a second time with this
folder on PYTHONPATH and VAE_PERTURB set to a seed, so that Python runs
this file as it starts, in pytest and in every notebook's kernel.

From then on every torch module (every layer of every model, trained in
a notebook or loaded from a checkpoint) has its parameters multiplied by
1 + 1e-6 eps, eps ~ N(0, 1) from the seed, once, just before it first
runs. The jitter is the same on every machine and larger than any
difference in rounding between two CPUs, so a printed digit that depends
on the order in which a machine adds up floats fails this pass here, not
on a user's machine. Without VAE_PERTURB nothing happens.
"""

import os
import sys


def perturb_on_first_use(seed: int, scale: float = 1e-6):
    """Install the jitter as a global forward pre-hook; its handle."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def jitter(module, args):
        if getattr(module, "_vae_perturbed", False):
            return
        module._vae_perturbed = True
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                eps = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.mul_((1.0 + scale * eps).to(p.dtype))

    return torch.nn.modules.module.register_module_forward_pre_hook(jitter)


_seed = os.environ.get("VAE_PERTURB", "").strip()
if _seed and not _seed.isdigit():
    # one sentence and out: an exception here would be a page of
    # Python's start-up errors
    sys.stderr.write(f"VAE_PERTURB={_seed!r} is not a whole number; set it "
                     "to a seed (e.g. VAE_PERTURB=1) or unset it.\n")
    os._exit(2)
if _seed:
    perturb_on_first_use(int(_seed))
