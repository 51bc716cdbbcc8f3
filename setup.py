# Only what setuptools cannot take from pyproject.toml: the cffi extension,
# compiled from csrc/ by shmgrid/_build.py at install time.
from setuptools import setup

setup(cffi_modules=["shmgrid/_build.py:ffibuilder"])
