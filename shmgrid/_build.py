"""cffi build script (API, out-of-line mode), run by setuptools' cffi_modules.

The cdef is the region of csrc/shmgrid.h between the CDEF markers, read at
build time, so the binding can never drift from the header.
"""
import os
import re

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC_ABS = os.path.join(os.path.dirname(_HERE), "csrc")
# setuptools wants source paths relative to the project root (its cwd)
_CSRC = os.path.relpath(_CSRC_ABS)
SOURCES = ["segment.c", "heap.c", "map.c", "wait.c", "ring.c", "topic.c", "sync.c", "feed.c", "batch.c", "array.c"]


def read_cdef(header=os.path.join(_CSRC_ABS, "shmgrid.h")):
    with open(header, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{header}: no CDEF BEGIN/END region")
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "shmgrid._core",
    '#include "shmgrid.h"',
    sources=[os.path.join(_CSRC, s) for s in SOURCES],
    include_dirs=[_CSRC],
    # -Werror only in the test build (tests/test_c.py): a newer compiler's
    # new warning must not break `pip install`.
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
