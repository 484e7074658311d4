"""The command tree: each noun module adds its commands through `Commands`."""
from __future__ import annotations

import argparse
from typing import Callable, Optional

Handler = Callable[[argparse.Namespace], int]
Flags = Callable[[argparse.ArgumentParser], None]


def name_only(p: argparse.ArgumentParser) -> None:
    """The flags of a command that takes just the name of what it acts on."""
    p.add_argument("name")


class Commands:
    """Subcommands of one level.  Every command also takes --db (`db_parent`), so
    it may come at any level of the command line."""

    def __init__(self, subparsers, db_parent: argparse.ArgumentParser) -> None:
        self._subparsers = subparsers
        self._db = db_parent

    def add(self, name: str, handler: Handler, help_text: str,
            flags: Optional[Flags] = None) -> argparse.ArgumentParser:
        p = self._subparsers.add_parser(name, parents=[self._db], help=help_text, description=help_text,
                                        allow_abbrev=False)
        p.set_defaults(handler=handler)
        if flags is not None:
            flags(p)
        return p

    def group(self, name: str, help_text: str) -> "Commands":
        """A noun whose commands are its actions: `keys create`, `keys list`..."""
        p = self._subparsers.add_parser(name, parents=[self._db], help=help_text, description=help_text)
        return Commands(p.add_subparsers(dest="action", required=True, metavar="ACTION"), self._db)
