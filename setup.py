"""Builds the C object store (csrc/) and the Cython modules of hpcray."""
from Cython.Build import cythonize
from setuptools import Extension, setup

C_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-D_GNU_SOURCE"]

extensions = [
    Extension(
        "hpcray._store",
        sources=["hpcray/_store.pyx", "csrc/store.c", "csrc/allocator.c", "csrc/copy.c"],
        include_dirs=["csrc"],
        extra_compile_args=C_FLAGS,
        libraries=["rt", "pthread"],
    ),
    Extension(
        "hpcray._scheduler",
        sources=["hpcray/_scheduler.pyx"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"embedsignature": True}),
    package_data={"hpcray": ["*.pyi", "*.pxd", "py.typed", "util/*.js"]},
)
