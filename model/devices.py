"""The one check of a requested torch device, shared by the Predictor, novel views and the commands
(torch is imported on use, so command modules can import this while ``ponder --help`` stays quick)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def parse_device(name: "str | torch.device") -> "torch.device":
    """``name`` as a torch.device, whether or not this host has it (configs are checked on any host); a
    one-line ValueError instead of torch's RuntimeError for a name torch does not know (``tpu``)."""
    import torch

    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(name)!r}; use cpu or cuda") from None


def torch_device(name: "str | torch.device") -> "torch.device":
    """``name`` as a torch.device; a clear ValueError for CUDA on a host without a CUDA GPU (rather than a
    deep torch error after the checkpoint has loaded)."""
    import torch

    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return device


def use_torch_threads(count: int) -> None:
    """Run this thread's torch ops on ``count`` threads. torch's OpenMP and MKL thread counts are per calling
    thread, and on a thread's first use torch applies whatever count any thread set last, so that first use
    happens here, before our count (otherwise it could later overwrite it)."""
    import torch

    torch.get_num_threads()  # torch's first-use initialisation of this thread
    torch.set_num_threads(count)
