"""Build of the rbe_ffn extension: C11 kernels (csrc/*.c) as a static library,
the C++ operator registration, and CUDA kernels when torch has CUDA and nvcc exists.

    pip install --no-build-isolation -e .      (uses the torch already installed)
"""
import ctypes.util
import glob
import os

from setuptools import find_packages, setup
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
ext_sources = ["csrc/rbe_ops.cpp"]
ext_cls = cpp_extension.CppExtension
extra = {"cxx": CXX_FLAGS}

with_cuda = cpp_extension.CUDA_HOME is not None and __import__("torch").cuda.is_available() or (
    os.environ.get("RBE_FFN_FORCE_CUDA") == "1")
if with_cuda and glob.glob("cuda/*.cu") and __import__("torch").version.cuda is not None:
    ext_sources += sorted(glob.glob("cuda/*.cu")) + sorted(glob.glob("cuda/*.cpp"))
    ext_cls = cpp_extension.CUDAExtension
    extra["nvcc"] = ["-O3"]

setup(
    name="rbe_ffn",
    version="0.1.0",
    description="Transformer feed-forward blocks stored, trained and run in compressed RBE form",
    package_dir={"": "python"},
    packages=find_packages("python"),
    libraries=[("rbe_kernels", {"sources": c_sources, "include_dirs": ["csrc"], "cflags": C_FLAGS})],
    ext_modules=[
        ext_cls(
            "rbe_ffn._C",
            ext_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            libraries=link_libs,
            extra_link_args=link_args,
            depends=c_sources + glob.glob("csrc/*.h"),  # relink when a kernel changes
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "tqdm", "safetensors"], "hf": ["transformers"]},
)
