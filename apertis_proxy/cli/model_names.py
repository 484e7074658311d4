"""Warnings about model names that neither the catalogue nor any channel knows."""
from __future__ import annotations

import sys

from ..store import catalog as catalog_store
from ..store import channels as channel_store


def warn_unknown_models(conn, models, *, channel: bool = False) -> None:
    """Warn about model names nobody knows: a typo in a key's list is a 403 later, and a
    channel's model missing from the catalogue is metered without prices."""
    if not models:
        return
    catalog = catalog_store.load_catalog(conn)
    listed = set()
    for row in channel_store.list_channels(conn):
        listed.update(row["models"] or ())
        listed.update(row["aliases"])
    for name in sorted(n for n in set(models) if catalog.lookup(n) is None):
        if channel:
            print(f"warning: model {name!r} has no prices in the catalogue, so its usage is metered"
                  f" at $0; add them with: apertis-proxy prices set {name} --input USD --output USD",
                  file=sys.stderr)
        elif name not in listed:
            print(f"warning: no channel lists model {name!r} and the catalogue does not know it",
                  file=sys.stderr)
