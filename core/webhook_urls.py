"""Which URLs a webhook may be sent to, so that a project's endpoint cannot turn the workers into a proxy into the
service's own network.

    scheme http or https, a host, no user:password@  ->  every address the host resolves to is checked:
      link-local (169.254.0.0/16, fe80::/10: cloud metadata), unspecified, multicast   refused, always
      public (globally routable)                                                       allowed
      loopback, private, shared, unique-local, reserved ...                            only if QLORA_WEBHOOK_ALLOWED_NETWORKS
                                                                                       names a CIDR holding it or the host

The check runs when an endpoint is created or changed (a 400 naming `url`) and again before every attempt, on a
fresh resolution whose checked address is the one connected to (core/webhooks.py), so a name that resolves to a
public address at creation and to an internal one later (DNS rebinding) is refused at delivery.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class UrlRefused(ValueError):
    """A webhook URL the policy refuses; the message says why."""


@dataclass(frozen=True)
class AllowList:
    """QLORA_WEBHOOK_ALLOWED_NETWORKS parsed: CIDRs (an address alone is a /32 or /128) and host names."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, setting: str) -> AllowList:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for item in (part.strip() for part in setting.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def admits(self, host: str, address: IPAddress) -> bool:
        return host.lower().rstrip(".") in self.hosts or any(address in network for network in self.networks)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (getaddrinfo, both families)."""
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def parse_url(url: str) -> SplitResult:
    """The URL's parts, if its form is acceptable: http(s), a host, no credentials, a valid port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"Invalid URL: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("A webhook URL must be http:// or https://.")
    if not parts.hostname:
        raise UrlRefused("A webhook URL must name a host.")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("A webhook URL must not carry a user name or password.")
    if port == 0:
        raise UrlRefused("Invalid URL: port 0.")
    return parts


def check_address(host: str, address: IPAddress, allow: AllowList) -> None:
    """Refuse `address` (one of `host`'s) unless the policy above admits it."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    if address.is_link_local:
        raise UrlRefused(f"{host} resolves to {address}, a link-local address (cloud metadata); webhooks never go there.")
    if address.is_unspecified or address.is_multicast:
        raise UrlRefused(f"{host} resolves to {address}, which is not a host's address.")
    if address.is_global:
        return
    if not allow.admits(host, address):
        kind = "a loopback" if address.is_loopback else "a private or reserved"
        raise UrlRefused(f"{host} resolves to {address}, {kind} address, which QLORA_WEBHOOK_ALLOWED_NETWORKS does not allow.")


def checked_addresses(url: str, allowed_networks: str, resolver: Resolver | None = None) -> tuple[SplitResult, list[str]]:
    """The URL's parts and the addresses its host resolves to now, each checked; `UrlRefused` if the URL's form, its
    resolution or any one of its addresses is refused (a name with one internal address among public ones is refused
    whole: the connection could go to any of them)."""
    parts = parse_url(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)]
    else:
        try:
            found = (resolver or _resolver)(host, port)
        except OSError as exc:
            raise UrlRefused(f"Could not resolve {host}: {exc.strerror or exc}.") from None
        except (UnicodeError, ValueError):  # a name IDNA cannot encode (an empty or overlong label)
            raise UrlRefused(f"Invalid host name: {host!r}.") from None
        if not found:
            raise UrlRefused(f"Could not resolve {host}.")
    allow = AllowList.parse(allowed_networks)
    for address in found:
        check_address(host, ipaddress.ip_address(address.split("%", 1)[0]), allow)
    return parts, found


# The resolver the checks use; tests replace it to play a name whose answer changes (DNS rebinding).
_resolver: Resolver = system_resolver
