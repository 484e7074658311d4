"""Running one of bench/'s commands from a test, its work directory kept for the test to read, then removed."""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

BENCH = Path(__file__).resolve().parents[2] / "bench"


@contextlib.contextmanager
def kept_run(script: str, args: list[str], timeout: float
             ) -> Iterator[tuple[subprocess.CompletedProcess, Optional[Path]]]:
    """`python bench/SCRIPT ARGS --keep`: (the finished process, its work directory or None)."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--keep"], capture_output=True, text=True,
                          timeout=timeout)
    kept = re.search(r"work directory kept: (\S+)", proc.stdout)
    try:
        yield proc, Path(kept.group(1)) if kept else None
    finally:
        if kept:
            shutil.rmtree(kept.group(1), ignore_errors=True)
