"""Which web addresses the app may download from: the checks on one URL, before any byte.

Catalog links come from users, so every one is hostile until checked: only http(s), no
credentials, and the host name is resolved here and refused when ANY answer lies inside
the company network (private, loopback, link-local, multicast, reserved, carrier-grade NAT,
in every IPv6 form that carries an IPv4 address). An installation whose photos live on an
internal server names it in ``CATALOG_LENS_ALLOWED_HOSTS`` (host names, IP addresses or
networks, comma-separated, e.g. ``"intranet.example.com,10.0.0.0/8"``); link-local addresses
(169.254.0.0/16 and fe80::/10, where cloud metadata services answer) are refused even
then. :class:`core.inputs.fetch.Fetcher` connects to exactly the address :func:`vet`
returned and checks every redirect hop again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

__all__ = ["ALLOWED_HOSTS_ENV", "NameNotFound", "Target", "UrlRefused", "parse_allowed_hosts", "split_url", "vet"]

ALLOWED_HOSTS_ENV = "CATALOG_LENS_ALLOWED_HOSTS"


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``"intranet.example.com, 10.0.0.0/8"`` -> the entries, lower-case (empty: none)."""
    return tuple(e.strip().lower().strip("[]") for e in text.replace(";", ",").split(",") if e.strip())


def env_allowed_hosts() -> tuple[str, ...]:
    """The allow-list the installation configured (``CATALOG_LENS_ALLOWED_HOSTS``)."""
    return parse_allowed_hosts(os.environ.get(ALLOWED_HOSTS_ENV, ""))


class UrlRefused(ValueError):
    """An address this app will not download from; ``str()`` says why in plain words."""


class NameNotFound(OSError):
    """The host name has no address (a plain sentence)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    path: str
    address: str  # the vetted IP to connect to

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str, policy) -> tuple[str, str, int, str]:
    """Static checks that need no network: scheme, credentials, host, port syntax."""
    if not isinstance(url, str) or not url.strip():
        raise UrlRefused("the address is empty")
    url = url.strip()
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        raise UrlRefused("the address contains spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        allowed = " and ".join(policy.allowed_schemes)
        raise UrlRefused(f"only {allowed} addresses can be downloaded (this one starts with '{scheme or '?'}:')")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("addresses with a user name or password in them are not allowed")
    if not parts.hostname:
        raise UrlRefused("the address has no server name")
    try:
        port = parts.port
    except ValueError:
        raise UrlRefused("the address has an invalid port number") from None
    port = port or (443 if scheme == "https" else 80)
    try:
        host = parts.hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UrlRefused("the server name in the address is not valid") from None
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return scheme, host, port, path


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 form that carries one (mapped, 6to4, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    embedded = ip.ipv4_mapped or ip.sixtofour
    if embedded is None and ip in _NAT64:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return embedded


def is_link_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """169.254.0.0/16 or fe80::/10 (the cloud metadata service lives there), in any form."""
    inner = _embedded(ip)
    return ip.is_link_local or (inner is not None and inner.is_link_local)


def _is_allowed(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: Iterable[str]) -> bool:
    """Whether the allow-list names this host or an address range holding ``ip``."""
    for entry in allowed:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name that is not this one
    return False


def is_private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # IPv6 forms that carry an IPv4 address inside are judged by that address.
    embedded = _embedded(ip)
    if embedded is not None and is_private(embedded):
        return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global  # e.g. 100.64.0.0/10 carrier-grade NAT
    )


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]  # an IP literal needs no DNS
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (UnicodeError, OSError):
        infos = []
    addresses = []
    for info in infos:
        with contextlib.suppress(ValueError):
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    if not addresses:
        raise NameNotFound(f"the server name '{host}' could not be found")
    return addresses


def vet(url: str, policy) -> Target:
    """Resolve and check one hop; returns the single address to connect to."""
    scheme, host, port, path = split_url(url, policy)
    addresses = _resolve(host, port)
    # Refuse if ANY answer is private: an attacker's DNS may mix public and private ones.
    if any(is_link_local(a) for a in addresses):  # never, whatever the allow-list says
        raise UrlRefused("addresses inside the company network are not allowed")
    exempt = all(_is_allowed(host, a, policy.allowed_hosts) for a in addresses)
    if not exempt and any(is_private(a) for a in addresses):
        raise UrlRefused("addresses inside the company network are not allowed")
    if not exempt and port not in policy.allowed_ports:
        raise UrlRefused(f"only the standard web ports are allowed (this address uses port {port})")
    return Target(scheme, host, port, path, str(addresses[0]))
