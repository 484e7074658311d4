"""A plugin as a third party ships it: a module and a distribution's metadata with its entry points, in a
folder a gateway process finds on PYTHONPATH (importlib.metadata reads the dist-info like an installed one)."""
from __future__ import annotations

from pathlib import Path


def plugin_site(site: Path, module: str, source: str, entry_points: dict[str, dict[str, str]]) -> Path:
    """`site` holding `module`.py (`source`) and its distribution, whose entry points are
    {group: {name: "module:Object"}}; returns `site`."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items())
        for group, names in entry_points.items()))
    return site
