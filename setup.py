"""Build the Cython relay engine; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "splice_ext._relay",
        ["splice_ext/_relay.pyx"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
