"""pytest plugin for ``benchmarks.gpu_check``: keep only the tests that need a GPU.

A test needs a GPU when it lives in a ``test_gpu_only*.py`` file or carries a ``skipif`` mark whose
reason names a GPU or CUDA and whose condition is ``not torch.cuda.is_available()`` (true exactly
where there is no CUDA: skipped on a CPU, run on a GPU). Tests that skip themselves at run time
(``pytest.skip`` inside the body) cannot be told apart here: mark GPU-only tests with ``skipif``.

    python -m pytest -p benchmarks._gpu_tests tests
"""
from __future__ import annotations

import re

import torch

_NAMES_A_GPU = re.compile(r"\b(GPU|CUDA)\b", re.IGNORECASE)


def needs_gpu(item) -> bool:
    if item.path.name.startswith("test_gpu_only"):
        return True
    no_cuda = not torch.cuda.is_available()
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
        if isinstance(condition, bool) and condition == no_cuda and _NAMES_A_GPU.search(mark.kwargs.get("reason", "")):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_gpu(item)]
    dropped = [item for item in items if not needs_gpu(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
