"""GET /metrics of a gateway, read with prometheus_client's own parser into {(name, labels): value}."""
from __future__ import annotations

from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from .rawhttp import RawConnection

Samples = dict[tuple[str, frozenset], float]


def parse(text: str, parser=text_string_to_metric_families) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in parser(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(base_url: str, accept: Optional[str] = None) -> tuple[int, str, str]:
    host, port = base_url.removeprefix("http://").split(":")
    async with await RawConnection.open(host, int(port)) as conn:
        response = await conn.request("GET", "/metrics", {"accept": accept} if accept else {})
    return response.status, response.header("content-type") or "", response.body.decode()


async def scrape_samples(base_url: str) -> Samples:
    status, _, text = await scrape(base_url)
    assert status == 200, text
    return parse(text)
