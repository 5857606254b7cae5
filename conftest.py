"""Test-wide settings, loaded before any test or notebook kernel starts.

Notebook runs under nbval write their figures and metrics into a scratch
folder (VAE_OUTPUT_DIR) so the test suite never rewrites committed files,
and print plain progress lines (VAE_BATCH) instead of progress bars.
"""

import os
import tempfile

os.environ.setdefault("VAE_OUTPUT_DIR", tempfile.mkdtemp(prefix="vae-test-"))
os.environ.setdefault("VAE_BATCH", "1")
