"""What the gateway decides about a model before a request goes upstream.

- A retired model is answered here, not sent upstream to fail: a channel whose
  own alias sends the name to a live model serves it as usual; else it goes to
  the successor the operator chose (`prices set OLD --successor NEW`), or, when
  the client used one of its aliases, to its documented successor (the response
  says so); otherwise 404 `not_found_error` naming the successor.
- A deprecated model is served with a header giving its end-of-life date.
- A model without a price is refused (fail closed) unless the operator allowed
  unpriced models (setting `allow_unpriced`, or channel option of that name);
  even then a key with a USD quota is refused, since its spend cannot be counted.
  The same holds for fast mode on a model without a fast-mode price and for a
  model named by a tool (an advisor) or a fallback that has no price.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import GatewayError
from ..plugin_api import Caller, Channel
from ..store.catalog import Catalog

REDIRECT_HEADER = b"apertis-model-redirected"
DEPRECATED_HEADER = b"apertis-model-deprecated"
_MAX_HOPS = 8


@dataclass(slots=True)
class Resolution:
    model: Optional[str]                        # the name to route and send upstream
    headers: list = field(default_factory=list)  # response headers telling the client why
    error: Optional[GatewayError] = None        # a retired model with nowhere to go

    @property
    def redirected(self) -> bool:
        return any(name == REDIRECT_HEADER for name, _ in self.headers)


def _day(stamp: Optional[str]) -> str:
    return (stamp or "")[:10] or "an earlier date"


def resolve(catalog: Catalog, name: Optional[str], now: float) -> Resolution:
    """Where a request for `name` goes by the catalogue (channels' own aliases aside: see `pinned`)."""
    resolution = Resolution(name)
    current = name
    for _ in range(_MAX_HOPS):
        entry = catalog.lookup(current)
        if entry is None or current is None:
            return resolution
        state = entry.lifecycle_at(now)
        if state == "deprecated":
            note = f"{entry.id} is deprecated; end of life {_day(entry.retires_at)}"
            if entry.successor:
                note += f"; successor {entry.successor}"
            resolution.headers.append((DEPRECATED_HEADER, note.encode()))
            return resolution
        if state != "retired":
            return resolution
        target = entry.redirect_to or (entry.successor if current in entry.aliases else None)
        if not target:
            hint = (f"; its successor is {entry.successor}" if entry.successor else "")
            resolution.error = GatewayError(
                404, f"model: {current} was retired on {_day(entry.retires_at)}{hint}", "not_found_error")
            return resolution
        resolution.headers.append((REDIRECT_HEADER, (
            f"{current} -> {target} ({entry.id} retired {_day(entry.retires_at)})").encode()))
        resolution.model = current = target
    return resolution


def pinned(catalog: Catalog, channels: Sequence[Channel], name: Optional[str], now: float) -> list[Channel]:
    """The channels whose own alias sends `name` (a retired model's name) to a model that is not retired."""
    kept = []
    for channel in channels:
        entry = catalog.lookup(channel.upstream_model(name)) if name else None
        if entry is None or entry.lifecycle_at(now) != "retired":
            kept.append(channel)
    return kept


def billed_extras(body) -> tuple[bool, tuple[str, ...]]:
    """What a request body asks for that is priced apart from its model's token rates:
    fast mode (`speed: "fast"`), and the models its tools and fallbacks name (an advisor's or
    a fallback's turns are billed at that model's rates)."""
    if not isinstance(body, dict):
        return False, ()
    named = tuple(m for entries in (body.get("tools"), body.get("fallbacks")) if isinstance(entries, list)
                  for m in (e.get("model") for e in entries if isinstance(e, dict)) if isinstance(m, str))
    return body.get("speed") == "fast", named


def refuse_named_models(catalog: Catalog, body, caller: Caller) -> None:
    """403 for a model a tool or a fallback names that the caller's allow-list leaves out (an advisor's or a
    fallback's turns are billed at that model's rates); and for `fallbacks: "default"`, with which the API
    chooses the model, from a caller with an allow-list."""
    if caller.models is None or not isinstance(body, dict):
        return
    if body.get("fallbacks") == "default":
        raise GatewayError(403, f'fallbacks: "default" lets the API choose the fallback model; API key '
                                f"'{caller.key_name}' may use only: {', '.join(sorted(caller.models))}",
                           "permission_error")
    for name in billed_extras(body)[1]:
        entry = catalog.lookup(name)
        if not caller.may_use(name, (entry.id, *entry.aliases) if entry is not None else ()):
            raise GatewayError(403, f"API key '{caller.key_name}' may not use model '{name}' (named by a tool "
                                    f"or a fallback); it may use: {', '.join(sorted(caller.models))}",
                               "permission_error")


def _unpriced_part(catalog: Catalog, upstream: Optional[str], model: Optional[str], fast: bool,
                   tool_models: Sequence[str], now: float) -> Optional[str]:
    """What of this request has no price (None when all of it is priced)."""
    entry = catalog.lookup(upstream) or catalog.lookup(model)
    if entry is None or entry.price_at(now) is None:
        return f"model: {upstream} has no price in this gateway's catalogue"
    if fast and entry.fast_multiplier is None:
        return f"speed: fast mode on {entry.id} has no price in this gateway's catalogue"
    for name in tool_models:
        tool_entry = catalog.lookup(name)
        if tool_entry is None or tool_entry.price_at(now) is None:
            return f"model {name}, named by a tool or a fallback, has no price in this gateway's catalogue"
    return None


def admit_unpriced(catalog: Catalog, channels: Sequence[Channel], model: Optional[str], caller: Caller,
                   allow_unpriced: bool, now: float, body=None) -> list[Channel]:
    """The channels that may take `model` (and what `body` asks for) as far as billing goes;
    GatewayError if none."""
    fast, tool_models = billed_extras(body)
    admitted: list[Channel] = []
    refusal: Optional[GatewayError] = None
    for channel in channels:
        upstream = channel.upstream_model(model) if model else model
        missing = _unpriced_part(catalog, upstream, model, fast, tool_models, now)
        how = (f"an operator can price it with `apertis-proxy prices set {upstream} --input USD --output USD` "
               "(per million tokens)" if missing and missing.startswith("model:") else
               "an operator can price it with `apertis-proxy prices set` or `apertis-proxy prices import FILE`")
        if missing is None:
            admitted.append(channel)
        elif not (allow_unpriced or channel.options.get("allow_unpriced")):
            refusal = refusal or GatewayError(400, f"{missing}, so it cannot be billed; {how}",
                                              "invalid_request_error")
        elif caller.cost_limited:
            refusal = refusal or GatewayError(
                402, f"{missing} and API key '{caller.key_name}' has a USD quota, so its spend could not be "
                     f"counted; {how}", "billing_error", {"x-should-retry": "false"})
        else:
            admitted.append(channel)
    if not admitted and refusal is not None:
        raise refusal
    return admitted
