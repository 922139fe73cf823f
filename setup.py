"""Builds rnnext._C.

The CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu)
are added when a CUDA toolkit and a CUDA build of torch are both present, unless
RNNEXT_CPU_ONLY=1 is set.

Build with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`
(torch must already be installed: an isolated build cannot see it).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

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
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu")
        return cpp_extension.CUDAExtension(
            "rnnext._C", sources,
            define_macros=[("RNNEXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link,
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
