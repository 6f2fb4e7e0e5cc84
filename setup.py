"""Build and install kvblend.

`pip install .` configures CMake once, builds libkvblend.so (the C core, the
hook layer and, where nvcc is found, the CUDA kernels) and the CPython
extension _kvblend, and installs both next to the Python package with an
$ORIGIN rpath.  Environment knobs:

  KVB_CUDA=AUTO|ON|OFF   build the CUDA kernels (default AUTO: when nvcc is found)
  KVB_CMAKE_ARGS="..."   extra arguments for the CMake configure step
  KVB_BUILD_DIR=PATH     reuse a build folder between installs

torch and vLLM are not build requirements: the extension never includes
their headers, so the package builds against whatever torch is installed.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMake rather than by setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures (once per build folder), builds and installs the CMake
    targets into the folder where setuptools expects the extension."""

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("KVB_BUILD_DIR") or (Path(self.build_temp) / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("KVB_CUDA", "AUTO").upper()
        if cuda not in ("AUTO", "ON", "OFF"):
            raise SystemExit(f"KVB_CUDA={cuda!r}: expected AUTO, ON or OFF")
        if not (build_dir / "CMakeCache.txt").exists():
            args = [
                "cmake", "-S", str(ROOT), "-B", str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DKVB_CUDA={cuda}",
                "-DKVB_PYTHON=ON",
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DCMAKE_INSTALL_PREFIX={out_dir}",
                "-DKVB_INSTALL_DIR=.",
            ]
            if _has_ninja():
                args += ["-G", "Ninja"]
            args += shlex.split(os.environ.get("KVB_CMAKE_ARGS", ""))
            subprocess.check_call(args)
        else:
            subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir),
                                   f"-DCMAKE_INSTALL_PREFIX={out_dir}"])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel",
                               str(os.cpu_count() or 2)])
        subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix", str(out_dir)])


def _has_ninja():
    try:
        subprocess.check_call(["ninja", "--version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(
    name="kvblend",
    version="0.1.0",
    description="CacheBlend-style KV cache blending for vLLM: reuse chunk KV anywhere in a prompt",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "python_shim"},
    packages=find_packages("python_shim"),
    ext_modules=[CMakeExtension("kvblend._kvblend")],
    cmdclass={"build_ext": CMakeBuild},
    extras_require={
        "model": ["torch", "transformers", "gguf", "sentencepiece"],
        "test": ["pytest"],
    },
    entry_points={
        "vllm.general_plugins": ["kvblend = kvblend.vllm.plugin:register"],
    },
    zip_safe=False,
)
