"""Builds pykernels._C (the sm_90a CUDA extension) through CMake, or installs pure Python.

The extension is built when nvcc is found on PATH or under CUDA_HOME / CUDA_PATH / /usr/local/cuda, and
PYKERNELS_BUILD_CUDA is not "0". No GPU is needed to build. When nvcc is found the build must succeed:
a failed CUDA build fails the install rather than leaving a package that silently lacks its kernels.

The ptxas report of the build (registers, spills, and warnings such as C7510 "wgmma serialized") is kept
beside the extension as pykernels/_C_build.log for the static audit (python -m pykernels.audit).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BANNER = "=" * 78


def find_nvcc():
    """Path of nvcc, or None. PATH first, then the usual CUDA roots."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    # "... release 13.0, V13.0.88"
    release = out.split("release")[-1].split(",")[0].strip()
    major, minor = (int(p) for p in release.split(".")[:2])
    return major, minor


def cuda_build_decision():
    """(build?, reason). The reason is shown to the user when the build is skipped."""
    if os.environ.get("PYKERNELS_BUILD_CUDA", "1") == "0":
        return False, "PYKERNELS_BUILD_CUDA=0"
    nvcc = find_nvcc()
    if nvcc is None:
        return False, "nvcc not found on PATH or under CUDA_HOME, CUDA_PATH or /usr/local/cuda"
    major, minor = nvcc_version(nvcc)
    if (major, minor) < (12, 3):
        return False, f"nvcc {major}.{minor} is older than 12.3, the first release with full sm_90a wgmma/TMA support"
    return True, nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def whole_build_log(ninja_output: str, build_temp: Path) -> str:
    """The compiler output of every step that built the extension, not only of those this build ran.

    An incremental build recompiles only what changed, but the audit reads ptxas's warnings for every kernel
    from the log: ninja -v prints each step as "[i/n] command ... -o target" followed by its output, and the
    latest output of each target is kept under build_temp (dropped once its target is gone).
    """
    store = build_temp / "step-logs"
    store.mkdir(exist_ok=True)
    sections = re.split(r"^(?=\[\d+/\d+\] )", ninja_output, flags=re.M)
    for section in sections:
        target = re.search(r" -o (\S+)", section.split("\n", 1)[0]) if section.startswith("[") else None
        if target:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", target.group(1))
            (store / f"{name}.log").write_text(section)
    kept = []
    for step in sorted(store.glob("*.log")):
        text = step.read_text()
        target = re.search(r" -o (\S+)", text.split("\n", 1)[0])
        if target and (build_temp / target.group(1)).exists():
            kept.append(text)
        else:
            step.unlink()
    return "".join(kept)


class CMakeBuild(build_ext):
    def run(self):
        build, detail = cuda_build_decision()
        info = {"cuda_extension": build, "reason": None if build else detail}
        if not build:
            print(f"\n{BANNER}\npykernels: building WITHOUT the CUDA extension ({detail}).\n"
                  f"Only the Triton and torch backends will be available.\n{BANNER}\n",
                  file=sys.stderr, flush=True)
            # A library left by an earlier in-place build must not ship inside a pure-Python install.
            for stale in self._package_dir().glob("_C*"):
                stale.unlink()
            self._write_info(info)
            return
        self.nvcc = detail
        super().run()
        self._write_info(info)
        if self.inplace:  # setuptools copies only the library itself back into the source tree
            built = Path(self.build_lib).resolve() / "pykernels" / "_C_build.log"
            shutil.copyfile(built, ROOT / "pykernels" / "_C_build.log")

    def _package_dir(self):
        if self.inplace:
            return ROOT / "pykernels"
        return Path(self.build_lib).resolve() / "pykernels"

    def _write_info(self, info):
        pkg = self._package_dir()
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")

    def build_extension(self, ext):
        import cutlass_library
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cutlass_include = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DPYKERNELS_EXT_SUFFIX={ext_path.name[len('_C'):]}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCUTLASS_INCLUDE_DIR={cutlass_include}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(configure, cwd=build_temp, check=True)
        log_path = Path(self.build_lib).resolve() / "pykernels" / "_C_build.log"
        # -v makes ninja echo each command; ptxas -v output is what the audit reads.
        proc = subprocess.run(["cmake", "--build", ".", "-j", jobs, "--", "-v"], cwd=build_temp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log_path.write_text(proc.stdout if proc.returncode != 0 else whole_build_log(proc.stdout, build_temp))
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-20000:])
            raise RuntimeError(f"pykernels: CUDA extension build failed (full log: {log_path})")


setup(ext_modules=[CMakeExtension("pykernels._C")], cmdclass={"build_ext": CMakeBuild})
