# Metadata lives in setup.cfg; this file only declares the extensions.
from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-Wall", "-Wextra", "-O2"]

seccomp = Extension(
    "cpushare._seccomp",
    sources=["cython/seccomp_loader.pyx", "cython/trampoline.c"],
    include_dirs=["cython"],
    extra_compile_args=CFLAGS,
)

# The encrypted link's datagram layer: AES-256-GCM from OpenSSL's libcrypto.
# Its generated C goes under build/, out of the source tree.
link = Extension(
    "cpushare._link",
    sources=["cython/link.pyx", "cython/linkcore.c"],
    include_dirs=["cython"],
    libraries=["crypto"],
    extra_compile_args=CFLAGS,
)

directives = {"language_level": 3}
setup(ext_modules=cythonize([seccomp], compiler_directives=directives)
      + cythonize([link], compiler_directives=directives, build_dir="build/cython"))
