"""Builds clfast._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc is
found. Environment: CLFAST_SKIP_CUDA=1 / CLFAST_FORCE_CUDA=1 override the CUDA choice, CLFAST_NATIVE=1
adds -march=native, CLFAST_EXCLUDE_OPS=op1,op2 leaves those csrc/ folders out, MAX_JOBS bounds ninja's
parallelism."""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_home():
    """CUDA_HOME from the nvcc on PATH (torch's own guess is wrong on machines without a driver)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _want_cuda(torch):
    if os.environ.get("CLFAST_SKIP_CUDA") == "1":
        return False, "CLFAST_SKIP_CUDA=1"
    home = _nvcc_home()
    if os.environ.get("CLFAST_FORCE_CUDA") == "1":
        return True, "CLFAST_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    if home is None:
        return False, "nvcc not found"
    cu = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    if not cu:
        return False, "no CUDA sources in csrc/"
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {home}"


def _nvidia_wheel_includes():
    """Include folders of the nvidia-* wheels (cuBLAS/cuSPARSE headers ship there, not in the toolkit)."""
    out = []
    for p in sys.path:
        out += glob.glob(os.path.join(p, "nvidia", "*", "include"))
        out += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
    return sorted(set(d for d in out if os.path.isdir(d)))


def _extensions():
    import torch
    from torch.utils import cpp_extension

    # CLFAST_EXCLUDE_OPS=a,b leaves csrc/a and csrc/b out (faster builds while working on one op).
    skip = {s for s in os.environ.get("CLFAST_EXCLUDE_OPS", "").split(",") if s}

    def sources(ext):
        found = glob.glob(os.path.join("csrc", "**", "*" + ext), recursive=True)
        return sorted(f for f in found if os.path.normpath(f).split(os.sep)[1] not in skip)

    cpp, cu = sources(".cpp"), sources(".cu")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]
    if os.environ.get("CLFAST_NATIVE") == "1":
        cxx.append("-march=native")
    use_cuda, why = _want_cuda(torch)
    define = [("CLFAST_BUILD_CUDA", "1" if use_cuda else "0")]
    # csrc/bindings.cpp registers the kernels of the op folders built here (CLFAST_WITH_<OP>=1) only.
    for op in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if os.path.isdir(os.path.join(ROOT, "csrc", op)) and op != "common":
            define.append((f"CLFAST_WITH_{op.upper()}", "0" if op in skip else "1"))
    build_note = f"cuda={'on' if use_cuda else 'off'} ({why})"
    define.append(("CLFAST_BUILD_NOTE", f'"{build_note}"'))
    print(f"[clfast setup] {build_note}", flush=True)
    if use_cuda:
        os.environ["CUDA_HOME"] = _nvcc_home() or ""
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "clfast._C", cpp + cu, define_macros=define,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
            py_limited_api=False)
    else:
        ext = cpp_extension.CppExtension(
            "clfast._C", cpp, define_macros=define,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


class build_py(_build_py):
    """Ships the top-level kernels/<op>.py as clfast/kernels/<op>.py. The folder has no __init__.py, so
    that a checkout on sys.path never holds a package named ``kernels`` (see clfast/kernels/__init__.py,
    which searches that folder in a source tree)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "clfast.kernels":
            modules += [(package, os.path.splitext(os.path.basename(f))[0], f)
                        for f in sorted(glob.glob(os.path.join("kernels", "*.py")))]
        return modules


ext_modules, build_ext = _extensions()
setup(
    packages=find_packages(include=["clfast", "clfast.*"]),
    package_data={"clfast": ["assets/*", "configs/*/*.yaml", "data/*.json", "data/descriptors/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": build_py},
)
