"""The start-up collection pause (dllm/startup_gc.py) always ends with collection on, in the process and in
children forked during the pause. Each case runs in a fresh interpreter: the pause freezes objects and
registers a fork hook, which must not leak into the test process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


def test_collection_resumes_when_ready_and_start_up_objects_are_frozen() -> None:
    _run("""
        import gc
        from dllm.startup_gc import CollectionPause
        with CollectionPause() as pause:
            assert not gc.isenabled()
            pause.resume()
            assert gc.isenabled() and gc.get_freeze_count() > 0
            pause.resume()  # idempotent
        assert gc.isenabled()
    """)


def test_collection_resumes_when_start_up_fails() -> None:
    _run("""
        import gc
        from dllm.startup_gc import CollectionPause
        try:
            with CollectionPause():
                raise RuntimeError("model folder missing")
        except RuntimeError:
            pass
        assert gc.isenabled()
    """)


def test_child_forked_during_the_pause_collects() -> None:
    _run("""
        import gc, os
        from dllm.startup_gc import CollectionPause
        with CollectionPause():
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write, b"1" if gc.isenabled() else b"0")
                os._exit(0)
            os.waitpid(pid, 0)
            assert os.read(read, 1) == b"1", "the forked child runs without collection"
            assert not gc.isenabled()
    """)


def test_pause_leaves_a_collector_someone_else_turned_off_alone() -> None:
    _run("""
        import gc
        from dllm.startup_gc import CollectionPause
        gc.disable()
        with CollectionPause() as pause:
            pause.resume()
            assert not gc.isenabled() and gc.get_freeze_count() == 0
        assert not gc.isenabled()
    """)
