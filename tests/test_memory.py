"""Importing helpers makes glibc keep freed blocks (notebook 01, "Seeding
and memory"): a loop that makes and drops tensors of 63 MB, above the
32 MiB up to which glibc adapts by itself, stops faulting fresh pages in."""

import subprocess
import sys

import pytest

import helpers as hp

LOOP = """
import resource, torch
{setup}
x = torch.rand(20_000, 784)
for _ in range(3):
    (x * 2).exp().sum()                      # two 63 MB temporaries a turn
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    (x * 2).exp().sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setup: str) -> int:
    done = subprocess.run([sys.executable, "-c", LOOP.format(setup=setup)],
                          capture_output=True, text=True, cwd=hp.ROOT,
                          check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_freed_blocks_are_reused():
    plain = page_faults("")
    kept = page_faults("import helpers")
    # twenty 63 MB blocks are 300,000 pages; reusing them needs none
    if plain < 100_000:
        pytest.skip(f"only {plain:,} faults without helpers: this system "
                    "reuses freed blocks already (another allocator?)")
    assert kept < plain / 4, f"{kept} faults with helpers, {plain} without"
