"""Which addresses a tenant-registered http worker endpoint may have.

The orchestrator POSTs dispatches from inside its own network (a Lambda's VPC, a host with a
metadata service at 169.254.169.254): an endpoint a tenant chooses must not point there. An
endpoint is refused when its host is, or resolves to, any address that is not public:
loopback, link-local, private (RFC 1918, fc00::/7), unspecified, multicast, reserved or
otherwise not globally routable. The check runs at registration and again before each
dispatch, since a name's DNS answer can change after it was registered.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Resolver", "address_problem", "endpoint_problem"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_problem(address: IPAddress) -> str | None:
    """The kind of non-public address this is ("loopback", "private", ...), or None if public."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address written as IPv6 reaches the IPv4 host: judge that one.
        embedded = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        )
        if embedded is not None:
            return address_problem(embedded)
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def _resolve(host: str, port: int) -> Sequence[str]:
    infos: list[Any] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def endpoint_problem(url: str, *, allow_private: bool, resolve: Resolver | None = None) -> str | None:
    """Why an http worker endpoint must not be used, or None when it may be.

    Only http and https are allowed. With `allow_private` (TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS)
    any host is; otherwise the host and every address it resolves to must be public, and a host
    that does not resolve is refused (it could not be checked).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "it is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "only http and https endpoints are allowed"
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if allow_private:
        return None
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        kind = address_problem(literal)
        return None if kind is None else f"{host} is a {kind} address"
    try:
        addresses = (resolve or _resolve)(host, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        return f"the host {host} does not resolve ({type(exc).__name__})"
    if not addresses:
        return f"the host {host} does not resolve"
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return f"the host {host} resolves to {text!r}, which is not an IP address"
        kind = address_problem(address)
        if kind is not None:
            return f"the host {host} resolves to {address}, a {kind} address"
    return None
