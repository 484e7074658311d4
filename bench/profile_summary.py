"""Summarise a py-spy profile in collapsed-stack form ("raw": one line per
stack, frames joined by ';', then a sample count) as two tables: where the
time is spent (self) and what it is spent under (inclusive).

    python bench/profile_summary.py bench/.work/profiles/a-c64-proxy.txt [--top 30]

The collapsed file itself opens in speedscope or inferno/flamegraph.pl for a
flame graph."""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Optional

# py-spy frames look like "function (path/to/file.py:123)"; idle frames
# (the event loop waiting in epoll) are what a busy process has few of.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "apertis_proxy/", "apertis_plugins/", "plugins/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + len(marker) if marker == "site-packages/" else i:]
            break
    else:
        path = Path(path).name
    return f"{m['func']} ({path})"


def summarize(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            under[f] += n
    if not total:
        return f"{path}: no samples\n"
    lines = [f"# {path.name}: {total} samples", "", "## self (where the time is spent)", ""]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "## inclusive (what it is spent under)", ""]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in under.most_common(top)]
    return "\n".join(lines) + "\n"


def stop_recording(spy: Optional[subprocess.Popen]) -> None:
    """Stop a `py-spy record --output FILE` process and write FILE's summary beside it (FILE.top.txt)."""
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
    out = Path(spy.args[spy.args.index("--output") + 1])
    if out.exists():
        out.with_suffix(".top.txt").write_text(summarize(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print(summarize(args.profile, args.top), end="")


if __name__ == "__main__":
    main()
