"""cffi (API mode) builder for the C shim.

The shim carries its own copy of the io_uring UAPI structures, so building
needs a C compiler and Python headers, nothing else: no liburing and no new
kernel headers.  Set ``TRIO_URING_ASAN=1`` to build with AddressSanitizer.
"""

import os
import pathlib

from cffi import FFI

_here = pathlib.Path(__file__).resolve().parent
_header = (_here / "_shim.h").read_text()

_extra_compile_args = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_extra_link_args: list[str] = []
if os.environ.get("TRIO_URING_ASAN"):
    _extra_compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
    _extra_link_args += ["-fsanitize=address"]

ffibuilder = FFI()
ffibuilder.cdef(_header)
ffibuilder.set_source(
    "trio_uring._shim_cffi",
    '#include "_shim.c"',
    include_dirs=[str(_here)],
    extra_compile_args=_extra_compile_args,
    extra_link_args=_extra_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
