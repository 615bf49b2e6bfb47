"""Build script for the optional compiled part; everything else is declared in setup.cfg.

``itk_gradicon._linear`` holds small C loops: trilinear sampling (the network's warps and compositions,
instance optimisation's warps, the written field on the image grid), one axis of a separable filter (zero or
replicate padding), LNCC's pointwise parts and MIND-SSC's parts (instance optimisation's similarities). It is optional: where no C compiler is available the build goes on without it
and itk_gradicon uses PyTorch's ``grid_sample``, banded matrix products and autograd (same values up to
float rounding, slower).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Unix compilers (gcc, clang): optimise, and never fuse a multiply and an add (that would change the
# rounding, and the kernel must return grid_sample's values bit for bit). MSVC does not contract
# across statements under its default /fp:precise.
_UNIX_FLAGS = ["-O3", "-ffp-contract=off", "-std=c99"]


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args = [*extension.extra_compile_args, *_UNIX_FLAGS]
        super().build_extensions()


setup(
    ext_modules=[Extension("itk_gradicon._linear", ["itk_gradicon/_linear.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
