"""Write a new output folder all at once: a crash never leaves a half-written folder that looks complete.

The tokenizer trainer and the shard writer both fill a temporary sibling folder and rename it to
its destination at the end; an existing folder with anything in it is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_new_dir(out_dir: Path) -> None:
    """Raise FileExistsError if `out_dir` exists and is not an empty folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new folder "
                              "(nothing is overwritten)")


@contextlib.contextmanager
def new_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields a temporary folder that becomes `out_dir` when the block finishes without an error."""
    out_dir = Path(out_dir)
    check_new_dir(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():                    # left over from an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_new_dir(out_dir)              # something may have appeared there meanwhile
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
