"""The client's address behind reverse proxies.

A request's peer is the client unless it is one of the configured trusted
proxies (`[server] trusted_proxies`, CIDRs).  Then the addresses in
`Forwarded` (RFC 7239 `for=`) or, without it, `X-Forwarded-For` are read
right to left, skipping trusted proxies: the first address that is not one is
the client.  Everything left of it may have been written by the client, so it
is never believed; a header from a peer that is not trusted is ignored
altogether (anyone can send one).
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_networks(cidrs: Iterable[str]) -> list[Network]:
    """CIDRs (or single addresses) -> networks; ValueError names a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except (ValueError, TypeError):
            raise ValueError(f"not a network address: {cidr!r} (expected a CIDR such as 10.0.0.0/8)") \
                from None
    return networks


def _address(text: str) -> Optional[Address]:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _peer_host(client: str) -> str:
    """"1.2.3.4:5678" / "::1:5678" (the peer as the HTTP layer records it) -> the host."""
    host, sep, port = client.rpartition(":")
    return host if sep and port.isdigit() else client


def _forwarded_for(value: str) -> list[str]:
    """The `for=` hosts of a Forwarded header, in order, without quotes, brackets or ports."""
    hosts = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, node = pair.strip().partition("=")
            if name.strip().lower() != "for":
                continue
            node = node.strip().strip('"')
            if node.startswith("["):
                node = node[1:node.find("]")] if "]" in node else node[1:]
            elif node.count(":") == 1:
                node = node.partition(":")[0]
            hosts.append(node)
    return hosts


class ClientAddress:
    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted = parse_networks(trusted)

    def is_trusted(self, address: Optional[Address]) -> bool:
        return address is not None and any(address in network for network in self.trusted)

    def resolve(self, client: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The client address to record for a request from peer `client` with these headers."""
        if not self.is_trusted(_address(_peer_host(client))):
            return client
        forwarded = [v.decode("latin-1") for k, v in headers if k == b"forwarded"]
        if forwarded:
            hops = _forwarded_for(",".join(forwarded))
        else:
            hops = [h.strip() for k, v in headers if k == b"x-forwarded-for"
                    for h in v.decode("latin-1").split(",")]
        chosen = client
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break           # garbage (or "unknown"): the last hop we could read stands
            chosen = str(address)
            if not self.is_trusted(address):
                break
        return chosen
