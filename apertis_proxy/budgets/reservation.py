"""The most a request can cost, known before it is sent: what a quota reserves for it.

A request is priced at every model it may be billed at: the name the client
sent, each channel alias of that name, the successor a retired model is
redirected to, and the models its tools and fallbacks name; the bound takes
the highest rates among those that have a price (a model without one is not
sent for a key with a USD quota: model_policy refuses it).

One model turn is bounded by its input and ``max_tokens`` of output (thinking
included).  Input: every byte of the request body counts as one token (no
tokenizer gives more tokens than bytes of text, and base64 images and
documents are far larger than their tokens), plus what the API adds that the
body does not show: the tool-use system prompt and the definitions of typed
tools (TOOL_PROMPT_TOKENS, TYPED_TOOL_TOKENS), and IMAGE_TOKENS for every image
(a small or well-compressed one has more tokens than bytes).  A PDF (its pages
are tokens of their own), a document given by URL or file id, or MCP servers
whose tools the API fetches, can be as large as the context window: the input
is then bounded by the model's ``max_input_tokens``
(DEFAULT_CONTEXT_TOKENS when the catalogue has none); so is a request that
continues a server-held thread (its earlier turns are input the body omits).

Further turns billed to the same request, each bounded by a full context window
of input and ``max_tokens`` of output: a server-side tool loop (web search,
web fetch, code execution, tool search, MCP; the API pauses it with
``pause_turn`` after SERVER_LOOP_TURNS turns), an advisor tool's calls (up to
its ``max_uses``), each fallback model (``fallbacks: "default"``: one turn at
the dearest priced model, since the API picks it), and a compaction (a
``compact_*`` context-management edit or ``compaction``; ``clear_*`` edits only
drop context).  Fast mode, the
inference geo (the dearest: upstream may apply a workspace's default) and
service tiers multiply the cost; web searches add their
per-search fee up to each tool's ``max_uses`` (SERVER_LOOP_TURNS without one).

Such bounds are large on purpose: near the end of a quota, a request whose
bound does not fit runs only while nothing else of its key is in flight, so
the quota is overshot by at most one request whatever the request turns into.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ..gateway.model_policy import billed_extras
from ..store.catalog import Catalog, ModelEntry

SERVER_LOOP_TURNS = 10          # the API's default cap on a server-tool loop before pause_turn
DEFAULT_CONTEXT_TOKENS = 1_000_000
TOOL_PROMPT_TOKENS = 1_000      # the system prompt the API adds when tools are given
TYPED_TOOL_TOKENS = 1_000       # a typed tool's definition (bash, computer, text editor...)
IMAGE_TOKENS = 5_000            # an image after the API's resizing, at most
MAX_USES = 1_000                # a tool's max_uses counts up to this (more is not a bound, it is bad input)
MAX_BOUND_TOKENS = 2 ** 53      # the stores keep bounds as 64-bit integers and doubles
_INPUT_RATES = ("input", "cache_write_5m", "cache_write_1h", "cache_read")
_CLIENT_TOOL_PREFIXES = ("custom", "bash_", "text_editor_", "computer_", "memory_")


@dataclass(slots=True)
class Bound:            # made for every request of a key with a quota: plain (a frozen one costs 5 times more)
    cost: float         # USD
    tokens: int


@dataclass(slots=True)
class _Shape:
    """What of a request body decides its bound, read once."""

    input: int = 0                  # tokens of the first turn, as far as the body shows them
    opaque: bool = False            # content the body does not show (the first turn may fill the context)
    output: int = 0                 # max_tokens
    turns: int = 0                  # further billed turns (server loop, advisor, fallbacks, compaction)
    searches: int = 0
    models: tuple = ()              # models named by tools and fallbacks
    any_model: bool = False         # a turn at a model the API picks (fallbacks "default"): any priced one


def billed_models(catalog: Catalog, model: Optional[str], channel_aliases: Iterable[Mapping[str, str]],
                  at: float) -> Sequence[ModelEntry]:
    """The catalogue entries a request for `model` may be billed at: the name itself, what channel
    aliases turn it into, and where a retired or unpriced model is redirected.  Remembered per model
    for these very `catalog` and `channel_aliases` objects (a change brings new ones; neither is
    changed in place) while `at` stays between the times, around it, at which one of the entries
    looked at retires or has a price row come into force."""
    hit = _BILLED.get(model)
    if hit is not None and hit[0] is catalog and hit[1] is channel_aliases and hit[2] <= at < hit[3]:
        return hit[4]
    entries: dict[str, ModelEntry] = {}
    since, until = float("-inf"), float("inf")
    pending = [model] if model else []
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(aliases[name] for aliases in channel_aliases if name in aliases)
        entry = catalog.lookup(name)
        if entry is None:
            continue
        entries[entry.id] = entry
        since, until = _around(at, (entry.retires_ts, *(row.effective_from for row in entry.price_rows)),
                               since, until)
        if entry.lifecycle_at(at) == "retired" or entry.price_at(at) is None:
            pending.extend(n for n in (entry.redirect_to, entry.successor) if n)
    found = tuple(entries.values())
    if len(_BILLED) >= _CACHED_MAX:
        _BILLED.clear()
    _BILLED[model] = (catalog, channel_aliases, since, until, found)
    return found


def request_bound(catalog: Catalog, entries: Sequence[ModelEntry], body: Optional[Mapping[str, Any]],
                  body_bytes: int, at: float) -> Bound:
    """The most the request may cost and count, at the highest rates of `entries` (see the module
    docstring).  Cost 0 when none of them has a price."""
    if type(body) is dict and type(entries) is tuple and _NOT_PLAIN.isdisjoint(body):
        # The common request: one turn whose content the body shows, at the rates of `entries` alone (the
        # general case below, without what does not apply to it).
        probe = _Shape()
        images = _sources(body.get("messages"), probe)
        if not probe.opaque:
            max_tokens = body.get("max_tokens")
            output = min(max_tokens, MAX_BOUND_TOKENS) if type(max_tokens) is int and max_tokens > 0 else 0
            first_input = max(0, body_bytes) + images * IMAGE_TOKENS
            tokens = min(MAX_BOUND_TOKENS, first_input + output)
            rates, factor = _plain_rates(catalog, entries, body.get("speed") == "fast", at)
            if not rates:
                return Bound(0.0, tokens)
            cost = _highest_turn_cost(rates, first_input, output) / 1e6 * factor
            return Bound(min(cost, float(MAX_BOUND_TOKENS)), tokens)
    shape = _shape(body, body_bytes)
    everyone = [*entries, *(e for e in map(catalog.lookup, shape.models) if e is not None)] if shape.models \
        else entries
    if shape.any_model:
        everyone = [*everyone, *catalog.entries]
    # The context window counts only for opaque content and further turns (not for a plain request).
    context = max((e.max_input_tokens or DEFAULT_CONTEXT_TOKENS for e in everyone),
                  default=DEFAULT_CONTEXT_TOKENS) if shape.opaque or shape.turns else 0
    first_input = max(shape.input, context) if shape.opaque else shape.input
    output = shape.output
    tokens = min(MAX_BOUND_TOKENS, first_input + output + shape.turns * (context + output))
    priced, rates = _priced(everyone, at)
    if not rates or not (type(body) is dict or isinstance(body, Mapping)):
        return Bound(0.0, tokens)
    # USD per million tokens times tokens: exact in floats for any real rate and size; divided once.
    cost = _highest_turn_cost(rates, first_input, output)
    if shape.turns:
        cost += shape.turns * _highest_turn_cost(rates, context, output)
    cost = cost / 1e6 * _multiplier(catalog, priced, body.get("speed") == "fast")
    if shape.searches and catalog.rates.web_search_per_request is not None:
        cost += shape.searches * float(catalog.rates.web_search_per_request)
    return Bound(min(cost, float(MAX_BOUND_TOKENS)), tokens)


# Values worked out from catalogue objects (immutable; a reload makes new ones), keyed by their ids and kept
# with them, so that a cached id always belongs to the object it was computed from; emptied when it grows.
_RATES: dict[int, tuple[tuple, tuple]] = {}
_BILLED: dict[Optional[str], tuple] = {}       # model -> (catalog, channel aliases, since, until, entries)
_FACTORS: dict[tuple, tuple[tuple, float]] = {}
# Body fields that can make a request more than one turn, or bring models or content of their own (_shape).
_NOT_PLAIN = frozenset(("tools", "mcp_servers", "fallbacks", "context_management", "compaction", "thread"))
_PLAIN: dict[tuple, tuple] = {}       # (catalog, entries, fast) ids -> (catalog, entries, since, until, rates, factor)
_CACHED_MAX = 4096


def _cached(cache: dict, key: Any, objects: tuple, compute: Callable[..., Any]) -> Any:
    """compute(*objects), remembered under `key` while those very objects are the ones cached."""
    hit = cache.get(key)
    if hit is not None and all(map(operator.is_, hit[0], objects)):
        return hit[1]
    if len(cache) >= _CACHED_MAX:
        cache.clear()
    value = compute(*objects)
    cache[key] = (objects, value)
    return value


def _plain_rates(catalog: Catalog, entries: tuple, fast: bool, at: float) -> tuple[list, float]:
    """The rates of the entries priced at `at` (per million, as _per_million) and their multiplier,
    remembered for these very objects while `at` stays between the moments, around it, at which one of
    their price rows comes into force."""
    hit = _PLAIN.get((id(catalog), id(entries), fast))
    if hit is not None and hit[0] is catalog and hit[1] is entries and hit[2] <= at < hit[3]:
        return hit[4], hit[5]
    since, until = float("-inf"), float("inf")
    for e in entries:
        since, until = _around(at, (row.effective_from for row in e.price_rows), since, until)
    priced, rates = _priced(entries, at)
    factor = _multiplier(catalog, priced, fast)
    if len(_PLAIN) >= _CACHED_MAX:
        _PLAIN.clear()
    _PLAIN[id(catalog), id(entries), fast] = (catalog, entries, since, until, rates, factor)
    return rates, factor


def _around(at: float, moments: Iterable[Optional[float]], since: float, until: float) -> tuple[float, float]:
    """(since, until) narrowed to the latest of `moments` at or before `at` and the first after it: the span
    around `at` in which what they mark (a price row coming into force, a retirement) does not change."""
    for moment in moments:
        if moment is not None:
            if moment <= at:
                since = max(since, moment)
            else:
                until = min(until, moment)
    return since, until


def _priced(entries: Iterable[ModelEntry], at: float) -> tuple[list, list]:
    """The entries with a price at `at`, and those prices' rates (as _per_million)."""
    priced, rates = [], []
    for e in entries:
        row = e.price_at(at)
        if row is not None:
            priced.append(e)
            rates.append(_per_million(row))
    return priced, rates


def _per_million(row) -> tuple[float, float, tuple[tuple[int, float, float], ...]]:
    """(highest input rate: plain, cache writes, cache reads; output rate; each prompt-size band's
    threshold and the same two), USD per million tokens."""
    return _cached(_RATES, id(row), (row,), _row_rates)


def _row_rates(row) -> tuple:
    rates = row.rates
    return (float(max(rates[f] for f in _INPUT_RATES)), float(rates["output"]),
            tuple((above, float(max(band[f] for f in _INPUT_RATES)), float(band["output"]))
                  for above, band in row.bands))


def _highest_turn_cost(rates: list, input_tokens: int, output_tokens: int) -> float:
    """One turn at the dearest of `rates`, USD per million."""
    if len(rates) == 1:
        return _turn_cost(rates[0], input_tokens, output_tokens)
    return max(_turn_cost(r, input_tokens, output_tokens) for r in rates)


def _turn_cost(rates: tuple, input_tokens: int, output_tokens: int) -> float:
    """One turn, USD per million: at the highest input rate and that of every prompt-size band the input
    could reach."""
    in_rate, out_rate, bands = rates
    for above, band_in, band_out in bands:
        if input_tokens > above:
            in_rate = max(in_rate, band_in)
            out_rate = max(out_rate, band_out)
    return input_tokens * in_rate + output_tokens * out_rate


def _multiplier(catalog: Catalog, entries: Sequence[ModelEntry], fast: bool) -> float:
    return _cached(_FACTORS, (fast, id(catalog), *map(id, entries)), (fast, catalog, *entries), _factor)


def _factor(fast: bool, catalog: Catalog, *entries: ModelEntry) -> float:
    factor = max((Decimal(1), *catalog.rates.service_tiers.values()))
    if fast:
        factor *= max((Decimal(1), *(e.fast_multiplier for e in entries if e.fast_multiplier is not None)))
    # Any geo's: the one upstream reports (a workspace's default) is billed, whether the body names one or not.
    factor *= max((Decimal(1), *(m for e in entries for m in e.geo_multipliers.values())))
    return float(factor)


def _shape(body: Optional[Mapping[str, Any]], body_bytes: int) -> _Shape:
    shape = _Shape(input=max(0, body_bytes))
    if type(body) is not dict and not isinstance(body, Mapping):
        return shape
    max_tokens = body.get("max_tokens")
    shape.output = min(max_tokens, MAX_BOUND_TOKENS) if type(max_tokens) is int and max_tokens > 0 else 0
    loop = False
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        shape.input += TOOL_PROMPT_TOKENS
        for tool in tools:
            if type(tool) is not dict and not isinstance(tool, Mapping):
                continue
            kind = tool.get("type")
            uses = tool.get("max_uses")
            uses = min(uses, MAX_USES) if type(uses) is int and uses > 0 else SERVER_LOOP_TURNS
            if isinstance(tool.get("model"), str):          # an advisor: its own calls, at its model
                shape.turns += uses
            if not isinstance(kind, str) or kind.startswith(_CLIENT_TOOL_PREFIXES):
                if isinstance(kind, str) and kind != "custom":
                    shape.input += TYPED_TOOL_TOKENS
                continue
            shape.input += TYPED_TOOL_TOKENS
            loop = True                                     # a server tool: web search, fetch, code...
            if kind.startswith("web_search"):
                shape.searches += uses
    if body.get("mcp_servers"):
        shape.opaque = loop = True
    if loop:
        shape.turns += SERVER_LOOP_TURNS - 1
    fallbacks = body.get("fallbacks")
    if isinstance(fallbacks, list):
        shape.turns += len(fallbacks)
    elif fallbacks == "default":
        shape.turns += 1
        shape.any_model = True
    thread = body.get("thread")
    if thread is not None and not (isinstance(thread, Mapping) and thread.get("type") == "create"):
        shape.opaque = True         # continuing a server-held conversation: its history is input too
    if body.get("compaction") or _compacts(body.get("context_management")):
        shape.turns += 1
    images = _sources(body.get("messages"), shape)
    shape.input += images * IMAGE_TOKENS
    if (isinstance(tools, list) and tools) or (isinstance(fallbacks, list) and fallbacks):
        shape.models = billed_extras(body)[1]  # the models tools and fallbacks name, as model_policy prices them
    return shape


def _compacts(config: Any) -> bool:
    """Whether `context_management` may add a compaction turn: a `compact_*` edit, or edits this code cannot
    read.  Clearing old tool uses or thinking (`clear_*` edits) only drops context: no turn."""
    if not config:
        return False
    edits = config.get("edits") if isinstance(config, Mapping) else None
    if not isinstance(edits, list):
        return True
    return any(not (isinstance(e, Mapping) and isinstance(e.get("type"), str) and e["type"].startswith("clear_"))
               for e in edits)


def _sources(blocks: Any, shape: _Shape) -> int:
    """Images among `blocks` (messages, content, tool results, documents' content); a PDF or a
    document given by URL or file id marks the shape opaque."""
    images = 0
    if not isinstance(blocks, list):
        return 0
    for block in blocks:
        if type(block) is not dict and not isinstance(block, Mapping):
            continue
        content = block.get("content")
        if isinstance(content, list):
            images += _sources(content, shape)
        kind = block.get("type")
        source = block.get("source")
        if kind == "image":
            images += 1             # a small or well-compressed image has more tokens than bytes
        elif kind == "container_upload" or (kind == "document" and source is not None and isinstance(source, Mapping)
                                            and source.get("type") in ("url", "file", "base64")):
            shape.opaque = True     # a PDF's pages are tokens of their own, whatever its size
        if source is not None and isinstance(source, Mapping) and isinstance(source.get("content"), list):
            images += _sources(source["content"], shape)
    return images
