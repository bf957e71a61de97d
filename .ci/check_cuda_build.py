"""Check an installed CUDA build of sgg_kernels: the extension loaded, its CUDA kernels built, and
every ``cuda=`` entry of every backend table registered for the CUDA dispatch key.

Run it with the Python of the environment the extension was installed into, from outside the
source checkout (so that the installed package is imported, not the checkout's sources):

    cd /tmp && /path/to/venv/bin/python /path/to/repo/.ci/check_cuda_build.py

Works without a GPU: a CUDA build of torch imports and registers CUDA kernels on a CPU machine.
Exit status 1 on any failure, with one line per problem.
"""
import os
import sys

import torch


def main() -> int:
    os.environ.setdefault("SGG_KERNELS_REQUIRE_EXTENSION", "1")  # a missing _C is an ImportError, not a fallback
    import sgg_kernels
    from sgg_kernels import _backend, info

    problems = []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.dirname(os.path.abspath(sgg_kernels.__file__)) == os.path.join(here, "sgg_kernels"):
        problems.append(f"imported the checkout's sources ({sgg_kernels.__file__}), not the installed package: "
                        "run this from outside the checkout")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build")
    if not _backend.c_has_cuda():
        problems.append("sgg_kernels._C was built without its CUDA kernels (SGG_KERNELS_WITH_CUDA=1 was not honoured?)")
    names = sorted({k.cuda for table in info.FAMILIES.values() for kernels in table.values() for k in kernels if k.cuda})
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sgg_kernels::{n}", "CUDA")]
    problems += [f"sgg_kernels::{n} has no CUDA kernel registered in the dispatcher" for n in missing]
    if not names:
        problems.append("no backend table names a CUDA kernel: the check would check nothing")

    print(info.report())
    print()
    print(f"check_cuda_build: torch {torch.__version__} (CUDA {torch.version.cuda}), {sgg_kernels.__file__}: "
          f"{len(names) - len(missing)} of {len(names)} CUDA kernels registered")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
