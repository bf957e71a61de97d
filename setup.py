"""Build sgg_kernels._C: the C++ CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
    SGG_KERNELS_WITH_CUDA=0/1   force the CUDA kernels off / on (on fails clearly if impossible)
    TORCH_CUDA_ARCH_LIST        GPU architectures, e.g. "9.0" (H100/H200) or "8.0;8.6;8.9;9.0+PTX"
                                (read by torch's CUDAExtension; default: the GPUs visible at build time)
    CUDA_HOME / CUDA_PATH       the CUDA toolkit; by default the toolkit of the `nvcc` on PATH
    MAX_JOBS                    parallel compile jobs (read by torch's ninja build)
    SGG_KERNELS_DEBUG=1         -O0 -g builds

Install with `pip install --no-build-isolation .` after torch: build isolation would fetch another
torch just to build, and the extension must match the installed one.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _torch_outside_isolation() -> bool:
    """Whether this interpreter imports torch once pip's build-isolation paths are removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


try:
    import torch
except ImportError:
    if _torch_outside_isolation():
        sys.exit(
            "sgg_kernels: torch is installed, but this build runs in an isolated environment that cannot see it "
            "(pip's default build isolation). Build against the installed torch with "
            "`pip install --no-build-isolation .` (or `-e .`)."
        )
    sys.exit(
        "sgg_kernels: torch is not installed. Install torch first (CPU only: "
        "`pip install torch --index-url https://download.pytorch.org/whl/cpu`; CUDA: `pip install torch`; "
        "versions: see README.md), then build with `pip install --no-build-isolation .`"
    )


# ---------------------------------------------------------------------------------------------
# The CUDA toolkit. torch guesses CUDA_HOME as two folders above the `nvcc` on PATH; where that
# nvcc is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc running
# /usr/local/cuda-13.0/bin/nvcc) the guess holds no libcudart and the link fails with
# `cannot find -lcudart`. nvcc itself knows where its toolkit is: `nvcc -dryrun` prints `#$ TOP=`.
# ---------------------------------------------------------------------------------------------
def _has_cudart(root: str) -> bool:
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib/x64/cudart.lib")
    return any(glob.glob(os.path.join(root, p)) for p in patterns)


def _nvcc_toolkit(nvcc: str):
    """The toolkit root that `nvcc` reports on its `#$ TOP=` line, or None."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home():
    """(CUDA toolkit root or None, how it was found). CUDA_HOME / CUDA_PATH win when set."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return (("/usr/local/cuda", "/usr/local/cuda") if os.path.exists("/usr/local/cuda/bin/nvcc") else (None, "no nvcc on PATH"))
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_cudart(guess):
        return guess, f"the toolkit of {nvcc}"
    top = _nvcc_toolkit(nvcc)
    if top and _has_cudart(top):
        return top, f"`{nvcc} -dryrun` (TOP=)"
    return guess, f"two folders above {nvcc} (no libcudart found there: the link may fail; set CUDA_HOME)"


CUDA_HOME_FOUND, CUDA_HOME_HOW = find_cuda_home() if torch.version.cuda is not None else (None, "CPU torch")
if CUDA_HOME_FOUND is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME_FOUND  # before torch.utils.cpp_extension reads it

from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if CUDA_HOME_FOUND is not None:
    cpp_extension.CUDA_HOME = CUDA_HOME_FOUND  # in case torch.utils.cpp_extension was imported earlier

# One limited-API level for the sources and the wheel tag: torch's BuildExtension defines
# -DPy_LIMITED_API=<its min_supported_cpython> for py_limited_api extensions (0x030A0000, Python 3.10,
# in torch 2.11-2.15); define nothing ourselves where it does, and tag the wheel to match.
TORCH_LIMITED_API = getattr(cpp_extension, "min_supported_cpython", None)
LIMITED_API = TORCH_LIMITED_API or "0x030A0000"
WHEEL_TAG = "cp3{}".format(int(LIMITED_API[4:6], 16))


# The architectures built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset.
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _want_cuda() -> bool:
    flag = os.environ.get("SGG_KERNELS_WITH_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME_FOUND is not None
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("SGG_KERNELS_WITH_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None): "
                     "install a CUDA build of torch (README.md, 'Getting torch')")
        if CUDA_HOME_FOUND is None:
            sys.exit(f"SGG_KERNELS_WITH_CUDA=1 but no CUDA toolkit was found ({CUDA_HOME_HOW}): put nvcc on PATH or set CUDA_HOME")
        return True
    if flag:
        sys.exit(f"SGG_KERNELS_WITH_CUDA must be 0 or 1, got {flag!r}")
    return possible


def extensions():
    with_cuda = _want_cuda()
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() and not torch.cuda.is_available():
        # torch would build for the visible GPUs; with none it fails deep in cpp_extension
        # (IndexError in _get_cuda_arch_flags). Build for what the kernels target instead.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        print(f"sgg_kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCHS} "
              "(A100, H100/H200, PTX for newer); set TORCH_CUDA_ARCH_LIST to choose")
    if with_cuda:
        print(f"sgg_kernels: building the CUDA kernels with the toolkit at {CUDA_HOME_FOUND} (from {CUDA_HOME_HOW}), "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset: the visible GPUs)')}")
    debug = os.environ.get("SGG_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = [] if TORCH_LIMITED_API else [("Py_LIMITED_API", LIMITED_API)]
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 up to torch 2.12,
    # C++20 from 2.13; 2.15's headers refuse C++17). The sources build as either (CI: 2.11 and 2.13).
    cxx = opt + ["-fopenmp"]
    kwargs = dict(
        name="sgg_kernels._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("SGG_KERNELS_WITH_CUDA", "1"))
        # -warn-spills: ptxas names every kernel that spills registers (CI fails on one)
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills,-warn-lmem-usage"]
        return [CUDAExtension(sources=sources, define_macros=macros,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]
    return [CppExtension(sources=sources, define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    packages=find_packages(include=["sgg_kernels", "sgg_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": WHEEL_TAG}},
)
