# Metadata lives in setup.cfg; this file only declares the extension.
from Cython.Build import cythonize
from setuptools import Extension, setup

ext = Extension(
    "cpushare._seccomp",
    sources=["cython/seccomp_loader.pyx", "cython/trampoline.c"],
    include_dirs=["cython"],
    extra_compile_args=["-Wall", "-Wextra", "-O2"],
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
