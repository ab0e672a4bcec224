"""Extension build only (metadata lives in pyproject.toml).

Builds fastgrad._C, the C++ CPU kernels, with pybind11 and OpenMP when the
compiler supports it. csrc/ includes no torch header, so no torch is needed
to build. If the compiler is missing or fails, the package still installs
and falls back to the reference backend with a warning that says why.

Environment:
  FASTGRAD_CPU_ARCH   value for -march (default "native"; "" to omit)
"""

import os
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext


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


class BuildExt(build_ext):
    def build_extensions(self):
        built = []
        for ext in self.extensions:
            flags = ["-O3", "-std=c++17", "-fno-math-errno"]
            arch = os.environ.get("FASTGRAD_CPU_ARCH", "native")
            if arch and _compiles(self.compiler, [f"-march={arch}"]):
                flags.append(f"-march={arch}")
            if _compiles(self.compiler, ["-fopenmp"]):
                flags.append("-fopenmp")
                ext.extra_link_args = [*ext.extra_link_args, "-fopenmp"]
            ext.extra_compile_args = [*ext.extra_compile_args, *flags]
        try:
            super().build_extensions()
            built.append("cpu (C++" + (", OpenMP" if "-fopenmp" in flags else "") + ")")
        except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back
            print(f"fastgrad: C++ CPU backend not built ({e}); the reference backend will be used")
        print("fastgrad: built backends: " + (", ".join(built) or "none") + "; triton at run time if installed")


setup(
    ext_modules=[
        Pybind11Extension(
            "fastgrad._C",
            ["csrc/bindings.cpp", "csrc/cpu/grad_stats_cpu.cpp", "csrc/cpu/scale_cpu.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
