"""Build the C unit tests with -Werror, and again under ASan + UBSan, and run them."""
import os
import shutil
import subprocess
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
LIBRARY = [os.path.join(CSRC, f) for f in ("segment.c", "heap.c", "map.c", "wait.c", "ring.c", "topic.c", "sync.c",
                                           "feed.c", "batch.c", "array.c")]
PROGRAMS = {"test_core": "tests/test_core.c", "test_msg": "tests/test_msg.c", "test_batch": "tests/test_batch.c"}
STRICT = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"]

BUILDS = {
    "plain": ["-O2"],
    "asan-ubsan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.timeout(180)
def test_c(program, build, tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the C tests"
    exe = tmp_path / f"{program}-{build}"
    sources = [*LIBRARY, os.path.join(CSRC, PROGRAMS[program])]
    subprocess.run([cc, *STRICT, *BUILDS[build], *sources, "-o", str(exe), "-lrt", "-lpthread"], check=True)
    name = f"sgc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    try:
        r = subprocess.run([str(exe), name], capture_output=True, text=True, timeout=150, env=env)
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
