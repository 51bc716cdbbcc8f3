# Type stub of the cffi extension built from csrc/ by shmgrid/_build.py.
from typing import Any

ffi: Any
lib: Any
