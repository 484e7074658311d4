"""The client's address behind reverse proxies.

A request's peer is the client unless it is one of the configured trusted
proxies (`[server] trusted_proxies`, CIDRs).  Then the addresses in the header
the proxies write (`[server] forwarded_header`: `X-Forwarded-For` by default,
or RFC 7239 `Forwarded` `for=`) are read right to left, skipping trusted
proxies: the first address that is not one is the client.  Everything left of
it may have been written by the client, so it is never believed; the other
header, which a proxy passes through untouched, is never read; a hop that is no
address (`unknown`, an obfuscated `_name`, garbage) makes the client unknown.
A header from a peer that is not trusted is ignored altogether (anyone can
send one).

Peers are written "1.2.3.4:5678" and "[::1]:5678"; a forwarded client is its
bare address ("203.0.113.5", "2001:db8::5"): `host_of` reads either.
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


# The client of a request whose forwarded chain has a hop that is no address.
UNKNOWN = "unknown"
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


def host_of(client: str) -> str:
    """The host of a client as the gateway records it: a peer "1.2.3.4:5678" or "[v6]:5678",
    or a forwarded client's bare address."""
    if client.startswith("["):
        end = client.find("]")
        return client[1:end] if end > 0 else client
    if client.count(":") == 1:
        return client.partition(":")[0]
    return client


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
    def __init__(self, trusted: Iterable[str], header: str = "x-forwarded-for") -> None:
        self.trusted = parse_networks(trusted)
        self.header = header.encode()

    def is_trusted(self, address: Optional[Address]) -> bool:
        return address is not None and any(address in network for network in self.trusted)

    def resolve(self, client: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The client address to record for a request from peer `client` with these headers."""
        if not self.is_trusted(_address(host_of(client))):
            return client
        values = [v.decode("latin-1") for k, v in headers if k == self.header]
        if self.header == b"forwarded":
            hops = _forwarded_for(",".join(values))
        else:
            hops = [h.strip() for v in values for h in v.split(",")]
        chosen = client
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return UNKNOWN      # the client is beyond a hop nobody can name
            chosen = str(address)
            if not self.is_trusted(address):
                break
        return chosen
