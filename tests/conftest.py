"""Test-wide setup: without a GPU, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports ``kernels`` or ``engine``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_root(tmp_path_factory):
    """One directory for the tiny checkpoints ``_checkpoints`` builds and caches, for every test module."""
    import _checkpoints

    _checkpoints.set_root(tmp_path_factory.mktemp("checkpoints"))
