from setuptools import setup

setup(cffi_modules=["trio_uring/_ffi_build.py:ffibuilder"])
