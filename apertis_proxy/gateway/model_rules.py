"""Request parameters a model refuses whatever the API version.

The API answers 400 when Opus 4.7 and later, Sonnet 5 and later or Haiku 5.5
and later get a non-default `temperature`, `top_p` or `top_k`, and when
Sonnet 5 and later get `thinking.type: "enabled"` (they think adaptively).
`refused_by(model, catalog_rules)` says which of these a model refuses: from
the catalogue's `rules` when they state any (operators can change them with
`prices import`), else from the small table below keyed by
model family and first version, so a new model of a known line is covered
before the catalogue lists it.  The contract removes the sampling parameters
(listed in `apertis-dropped-params`) and answers 400 for `thinking.type:
"enabled"`.  Model ids without a family and version in the current form
(`claude-<family>-<major>[-<minor>][-<date>]`) and unknown to the catalogue
have no rules.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, Optional

SAMPLING = "sampling"                    # temperature, top_p, top_k
THINKING_ENABLED = "thinking.enabled"    # thinking.type "enabled" (budgeted thinking)

# rule -> {family: first (major, minor) version that refuses it}
RULES: dict[str, dict[str, tuple[int, int]]] = {
    SAMPLING: {"opus": (4, 7), "sonnet": (5, 0), "haiku": (5, 5)},
    THINKING_ENABLED: {"sonnet": (5, 0)},
}

# The catalogue's rule names (catalog.json `rules`) -> the rules above.
CATALOG_RULES = {"sampling_defaults_only": SAMPLING, "thinking_enabled_refused": THINKING_ENABLED}

# "claude-opus-4-7", "claude-sonnet-5", "claude-haiku-5-5", "claude-opus-4-5-20251101"
_MODEL_ID = re.compile(r"claude-([a-z]+)-(\d+)(?:-(\d{1,2}))?(?:-\d{8})?")


def family_version(model: str) -> Optional[tuple[str, tuple[int, int]]]:
    m = _MODEL_ID.fullmatch(model)
    if m is None:
        return None
    return m.group(1), (int(m.group(2)), int(m.group(3) or 0))


def refused_by(model: str, catalog_rules: Optional[Mapping[str, Any]] = None) -> frozenset[str]:
    """The rules (SAMPLING, THINKING_ENABLED) that apply to this upstream model id.

    `catalog_rules` is the catalogue entry's `rules`: when it states any rule
    (true or false) it decides; empty or None (a model the operator priced,
    or one the catalogue does not list) leaves it to the family table."""
    if catalog_rules:
        return frozenset(rule for name, rule in CATALOG_RULES.items() if catalog_rules.get(name))
    return _by_family(model)


@lru_cache(maxsize=512)
def _by_family(model: str) -> frozenset[str]:
    parsed = family_version(model)
    if parsed is None:
        return frozenset()
    family, version = parsed
    return frozenset(rule for rule, first in RULES.items() if family in first and version >= first[family])
