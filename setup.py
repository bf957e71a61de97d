"""Build sgg_kernels._C: the C++ CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
    SGG_KERNELS_WITH_CUDA=0/1   force the CUDA kernels off / on (on fails clearly if impossible)
    TORCH_CUDA_ARCH_LIST        e.g. "9.0" for H100/H200 (read by torch's CUDAExtension)
    MAX_JOBS                    parallel compile jobs (read by torch's ninja build)
    SGG_KERNELS_DEBUG=1         -O0 -g builds

Install with `pip install --no-build-isolation .` after torch: build isolation would fetch another
torch just to build, and the extension must match the installed one.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "sgg_kernels: torch is not installed. Install torch first (here: pip install torch==2.13.0), "
        "then build with `pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("SGG_KERNELS_WITH_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("SGG_KERNELS_WITH_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None)")
        if CUDA_HOME is None:
            sys.exit("SGG_KERNELS_WITH_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if flag:
        sys.exit(f"SGG_KERNELS_WITH_CUDA must be 0 or 1, got {flag!r}")
    return possible


def extensions():
    with_cuda = _want_cuda()
    debug = os.environ.get("SGG_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = [("Py_LIMITED_API", "0x03090000")]
    cxx = opt + ["-fopenmp", "-std=c++17"]
    kwargs = dict(
        name="sgg_kernels._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("SGG_KERNELS_WITH_CUDA", "1"))
        nvcc = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension(sources=sources, define_macros=macros,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]
    return [CppExtension(sources=sources, define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    packages=find_packages(include=["sgg_kernels", "sgg_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
