"""``python -m sgg_kernels.info``: versions, the backends each op has per device, and why not.

Example output line::

    cosine_assign          cpu: cpu*  reference        cuda: triton*  reference   (* = default)
"""
from __future__ import annotations

import platform
import sys

import torch

from . import _backend
from .ops import cluster, masks, pairs, prototypes

FAMILIES = {"cluster": cluster.KERNELS, "pairs": pairs.KERNELS, "masks": masks.KERNELS,
            "prototypes": prototypes.KERNELS}
DEVICES = ("cpu", "cuda")


def _versions() -> list:
    triton_version = getattr(_backend.triton, "__version__", None) if _backend.triton is not None else None
    import sgg_kernels

    lines = [
        f"sgg_kernels {sgg_kernels.__version__}  ({sgg_kernels.__file__})",
        f"python      {platform.python_version()}  ({sys.executable})",
        f"torch       {torch.__version__}  (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"triton      {triton_version or 'not available: ' + str(_backend.TRITON_ERROR)}",
        "extension   " + ("sgg_kernels._C loaded, CUDA kernels: " + ("built" if _backend.c_has_cuda() else "not built")
                           if _backend._C is not None else f"NOT loaded: {_backend.C_ERROR}"),
        "GPU         " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"),
        f"TRITON_INTERPRET={'1' if _backend.triton_interpret() else '0'}  "
        f"{_backend.ENV_VAR}={_backend._forced() or '(unset: automatic)'}  "
        f"index checks {'on' if _backend.checks_enabled() else 'off'}",
    ]
    return lines


def report() -> str:
    """The whole report as a string."""
    lines = _versions()
    lines.append("")
    lines.append("backends per op and device (* = chosen by default; a forward and its backward share a row)")
    reasons = {}
    for family, table in FAMILIES.items():
        lines.append(f"[{family}]")
        for op, kernels in table.items():
            row = f"  {op:<22}"
            for device in DEVICES:
                have = []
                for backend in _backend.BACKENDS:
                    why = [k.why_not(backend, device) for k in kernels]
                    missing = [w for w in why if w is not None]
                    if not missing:
                        have.append(backend + ("*" if kernels[0].default(device) == backend else ""))
                    else:  # structural gaps ("no Triton kernel for this op") are shown by absence
                        reasons.setdefault((device, backend), set()).update(m for m in missing if not m.startswith("no "))
                row += f"  {device}: {' '.join(have):<22}"
            lines.append(row)
    reasons = {key: why for key, why in reasons.items() if why}
    if not torch.cuda.is_available():
        lines.append("  (no CUDA device is visible: the cuda column says what this build would run on one)")
    if reasons:
        lines.append("")
        lines.append("why a backend is unavailable")
        for (device, backend), why in sorted(reasons.items()):
            for w in sorted(why):
                lines.append(f"  {backend:<7} on {device:<5}: {w}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
