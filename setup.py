"""Build script.

By default nothing is compiled at install time: the C++/CUDA extension in csrc/ is built on first use
with ninja (fastblock/extension.py) and cached. Set FASTBLOCK_BUILD_EXT=1 to compile it ahead of time into
``fastblock._C`` (CUDA sources are added when torch has CUDA and nvcc is found, or FASTBLOCK_BUILD_CUDA=1).
"""
import os
import shutil

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("FASTBLOCK_BUILD_EXT", "0") == "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastblock_build_flags", os.path.join(here, "fastblock", "build_flags.py"))
    build_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_flags)
    sources = [os.path.join("csrc", "fastblock_ops.cpp"), os.path.join("csrc", "fastblock_cpu.cpp")]
    cxx_flags = ["-O3"] + build_flags.ISA_FLAGS.get(build_flags.isa_level(), [])  # C++ standard chosen by torch
    want_cuda = os.environ.get("FASTBLOCK_BUILD_CUDA")
    with_cuda = (want_cuda == "1") or (
        want_cuda is None and torch.version.cuda is not None and (CUDA_HOME or shutil.which("nvcc"))
    )
    if with_cuda:
        sources.append(os.path.join("csrc", "fastblock_cuda.cu"))
        ext = CUDAExtension(
            "fastblock._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFASTBLOCK_WITH_CUDA"], "nvcc": ["-O3", "-DFASTBLOCK_WITH_CUDA"]},
        )
    else:
        ext = CppExtension("fastblock._C", sources, extra_compile_args={"cxx": cxx_flags})
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
