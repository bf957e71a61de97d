"""Argument helpers shared by the example scripts in python/ (run as ``python python/<script>.py``,
which puts this folder on sys.path).

    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()
    device = parse_device(parser, args.device)

A ``--device`` this torch cannot use ends the script with one argparse error line (exit code 2)
instead of torch's traceback ("Torch not compiled with CUDA enabled").
"""
from __future__ import annotations

import argparse

import torch

__all__ = ["default_device", "parse_device", "cuda_unavailable_reason"]


def default_device() -> str:
    """``"cuda"`` when this torch sees a CUDA device, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_unavailable_reason() -> str:
    """Why this torch cannot run on CUDA, in words: its version and whether it was built with CUDA."""
    if torch.version.cuda is None:
        build = "a CPU-only build, not compiled with CUDA"
    else:
        build = f"built with CUDA {torch.version.cuda}, but no device is visible (driver, CUDA_VISIBLE_DEVICES?)"
    return f"no CUDA device is visible to this torch ({torch.__version__}, {build})"


def parse_device(parser: argparse.ArgumentParser, text: str, option: str = "--device") -> torch.device:
    """``text`` as a ``torch.device`` this process can use; otherwise ``parser.error`` (exit code 2)
    with one line saying why and what to pass instead."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        parser.error(f"{option} {text!r} is not a device torch knows ({err}); use {option} cpu or {option} cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"{option} {text}: {cuda_unavailable_reason()}; use {option} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            parser.error(f"{option} {text}: this torch sees {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0..cuda:{count - 1}); use one of them or {option} cpu")
    return device
