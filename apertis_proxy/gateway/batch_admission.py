"""The rules /v1/messages applies to a body, applied to every request of a batch create.

Each request's params are validated like a Messages body (`billing_policy`
included), its model resolved by model_policy (a retired model goes to its
successor or is refused), the ids it refers to checked against their owners
(ownership.py), and its model admitted for this key: a channel that serves it
and that the key may use, and a price (or an operator's leave to go unpriced).
A refusal answers the whole create and names the request (`requests[i]...`).

A key with a USD or token quota cannot create batches: a batch's cost is
known only when its results are fetched, so the quota could not stop it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import GatewayError
from ..http.request import Request
from ..http.responder import Responder
from ..plugin_api import Caller, Channel
from . import contract, model_policy
from .forward import request_info
from .ownership import references, resolve


@dataclass(slots=True)
class Admitted:
    requests: list                                  # the requests, each model as it goes upstream
    channels: list[Channel]                         # those serving every request, router's order
    headers: list = field(default_factory=list)     # model_policy's notices (deprecation, redirect)


def refuse_quota(caller: Caller) -> None:
    """403 for a key whose spend is capped: a batch is billed after it ran, past any cap."""
    if caller.cost_limited or caller.token_limited:
        raise GatewayError(403, f"API key '{caller.key_name}' has a USD or token quota, and a batch's cost is "
                                f"known only when its results are fetched, so the quota could not hold it; "
                                f"send these requests to /v1/messages instead", "permission_error")


def named(i: int, e: GatewayError) -> GatewayError:
    """`e` about the params of request `i`."""
    return GatewayError(e.status, f"requests[{i}].params.{e.message}", e.error_type, e.headers,
                        error_code=e.error_code)


async def admit(fw: Any, req: Request, resp: Responder, caller: Caller, requests: list, now: float) -> Admitted:
    """The batch's requests and channels once every request passed; GatewayError naming the first refused."""
    served: dict[str, tuple[str, list[Channel], list]] = {}
    accounts: set[str] = set()
    admitted = Admitted([], [])
    for i, item in enumerate(requests):
        params = item["params"]
        try:
            contract.validate(params, thinking_budget_max=fw.settings.thinking_budget_max)
            refs = references(params) if fw.owned is not None else []
            account = await resolve(fw.owned, refs, caller) if refs else None
            model = params["model"]
            model_policy.refuse_named_models(fw.catalog.catalog, params, caller)
            if model not in served:
                served[model] = await _serve(fw, req, resp, caller, model, now)
            if model_policy.billed_extras(params) != (False, ()):
                model_policy.admit_unpriced(fw.catalog.catalog, served[model][1], model, caller,
                                            fw.settings.allow_unpriced, now, params)
        except GatewayError as e:
            raise named(i, e) from None
        if account is not None:
            accounts.add(account)
        upstream, _, notices = served[model]
        admitted.headers += [h for h in notices if h not in admitted.headers]
        admitted.requests.append({**item, "params": {**params, "model": upstream}} if upstream != model else item)
    if len(accounts) > 1:
        raise GatewayError(400, "requests: they refer to threads, containers or files of different upstream "
                                "accounts, which no single channel can serve together")
    chosen: Optional[list[Channel]] = None
    for model in sorted(served):
        ids = {c.id for c in served[model][1]}
        chosen = served[model][1] if chosen is None else [c for c in chosen if c.id in ids]
    chosen = [c for c in chosen or () if not accounts or c.account in accounts]
    if not chosen:
        raise GatewayError(404, f"model: no channel serves every model of this batch "
                                f"({', '.join(sorted(served))}) for this key"
                                + (" on the account holding the state it refers to" if accounts else ""),
                           "not_found_error")
    admitted.channels = chosen
    return admitted


async def _serve(fw: Any, req: Request, resp: Responder, caller: Caller, model: str,
                 now: float) -> tuple[str, list[Channel], list]:
    """(the model as sent, the channels that may take it, notices) as /v1/messages decides them."""
    catalog = fw.catalog.catalog
    info = dataclasses.replace(request_info(req, resp, None), model=model)
    channels = list(await fw.plugins.route(info, caller) or [])
    resolved = model_policy.resolve(catalog, model, now)
    if resolved.redirected or resolved.error:
        channels = model_policy.pinned(catalog, channels, model, now)
        if channels:
            resolved = model_policy.Resolution(model)     # a channel alias decides
        elif resolved.error:
            raise resolved.error
        else:
            assert resolved.model is not None
            if caller.models is not None:                 # a key allowed the retired model may use its successor
                caller = dataclasses.replace(caller, models=caller.models | {resolved.model})
            info = dataclasses.replace(info, model=resolved.model)
            channels = list(await fw.plugins.route(info, caller) or [])
    sent = resolved.model or model
    if channels and not contract.is_claude_model_name(sent):
        channels = [c for c in channels if sent in c.aliases or (c.models is not None and sent in c.models)]
    if not channels:
        if not caller.may_use(sent):
            raise GatewayError(403, f"model: API key '{caller.key_name}' may not use model '{sent}'",
                               "permission_error")
        raise GatewayError(404, f"model: {sent} is not served by any channel for this key", "not_found_error")
    channels = model_policy.admit_unpriced(catalog, channels, sent, caller, fw.settings.allow_unpriced, now)
    return sent, channels, resolved.headers
