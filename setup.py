"""Build fastres: the Python package, the Triton kernels (kernels/ -> fastres.kernels) and,
when torch is a CUDA build and nvcc is found, the CUTLASS extension fastres._C.

FASTRES_BUILD_CUDA: "auto" (default) builds the extension when it can and carries on without
it otherwise; "0" skips it; "1" makes any failure fatal (CI uses this).
TORCH_CUDA_ARCH_LIST: defaults to "8.0;9.0a": the CUTLASS 2 kernels for Ampere / Ada (sm_80 code
runs on every 8.x GPU) and the CUTLASS 3 kernels for Hopper (which need the "a" target).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_CUDA = os.environ.get("FASTRES_BUILD_CUDA", "auto").strip().lower()
if BUILD_CUDA not in ("auto", "0", "1"):
    raise SystemExit(f"FASTRES_BUILD_CUDA must be auto, 0 or 1, got {BUILD_CUDA!r}")

PACKAGES = ["fastres", "fastres.backends", "fastres.bench", "fastres.kernels"]
PACKAGE_DIR = {"fastres.kernels": "kernels"}


def _find_cuda_home() -> str | None:
    """CUDA_HOME as torch would find it, but resolving nvcc wrapper scripts (e.g. /usr/local/bin/nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            return str(home)
    return None


def _cutlass_include_dirs() -> list[str] | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    return [str(d) for d in dirs] if all(d.is_dir() for d in dirs) else None


def build_digest(cuda_home: str) -> str:
    """sha256 (12 hex digits) of what the extension is built from: csrc's files, the CUTLASS
    headers' version, the target architectures and nvcc's version. The built library cannot name
    its code itself: nvcc names its temporary files after process ids, so no two builds match."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (ROOT / "csrc").iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        cutlass = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        cutlass = "unknown"
    nvcc = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    for fact in (cutlass, os.environ["TORCH_CUDA_ARCH_LIST"], nvcc.stdout):
        digest.update(fact.encode() + b"\0")
    return digest.hexdigest()[:12]


def _skip(reason: str) -> tuple[list, dict]:
    if BUILD_CUDA == "1":
        raise SystemExit(f"fastres: FASTRES_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(f"fastres: building without the CUDA extension ({reason}); the 'cuda' backend is unavailable")
    return [], {}


def cuda_extension() -> tuple[list, dict]:
    if BUILD_CUDA == "0":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return _skip(f"torch is not importable at build time ({exc}); install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return _skip("torch is a CPU-only build")
    if CUDA_HOME is None:
        return _skip("nvcc / CUDA_HOME not found")
    includes = _cutlass_include_dirs()
    if includes is None:
        return _skip("the nvidia-cutlass package (CUTLASS headers) is not installed")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

    class BuildExt(BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # a failed optional build must not break the install
                if BUILD_CUDA == "1":
                    raise
                warnings.warn(f"fastres: CUDA extension build failed, continuing without it: {exc}")

    sources = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cpp", "*.cu") for p in (ROOT / "csrc").glob(pattern))
    ext = CUDAExtension(
        name="fastres._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *includes],
        extra_compile_args={
            "cxx": ["-O3", f"-DFASTRES_BUILD_DIGEST={build_digest(CUDA_HOME)}"],
            # -DNDEBUG: without it ptxas serializes wgmma (C7510); CUTLASS wants relaxed constexpr.
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
