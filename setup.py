import os

from setuptools import Extension, setup

# TRIO_URING_ASAN=1 builds the C code with AddressSanitizer, as _ffi_build.py
# does for the shim.
_asan = []
if os.environ.get("TRIO_URING_ASAN"):
    _asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]

setup(
    cffi_modules=["trio_uring/_ffi_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "trio_uring._queuecore",
            ["trio_uring/_queuecore.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", *_asan],
            extra_link_args=_asan,
        ),
        Extension(
            "trio_uring._tickcore",
            ["trio_uring/_tickcore.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", *_asan],
            extra_link_args=_asan,
        ),
    ],
)
