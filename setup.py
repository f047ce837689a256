"""Installs svq_fast and, when a C++ compiler and torch are present, the native extension svq_fast._C.

The extension is optional: `SVQ_FAST_NO_EXT=1 pip install --no-build-isolation -e .` installs the pure
Python package, and every op falls back to its Triton kernel (GPU) or its torch reference.
CPU sources are csrc/*.cpp (ATen + OpenMP); CUDA sources csrc/*.cu are added when torch has CUDA and
CUDA_HOME points at a toolkit.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    if os.environ.get("SVQ_FAST_NO_EXT", "0") == "1":
        print("svq_fast: SVQ_FAST_NO_EXT=1, building without the native extension")
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("svq_fast: no C++ compiler found, building without the native extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("svq_fast: torch is not importable at build time (use --no-build-isolation); no native extension")
        return [], {}

    # C++20: torch >= 2.10 headers require it; -g0: no debug info, which halves the build (41 -> 21 s on 2 vCPUs)
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cu_sources) and os.environ.get("SVQ_FAST_CUDA", "auto") != "0" and _cuda_toolkit()
    if use_cuda:
        ext = CUDAExtension(
            "svq_fast._C",
            cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DSVQ_WITH_CUDA"], "nvcc": ["-O3", "-DSVQ_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("svq_fast._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _cuda_toolkit():
    home = os.environ.get("CUDA_HOME")
    return bool(home) and os.path.exists(os.path.join(home, "lib64"))


ext_modules, cmdclass = native_extensions()

setup(
    name="svq_fast",
    version="0.1.0",
    description="Fast training stack for semantic image synthesis with semantically coupled VQ models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["svq_fast", "svq_fast.*"]),
    package_data={"svq_fast": ["data/labels/*.csv", "eval/assets/*/*", "app/static/*"]},
    # torch is left open on purpose: GPU users keep the torch they have. The Makefile pins the release
    # that installs from this machine's disk before installing the package.
    install_requires=[
        "torch>=2.3",
        "numpy",
        "pillow",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "accelerate>=0.30",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "scipy",
            "ninja",
            "lpips",
            "pytorch-fid>=0.3",
            "torchmetrics>=1.4",
            "scikit-image",
            "selenium>=4.15",  # drives Debian's chromium in tests/app/test_app_browser.py
        ],
        "eval": ["lpips", "pytorch-fid>=0.3", "torchmetrics>=1.4", "scipy"],
        "bench": ["vector-quantize-pytorch"],
        "gpu": ["xformers"],
        # the synthesis page (recipes/app.py, svq_fast/app): a small ASGI app and its server
        "app": ["starlette>=0.37", "uvicorn>=0.29"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
