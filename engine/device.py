"""Device strings, checked once with a message that names the argument and what this machine has."""
from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(value: str | torch.device, name: str = "device") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device`` of those) as a ``torch.device``.

    Raises ValueError naming ``name`` for anything else (``gpu``, ``cpu:0``), and for CUDA on a
    machine without it: ``CUDA was requested but is not available (...)``.
    """
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    match = _DEVICE.match(value.strip())
    if match is None or (match[1] == "cpu" and match[2] is not None):
        raise ValueError(f"{name}={value!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if match[1] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise ValueError(f"{name}={value!r}: CUDA was requested but is not available "
                         f"(torch {torch.__version__} built with {built}; no usable GPU found)")
    index = int(match[2]) if match[2] is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{name}={value!r}: CUDA was requested but there is no GPU {index} ({count} visible)")
    return torch.device("cuda", index)
