"""A client reaching the main port from a non-loopback address of this machine (IPv4, or IPv6 on a `::`
listener) is refused /metrics by default (403, while the rest of the gateway serves it), and let in once
`[metrics] allow` lists its network; a loopback client on the same listener is let in."""
from __future__ import annotations

import socket

import pytest

from tests.support.rawhttp import RawConnection

# (family, an address outside this machine to route towards, the listener's host, loopback)
FAMILIES = {"ipv4": (socket.AF_INET, "198.51.100.1", None, None), "ipv6": (socket.AF_INET6, "2001:db8::1", "::", "::1")}


def own_address(family: int, outside: str) -> str:
    """This machine's address on the way to `outside` (no packet is sent); skip where it has only loopback."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((outside, 9))
            address = probe.getsockname()[0]
    except OSError:
        address = ""
    if not address or address.startswith("127.") or address in ("::1", "::"):
        pytest.skip("no non-loopback address of this family")
    return address


async def get(address: str, port: int, path: str) -> int:
    async with await RawConnection.open(address, port) as conn:
        return (await conn.request("GET", path)).status


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_a_non_loopback_client_is_refused_metrics_unless_allowed(gateway_env, mock_upstream, family):
    kind, outside, host, loopback = FAMILIES[family]
    address = own_address(kind, outside)
    gateway_env.add_channel("main", mock_upstream)
    gateway = await gateway_env.start(host=host or address)
    assert await get(address, gateway.port, "/metrics") == 403
    assert await get(address, gateway.port, "/health") == 200
    if loopback:
        assert await get(loopback, gateway.port, "/metrics") == 200
    await gateway_env.stop()

    prefix = 32 if kind == socket.AF_INET else 128
    gateway = await gateway_env.start(host=host or address, metrics_allow=[f"{address}/{prefix}"])
    assert await get(address, gateway.port, "/metrics") == 200
