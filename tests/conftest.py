"""Test-wide setup: without a GPU, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports ``encoder_kernels`` or ``engine``.
"""
import os

# transformers >= 5.25 replaces layers with "hub kernels" downloaded from the Hugging Face Hub whenever
# HF's `kernels` package is installed: the reference models here must be transformers' own code, and
# nothing may be fetched from a hub.
os.environ["USE_HUB_KERNELS"] = "NO"
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_root(tmp_path_factory):
    """One directory for the tiny checkpoints ``_checkpoints`` builds and caches, for every test module."""
    import _checkpoints

    _checkpoints.set_root(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def ray_instance():
    """One private local Ray head for the whole test run, started on first use (see _ray_local)."""
    from _ray_local import LocalRay

    with LocalRay(num_cpus=2, object_store_mb=96) as address:
        yield address
