"""Build script.

By default nothing is compiled at install time: the C++/CUDA extension in csrc/ is built on first use
with ninja (fastblock/extension.py) and cached. Set FASTBLOCK_BUILD_EXT=1 to compile it ahead of time into
``fastblock._C`` (CUDA sources are added when torch has CUDA and nvcc is found, or FASTBLOCK_BUILD_CUDA=1).
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (fastblock/csrc): a non-editable install (wheel, sdist) can then still JIT-build
    the extension on first use. Editable installs read csrc/ from the checkout."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "fastblock", "csrc")
        self.mkpath(dst)
        for name in sorted(os.listdir(CSRC)):
            if name.endswith((".cpp", ".cu", ".h")):
                self.copy_file(os.path.join(CSRC, name), os.path.join(dst, name))


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}

if os.environ.get("FASTBLOCK_BUILD_EXT", "0") == "1":
    import importlib.util

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    spec = importlib.util.spec_from_file_location("fastblock_build_flags",
                                                  os.path.join(HERE, "fastblock", "build_flags.py"))
    build_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_flags)
    want_cuda = os.environ.get("FASTBLOCK_BUILD_CUDA")
    with_cuda = (want_cuda == "1") or (
        want_cuda is None and torch.version.cuda is not None and (CUDA_HOME or shutil.which("nvcc"))
    )
    names = build_flags.CPU_SOURCES + (build_flags.CUDA_SOURCES if with_cuda else [])
    sources = [os.path.join("csrc", name) for name in names]
    if with_cuda:
        ext = CUDAExtension(
            "fastblock._C",
            sources,
            extra_compile_args={"cxx": build_flags.cxx_flags(True), "nvcc": build_flags.NVCC_FLAGS},
            extra_link_args=build_flags.link_flags(),
        )
    else:
        ext = CppExtension("fastblock._C", sources, extra_compile_args={"cxx": build_flags.cxx_flags(False)},
                           extra_link_args=build_flags.link_flags())
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
