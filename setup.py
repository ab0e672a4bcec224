"""Extension build only (metadata lives in pyproject.toml).

Builds, with no torch needed (csrc/ includes no torch header):
  fastgrad._C     the C++ CPU kernels (pybind11, OpenMP when the compiler has it);
  fastgrad._cuda  the CUDA kernels, compiled by nvcc, linked with the static
                  CUDA runtime — when nvcc is found and a GPU is visible, or
                  FASTGRAD_FORCE_CUDA=1 (builds without a GPU, as CI does).
A failing optional build prints why and the package falls back at run time
(CUDA -> Triton -> reference; C++ -> reference) with a warning naming the reason.

Environment:
  FASTGRAD_FORCE_CUDA    1: build the CUDA extension and fail loudly if it breaks; 0: never build it
  TORCH_CUDA_ARCH_LIST   CUDA architectures: default "8.0;9.0+PTX" (sm_80, sm_90 cubins and sm_90 PTX
                         that newer GPUs compile at load), or e.g. "9.0a"
  CUDA_HOME              where nvcc lives (default: the nvcc on PATH)
  FASTGRAD_CPU_ARCH      the CPU kernels' instruction sets:
                         unset, "" or "dispatch" (default, wheels and source builds): the portable
                           baseline (any x86-64 / aarch64) plus, on x86-64 with GCC, AVX2 and AVX-512
                           paths chosen at import (csrc/cpu/cpu_dispatch.cpp; FASTGRAD_CPU_ISA forces one);
                         any other value, e.g. "native": one path compiled with -march=<value>, for this
                           machine only (never ship such a build).
  FASTGRAD_BUILD_JOBS    parallel compiler processes (default: the number of CPUs)
"""

import os
import shutil
import subprocess
import tempfile

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, naive_recompile
from setuptools import setup
from setuptools.command.build_ext import build_ext

CUDA_SOURCES = ["csrc/cuda/grad_stats_cuda.cu"]
# The kernels are compiled once per instruction-set path (csrc/cpu/isa.h): the
# wrappers in csrc/cpu/isa/ are the AVX2 / AVX-512 builds (empty elsewhere).
CPU_SOURCES = [
    "csrc/bindings.cpp", "csrc/cpu/cpu_dispatch.cpp", "csrc/cpu/grad_stats_cpu.cpp", "csrc/cpu/scale_cpu.cpp",
    "csrc/cpu/isa/grad_stats_cpu_avx2.cpp", "csrc/cpu/isa/grad_stats_cpu_avx512.cpp",
    "csrc/cpu/isa/scale_cpu_avx2.cpp", "csrc/cpu/isa/scale_cpu_avx512.cpp",
    "csrc/cpu/step_epilogue_cpu.cpp",
]
# Any edit of a header rebuilds everything (naive_recompile compares times only).
CPU_HEADERS = ["csrc/cpu/isa.h", "csrc/cpu/tensor_view.h", "csrc/cpu/step_epilogue_cpu.h", "csrc/common/plain_reader.h"]


def _compiles(compiler, flags) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:
            return False


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cudart_dir(nvcc: str) -> str:
    """The lib64 folder holding libcudart_static.a for this nvcc."""
    roots = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"]
    for root in roots:
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if root and os.path.exists(os.path.join(root, lib, "libcudart_static.a")):
                return os.path.join(root, lib)
    raise RuntimeError(f"libcudart_static.a not found near {nvcc}; set CUDA_HOME")


def _dispatch_paths() -> str:
    """The CPU paths a dispatch build holds (csrc/cpu/isa.h: the variants need x86-64 and GCC)."""
    import platform
    import sysconfig

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cc = (sysconfig.get_config_var("CC") or "") + " " + os.environ.get("CC", "")
    return "baseline, avx2, avx512" if x86 and "clang" not in cc else "baseline"


def _gpu_visible() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def _want_cuda() -> tuple[bool, str]:
    force = os.environ.get("FASTGRAD_FORCE_CUDA")
    if force == "0":
        return False, "FASTGRAD_FORCE_CUDA=0"
    if _nvcc() is None:
        return False, "nvcc not found"
    if force == "1" or _gpu_visible():
        return True, ""
    return False, "no GPU visible (set FASTGRAD_FORCE_CUDA=1 to build anyway)"


def _gencode_flags() -> list[str]:
    """nvcc -gencode flags from TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0a+PTX", ...)."""
    flags = []
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX").replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name == "fastgrad._cuda":
            return self._build_cuda(ext)
        # -ffp-contract=off: no fused multiply-add where a path has FMA, so every
        # path (and a -march build) rounds the same sums the same way.
        # -Wno-psabi: the 64-byte vector types cross only inlined, same-path calls.
        flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wno-psabi"]
        arch = os.environ.get("FASTGRAD_CPU_ARCH", "dispatch")
        if arch in ("", "dispatch"):
            paths = "runtime dispatch: " + _dispatch_paths()
        elif _compiles(self.compiler, [f"-march={arch}"]):
            flags += [f"-march={arch}", f"-DFASTGRAD_CPU_SINGLE_PATH={arch}"]
            paths = f"one path, -march={arch}: this machine only"
            print(f"fastgrad: FASTGRAD_CPU_ARCH={arch}: the CPU kernels run only on CPUs like this one; "
                  "do not distribute this build (unset FASTGRAD_CPU_ARCH for a portable one)")
        else:
            raise RuntimeError(f"FASTGRAD_CPU_ARCH={arch}: the compiler does not accept -march={arch}")
        if _compiles(self.compiler, ["-fopenmp"]):
            flags.append("-fopenmp")
            ext.extra_link_args = [*ext.extra_link_args, "-fopenmp"]
        ext.extra_compile_args = [*ext.extra_compile_args, *flags]
        try:
            super().build_extension(ext)
            self._built.append("cpu (C++" + (", OpenMP" if "-fopenmp" in flags else "") + f"; {paths})")
        except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back
            print(f"fastgrad: C++ CPU backend not built ({e}); the reference backend will be used")

    def _build_cuda(self, ext):
        nvcc = _nvcc()
        os.makedirs(self.build_temp, exist_ok=True)
        objects = []
        try:
            for src in CUDA_SOURCES:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *_gencode_flags(), "-c", src, "-o", obj]
                print(" ".join(cmd))
                subprocess.run(cmd, check=True)
                objects.append(obj)
            cuda_lib = _cudart_dir(nvcc)
            ext.extra_objects = [*ext.extra_objects, *objects]
            ext.library_dirs = [*ext.library_dirs, cuda_lib]
            ext.libraries = [*ext.libraries, "cudart_static", "rt", "dl", "pthread"]
            super().build_extension(ext)
            self._built.append("cuda (" + " ".join(f for f in _gencode_flags() if f != "-gencode") + ")")
        except Exception as e:  # noqa: BLE001
            if os.environ.get("FASTGRAD_FORCE_CUDA") == "1":
                raise
            print(f"fastgrad: CUDA backend not built ({e}); Triton or the reference will serve CUDA tensors")

    def build_extensions(self):
        self._built = []
        super().build_extensions()
        print("fastgrad: built backends: " + (", ".join(self._built) or "none")
              + "; triton at run time if installed")


def _needs_recompile(obj: str, src: str) -> bool:
    """An object is stale when older than its source or than any file under csrc/: the wrappers in
    csrc/cpu/isa/ include the kernels' .cpp files, which a per-file time check would miss."""
    if naive_recompile(obj, src):
        return True
    newest = max(os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk("csrc") for f in fs)
    return os.path.getmtime(obj) < newest


# The CPU sources compile in parallel (the kernels three times: one per path).
ParallelCompile("FASTGRAD_BUILD_JOBS", needs_recompile=_needs_recompile).install()

ext_modules = [
    Pybind11Extension(
        "fastgrad._C",
        CPU_SOURCES,
        include_dirs=["csrc"],
        depends=CPU_HEADERS,
        cxx_std=17,
    )
]
want_cuda, why_not_cuda = _want_cuda()
if want_cuda:
    # include_dirs: csrc/common/plain_reader.h, the plain-tensor reader shared with _C
    ext_modules.append(Pybind11Extension("fastgrad._cuda", ["csrc/cuda/bindings_cuda.cpp"], include_dirs=["csrc"],
                                         cxx_std=17))
else:
    print(f"fastgrad: not building the CUDA backend: {why_not_cuda}")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
