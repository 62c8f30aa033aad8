"""Build of the rbe_ffn extension: C11 kernels (csrc/*.c) as a static library,
the C++ operator registration, and CUDA kernels when torch has CUDA and nvcc exists.
The package's metadata is in pyproject.toml; this file holds only what needs code.

    pip install --no-build-isolation -e .      (development; uses the torch already installed)
    pip wheel --no-build-isolation --no-deps .  (a wheel for that torch)
"""
import ctypes.util
import glob
import os
import re
import subprocess
import sys

from setuptools import setup
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
C_FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter"]
# -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers, serial without it
# (the extension then shares torch's own libgomp.so.1)
CXX_FLAGS = ["-O3", "-fopenmp"]

c_sources = sorted(glob.glob("csrc/*.c"))
# glibc's vector math library gives the float activations 4-wide double erfc/exp/tanh
# (rbe_act.c binds it through weak symbols, so it is optional)
link_libs = ["rbe_kernels"]
link_args = ["-fopenmp"]
if ctypes.util.find_library("mvec"):  # weak references alone would be dropped by --as-needed
    link_args += ["-Wl,--no-as-needed", "-lmvec", "-Wl,--as-needed"]
ext_sources = ["csrc/rbe_ops.cpp", "csrc/rbe_dct_path.cpp"]
ext_cls = cpp_extension.CppExtension
extra = {"cxx": CXX_FLAGS}


DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # A100, RTX 30xx, L4/RTX 40xx, H100/H200 (+ PTX for newer)


def nvcc_version(cuda_home):
    """'major.minor' of the nvcc under cuda_home, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def want_cuda():
    """Build the CUDA kernels when torch has CUDA and nvcc is found (RBE_FFN_NO_CUDA=1: never).
    A GPU is not needed to build; TORCH_CUDA_ARCH_LIST picks the architectures (else the
    visible GPU's, as torch.utils.cpp_extension does)."""
    if os.environ.get("RBE_FFN_NO_CUDA") == "1" or torch.version.cuda is None:
        return False
    if cpp_extension.CUDA_HOME is None:
        print(f"rbe_ffn: torch {torch.__version__} has CUDA {torch.version.cuda} but no nvcc was found "
              "(set CUDA_HOME): building the CPU operators only", file=sys.stderr)
        return False
    found = nvcc_version(cpp_extension.CUDA_HOME)
    if found is None or found.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(f"rbe_ffn: the nvcc in {cpp_extension.CUDA_HOME} is CUDA {found}, but torch {torch.__version__} "
                 f"was built with CUDA {torch.version.cuda}; the CUDA kernels must be built with a matching "
                 "toolkit. Point CUDA_HOME at CUDA " + torch.version.cuda.split(".")[0] + ".x, or set "
                 "RBE_FFN_NO_CUDA=1 to build the CPU operators only.")
    return True


if want_cuda():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # torch.utils.cpp_extension reads the architecture off the visible GPU and fails without one
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        print(f"rbe_ffn: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCHS}",
              file=sys.stderr)
    ext_sources += sorted(glob.glob("cuda/*.cu")) + sorted(glob.glob("cuda/*.cpp"))
    ext_cls = cpp_extension.CUDAExtension
    extra["nvcc"] = ["-O3"]

setup(
    # obj_deps: setuptools' build_clib compiles only when a dependency is newer than its object (it
    # ignores --force), and without them a changed header alone left stale kernels in an in-place build
    libraries=[("rbe_kernels", {"sources": c_sources, "include_dirs": ["csrc"], "cflags": C_FLAGS,
                                "obj_deps": {"": sorted(glob.glob("csrc/*.h"))}})],
    ext_modules=[
        ext_cls(
            "rbe_ffn._C",
            ext_sources,
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "cuda")],
            extra_compile_args=extra,
            libraries=link_libs,
            extra_link_args=link_args,
            depends=c_sources + glob.glob("csrc/*.h") + glob.glob("cuda/*.h"),  # relink when a kernel changes
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
