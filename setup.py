"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the udp data
path uses its pure-Python loops (slower, same bytes on the wire).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "loden.udp._fastpath",
            ["src/loden/udp/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
