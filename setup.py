"""Builds rnnext._C.

The CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu)
are added when a CUDA toolkit and a CUDA build of torch are both present, unless
RNNEXT_CPU_ONLY=1 is set; no GPU is needed to build them. The toolkit is found from CUDA_HOME,
else from the nvcc on PATH (through wrapper scripts), else /usr/local/cuda. Without a visible
GPU the kernels are built for TORCH_CUDA_ARCH_LIST, by default 8.0 and 9.0 with PTX.

Build with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`
(torch must already be installed: an isolated build cannot see it).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup


def _toolkit_root(nvcc):
    """The toolkit folder of an nvcc, or None: the folder above bin/nvcc that holds
    include/cuda_runtime.h. An nvcc on PATH may be a wrapper script (seen: /usr/local/bin/nvcc
    running /usr/local/cuda-13.0/bin/nvcc), whose folder is not the toolkit's, so the path it
    runs is read from the script."""
    candidates = [os.path.realpath(nvcc)]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            candidates += re.findall(r"(/[^\s'\"]*/bin/nvcc)\b", head.decode("utf-8", "replace"))
    except OSError:
        pass
    for path in candidates:
        root = os.path.dirname(os.path.dirname(os.path.realpath(path)))
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _find_cuda_home():
    """Sets CUDA_HOME for torch's build helpers (they read it when imported) when it is not set."""
    if os.environ.get("RNNEXT_CPU_ONLY", "0") not in ("", "0") or os.environ.get("CUDA_HOME"):
        return
    nvcc = shutil.which("nvcc")
    root = _toolkit_root(nvcc) if nvcc else None
    if root is None and os.path.isfile("/usr/local/cuda/include/cuda_runtime.h"):
        root = "/usr/local/cuda"
    if root is not None:
        os.environ["CUDA_HOME"] = root


_find_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - a message instead of a traceback
    sys.exit("rnnext needs torch installed before it is built: pip install 'torch==2.13.*', "
             "then pip install --no-build-isolation -e .")

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda():
    if os.environ.get("RNNEXT_CPU_ONLY", "0") not in ("", "0"):
        return False
    cuda_sources = _sources("csrc/cuda/*.cu")
    return bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_include_dirs():
    """Header folders of the nvidia pip packages that torch's CUDA wheels install (cuBLAS,
    cuSPARSE, ... for ATen/cuda/CUDAContext.h), for a toolkit that lacks those libraries (seen:
    the CUDA 13.0 toolkit of the CPU machines). Not added where the toolkit has cuBLAS, so its
    runtime headers are not shadowed by the packages' copies of another version."""
    if os.path.isfile(os.path.join(cpp_extension.CUDA_HOME or "", "include", "cublas_v2.h")):
        return []
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cublas_library():
    """The cuBLAS shared library to link, by path: the one torch has loaded in this process
    (import torch loads libtorch_cuda and its cuBLAS), else one of torch's CUDA major version
    from the nvidia pip packages or the toolkit. At run time its soname resolves to the cuBLAS
    torch loads, so rnnext and torch share one cuBLAS (and torch's handles)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return path
    except OSError:
        pass
    major = (torch.version.cuda or "").split(".")[0]
    roots = [os.path.join(entry, "nvidia", "*", "lib") for entry in sys.path]
    roots.append(os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "lib*"))
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, f"libcublas.so.{major}*")))
        if found:
            return found[0]
    sys.exit(f"rnnext: no libcublas.so.{major} found (torch's nvidia packages or the CUDA toolkit); "
             "set RNNEXT_CPU_ONLY=1 to build without the CUDA kernels")


def _default_arch_list():
    """Without a visible GPU torch cannot pick the architectures: build for Ampere (8.0) and
    Hopper (9.0), with PTX for later ones."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def _shared_libstdcxx():
    """The libstdc++ shared library this build process runs with (torch imported), as a
    linker argument, or [] where there is none to find.

    Named to the linker by path, ahead of the compiler driver's own libraries, it resolves
    every std:: symbol of _C.so. Where the driver's -lstdc++ finds a static archive first
    (seen: the GCC 13 install of the lent GPU machines, whose library directory holds only
    libstdc++.a), _C.so would otherwise carry a private copy of iostreams whose locale is
    never set up, and formatting a number into an error message (TORCH_CHECK -> c10::str ->
    ostringstream) segfaulted there, or dropped the number.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return [fields[-1]]
    except OSError:
        pass
    return []


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -g0 keeps the .so small and the build fast. -fopenmp makes at::parallel_for's inline
    # OpenMP region real (torch's CPU builds use the OpenMP backend); it is deliberately not
    # passed to the linker, so the GOMP symbols resolve to the OpenMP runtime torch itself
    # loads instead of a second runtime with its own thread pool. -fno-trapping-math lets the
    # compiler if-convert the clamps and selects of the gate math, so the pointwise loops
    # vectorise (rnnext never relies on floating-point traps).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]
    link = _shared_libstdcxx()
    # RNNEXT_SANITIZE=undefined or address (scripts/sanitize.sh): a checking build, with
    # debug information and frame pointers for the reports; every UB finding is fatal.
    sanitize = os.environ.get("RNNEXT_SANITIZE", "")
    if sanitize:
        if sanitize not in ("undefined", "address"):
            sys.exit(f"RNNEXT_SANITIZE={sanitize!r}: expected undefined or address")
        checks = "undefined,float-cast-overflow" if sanitize == "undefined" else "address"
        flags = [f"-fsanitize={checks}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g", "-fopenmp", "-fno-trapping-math"] + flags
        link = link + flags
    if _want_cuda():
        _default_arch_list()
        sources += _sources("csrc/cuda/*.cu")
        return cpp_extension.CUDAExtension(
            "rnnext._C", sources,
            define_macros=[("RNNEXT_WITH_CUDA", "1")],
            include_dirs=_nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link + [_cublas_library()],
        )
    return cpp_extension.CppExtension(
        "rnnext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
    )


setup(
    name="rnnext",
    version="0.1.0",
    description="Hand-written RNN, LSTM and GRU kernels for PyTorch, drop-in for torch.nn",
    packages=find_packages(include=["rnnext", "rnnext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
