"""Builds the mrkd package and its fused operator extension mrkd._C (kernels/ -> torch.ops.mrkd.*).

The CUDA kernel is compiled whenever the CUDA toolkit and a CUDA build of torch are present (CUDAExtension),
else only the CPU kernel (CppExtension). Environment:
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "9.0", H200)
  MRKD_CPU_ONLY=1       skip the CUDA kernel even where it could be built
"""
from __future__ import annotations

import os
from glob import glob
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
KERNELS = "kernels"


def build_cuda_kernel() -> bool:
    """Whether to build the CUDA kernel: a CUDA build of torch and a toolkit, unless MRKD_CPU_ONLY=1."""
    if os.environ.get("MRKD_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def relative_sources(pattern: str) -> list[str]:
    """The kernel sources matching `pattern`, relative to the repository root."""
    return sorted(str(Path(p).relative_to(ROOT)) for p in glob(str(ROOT / KERNELS / pattern)))


def make_extension():
    """The mrkd._C extension: C++ kernels, and the CUDA one where it can be built."""
    sources = relative_sources("*.cpp") + relative_sources("cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if build_cuda_kernel():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return CUDAExtension(
            name="mrkd._C",
            sources=sources + relative_sources("cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        name="mrkd._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    name="mrkd",
    version="0.1.0",
    description="Masked reverse knowledge distillation (MRKD) industrial visual inspection",
    python_requires=">=3.10",
    packages=find_packages(include=["mrkd", "mrkd.*", "client", "client.*"], exclude=["tests", "tests.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "scikit-image>=0.21",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        "tritonclient[grpc]>=2.40",
        "starlette>=0.40",
        "uvicorn>=0.30",
        "prometheus-client>=0.20",
    ],
    package_data={"client.dashboard": ["static/*"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
