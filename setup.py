"""Builds the multi-scale deformable attention extension `sparse_detr._C` from csrc/.

The CPU kernels are always built, and so is a host harness that runs the CUDA kernels' thread functions on the CPU.
The CUDA kernels are built too when a CUDA toolkit is found and either a GPU is visible or FORCE_CUDA=1 (CI sets it,
so a broken .cu file fails CI even on a machine without a GPU).
"""

import glob
import os
import re
import subprocess
from typing import List

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _want_cuda() -> bool:
    if CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def _cuda_library_dirs() -> List[str]:
    """Where libcudart is, when torch's CUDA_HOME guess does not hold it.

    torch derives CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (here /usr/local/bin/nvcc),
    the guess lands on /usr/local and the link cannot find libcudart. nvcc itself knows its toolkit (TOP=...).
    """

    def has_cudart(d: str) -> bool:
        return bool(glob.glob(os.path.join(d, "libcudart.so*")))

    if any(has_cudart(os.path.join(CUDA_HOME, d)) for d in ("lib64", "lib")):
        return []
    try:
        dry = subprocess.run(
            [os.path.join(CUDA_HOME, "bin", "nvcc"), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return []
    top = re.search(r"^#\$ TOP=(.*)$", dry.stderr + dry.stdout, re.MULTILINE)
    if top is None:
        return []
    root = os.path.realpath(top.group(1).strip())
    return [d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib")) if has_cudart(d)][:1]


def _extension():
    # csrc/cuda/*.cpp is host code of the CUDA kernels (their host harness), built without a toolkit too.
    sources = sorted(
        glob.glob(os.path.join(CSRC, "*.cpp"))
        + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
        + glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))
    )
    # at::parallel_for is an inline `#pragma omp parallel` in torch's headers: without -fopenmp it silently runs on
    # one thread. The extension then links libgomp.so.1, the runtime torch already loaded, so there is one pool.
    extra = {"cxx": ["-O3", "-std=c++20", "-fopenmp"]}
    define_macros = []
    library_dirs = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        library_dirs = _cuda_library_dirs()
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    return ext_cls(
        "sparse_detr._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=define_macros,
        library_dirs=library_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
