"""Builds heterospec_ext._C (CPU kernels, plus CUDA kernels with a CUDA torch).

Build against the torch that is already installed, without build isolation:

    pip install --no-build-isolation .            # the kernels (heterospec_ext); needs torch, numpy
    pip install --no-build-isolation ".[driver]"  # plus the driver's dependencies, for the
                                                  # `heterospec` command (python/heterospec)

Environment:
    HX_BUILD=auto|cpu|cuda   auto (default): CUDA when torch is a CUDA build and CUDA_HOME is found
    TORCH_CUDA_ARCH_LIST     default "8.0;9.0" (sm_80, sm_90); never derived from a visible GPU
    HX_DEBUG=1               -O0 -g instead of -O3 -g0
    HX_SANITIZE=LIST         host C++ built with -fsanitize=LIST (e.g. address,undefined), -O1 -g;
                             see scripts/sanitize.sh for building and running such a copy
    HX_PTXAS_VERBOSE=1       print ptxas resource usage (registers, spills) of every kernel
"""
import glob
import os
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
# The driver (python/heterospec) ships with the kernels when the tree has it.
HAS_DRIVER = os.path.isdir(os.path.join(ROOT, "python", "heterospec"))

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users only
    sys.exit(
        "heterospec needs torch installed before it is built. Install torch first, then "
        "build without isolation: pip install --no-build-isolation ."
    )


def _want_cuda() -> bool:
    mode = os.environ.get("HX_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        sys.exit(f"HX_BUILD must be auto, cpu or cuda, got {mode!r}")
    if mode == "cpu":
        return False
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "cuda" and not has_cuda:
        sys.exit(
            "HX_BUILD=cuda needs a CUDA build of torch and the CUDA toolkit "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return has_cuda


def _arch_flags(arch_list: str):
    flags, names = [], []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        names.append(f"sm_{num}")
    return flags, names


def _driver_requirements():
    """The driver extra: the requirement lines of python/heterospec/requirements-driver.txt."""
    path = os.path.join(ROOT, "python", "heterospec", "requirements-driver.txt")
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _extension():
    with_cuda = _want_cuda()
    debug = os.environ.get("HX_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define = [f'-DHX_VERSION="{VERSION}"', f'-DHX_TORCH_VERSION="{torch.__version__}"']
    # -Wno-psabi: the CPU kernels pass GCC vector types between internal always_inline
    # functions only (csrc/cpu/simd.h), so GCC's note that their ABI changed in GCC 4.6 never
    # applies (a #pragma does not silence it for templates instantiated from a header)
    cxx = ["-std=c++20", "-fopenmp", "-Wno-psabi"] + opt
    ldflags = ["-fopenmp"]
    sanitize = os.environ.get("HX_SANITIZE", "")
    if sanitize:  # every sanitizer report is fatal, with a usable stack
        flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx += flags + ["-O1", "-g"]
        ldflags += flags
    archs = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        gencode, archs = _arch_flags(os.environ["TORCH_CUDA_ARCH_LIST"])
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_cuda.cpp"))
        define += ["-DHX_WITH_CUDA", f'-DHX_CUDA_ARCHS="{";".join(archs)}"']
        # Explicit -gencode flags: torch then adds none of its own, so the
        # arch list never depends on a visible GPU.
        nvcc = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr"] + gencode
        if os.environ.get("HX_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")  # register / shared-memory / spill report per kernel
        return cpp_extension.CUDAExtension(
            name="heterospec_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + define, "nvcc": nvcc + define},
            extra_link_args=ldflags,
        )
    return cpp_extension.CppExtension(
        name="heterospec_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + define},
        extra_link_args=ldflags,
    )


class _BuildExtension(cpp_extension.BuildExtension):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_ninja", True)
        super().__init__(*args, **kwargs)


setup(
    name="heterospec",
    version=VERSION,
    description="Fused C++/CUDA kernels for heterogeneity-adaptive tree speculative decoding",
    packages=find_packages(include=["heterospec_ext", "heterospec_ext.*"])
    + find_packages(where="python"),
    package_dir={"heterospec": "python/heterospec"} if HAS_DRIVER else {},
    # the shipped policies and the trained SmolLM2 draft head travel with the package
    package_data={"heterospec": ["policies/*.json", "heads/*/*.json", "heads/*/*.safetensors",
                                 "heads/*/*.md", "requirements-driver.txt"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension},
    entry_points={"console_scripts": ["heterospec=heterospec.cli:main"]} if HAS_DRIVER else {},
    # 3.10: annotations such as `int | None` are evaluated when modules are imported.
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"driver": _driver_requirements()} if HAS_DRIVER else {},
    zip_safe=False,
)
