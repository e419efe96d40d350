"""Outputs appear at their final path only when complete: written under a temporary name, then renamed.

Snakemake leaves a killed job's partial output at the final path; writing elsewhere and renaming means
a crash can leave only a hidden temporary file, which the job's next run removes.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .disk import disk_full_line
from .errors import InputError


@contextmanager
def atomic_path(final: str | Path):
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp.*"):
        stale.unlink(missing_ok=True)  # left by a killed earlier run of this job
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:  # one line naming the output, not a traceback from deep in a writer
            raise InputError(disk_full_line(final, written)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """Strict JSON: a NaN or inf is an error here, never a bare `NaN` in the file."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
