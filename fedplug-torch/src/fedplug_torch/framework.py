"""PyTorch, imported quietly, and the device and threads this process computes with."""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # before torch loads: mute its C++ warnings (NNPACK's probe)

import warnings
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from fedplug.toolkit import cpu_share

__all__ = ["F", "device", "nn", "torch"]


@cache
def device() -> torch.device:
    """CUDA (or ROCm) if present, else Apple's MPS, else the CPU; sizes torch's threads once."""
    torch.set_num_threads(cpu_share())
    with warnings.catch_warnings():  # a broken driver warns while probing
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")
