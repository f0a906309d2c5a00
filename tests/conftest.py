"""Test-wide setup: without a GPU, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports ``kernels`` or ``engine``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
