"""A disk that fills while a job writes: one line naming the path and the bytes, no traceback on the
terminal (it goes to the job's log), and nothing left at the output path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from moe_offload.atomic import atomic_path
from moe_offload.errors import InputError


def test_a_full_disk_inside_an_atomic_output_is_one_line_and_leaves_nothing(tmp_path):
    final = tmp_path / "plots" / "fidelity.png"
    with pytest.raises(InputError) as err:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"x" * 12_345)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.__cause__ is None
    assert str(err.value).startswith(f"disk full writing {final}: it needs more than the 12.3 kB written, ")
    assert str(err.value).endswith(f" free under {final.parent}")
    assert list(final.parent.iterdir()) == []


def test_a_full_disk_in_a_step_is_one_line_on_stderr_and_the_traceback_in_the_log(tmp_path):
    log = tmp_path / "step.log"
    code = textwrap.dedent(f"""
        import errno
        from types import SimpleNamespace
        from moe_offload import steps
        def step(smk):
            raise OSError(errno.ENOSPC, "No space left on device", {str(tmp_path / 'cache.bin')!r})
        steps.run_step(SimpleNamespace(log=[{str(log)!r}]), step)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: disk full writing {tmp_path / 'cache.bin'}: "), lines
    assert "Traceback" in log.read_text()
