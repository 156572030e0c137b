"""Which addresses the relay may connect to (docs/design.md, "SSRF").

Affiliates type the callback URLs and the relay runs inside the store's network, so a URL
must not reach anything private: the database next door, the cloud's metadata service, a
router's admin page. The check is made on the address a socket is about to connect to
(`SocketFactory`), after every name resolution and for every redirect hop, so no spelling
of a host and no DNS answer that changes between a check and a connect gets past it.
Names are also filtered as they resolve (`PolicyResolver`), so that a name with a public
and a private address uses the public one, and fails as it would, if it fails. Saving a
callback whose host is a refused literal address fails earlier, with a message a person
can act on (`host_refusal`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import AddrInfoType, ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_N = ipaddress.ip_network

REFUSED_IPV4: tuple[tuple[Network, str], ...] = (
    (_N("0.0.0.0/8"), "unspecified"),
    (_N("10.0.0.0/8"), "private"),
    (_N("100.64.0.0/10"), "shared (CGNAT)"),
    (_N("127.0.0.0/8"), "loopback"),
    (_N("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_N("172.16.0.0/12"), "private"),
    (_N("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_N("192.0.2.0/24"), "documentation"),
    (_N("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_N("192.168.0.0/16"), "private"),
    (_N("198.18.0.0/15"), "benchmarking"),
    (_N("198.51.100.0/24"), "documentation"),
    (_N("203.0.113.0/24"), "documentation"),
    (_N("224.0.0.0/4"), "multicast"),
    (_N("240.0.0.0/4"), "reserved"),
)
"""Every IPv4 range of the IANA special-purpose registry that is not reachable on the
public internet, with the name a refusal gives it."""

REFUSED_IPV6: tuple[tuple[Network, str], ...] = (
    (_N("::/128"), "unspecified"),
    (_N("::1/128"), "loopback"),
    (_N("64:ff9b:1::/48"), "private (local-use NAT64)"),
    (_N("100::/64"), "reserved (discard-only)"),
    (_N("2001::/23"), "reserved (IETF protocol assignments, Teredo)"),
    (_N("2001:db8::/32"), "documentation"),
    (_N("3fff::/20"), "documentation"),
    (_N("fc00::/7"), "private (unique local)"),
    (_N("fe80::/10"), "link-local"),
    (_N("fec0::/10"), "reserved (site-local)"),
    (_N("ff00::/8"), "multicast"),
)
"""IPv6 ranges refused by name; anything outside global unicast (2000::/3) is refused as
reserved too. IPv4-mapped, NAT64 and 6to4 addresses are judged by the IPv4 address they
carry (`embedded_ipv4`)."""

_GLOBAL_UNICAST = _N("2000::/3")
_NAT64 = _N("64:ff9b::/96")
_LOCALHOST = re.compile(r"(?:.+\.)?localhost\.?", re.IGNORECASE)
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where a connect would reach it:
    IPv4-mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::`)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def refusal(address: IPAddress, allowed: Sequence[Network] = ()) -> str | None:
    """Why the relay must not connect to `address` (e.g. "loopback"), or None if it may.

    An allow-list entry opens the address itself, and its IPv4-mapped form, which reaches
    the same socket; not the NAT64 or 6to4 forms, which reach another machine.
    """
    opened = (address, address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None)
    if any(candidate in net for candidate in opened if candidate for net in allowed):
        return None
    inner = embedded_ipv4(address)
    if inner is not None:
        reason = _refused(inner)
        return None if reason is None else f"{reason}: {inner} in IPv6 form"
    return _refused(address)


def _refused(address: IPAddress) -> str | None:
    table = REFUSED_IPV4 if isinstance(address, ipaddress.IPv4Address) else REFUSED_IPV6
    for network, reason in table:
        if address in network:
            return reason
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def literal_host(host: str) -> IPAddress | None:
    """The address a URL's host is, in any spelling `getaddrinfo` reads as one.

    Besides the canonical forms: IPv4 written as one number (`2130706433`), in hex
    (`0x7f000001`) or octal (`0177.0.0.1`), shortened (`127.1`), with a trailing dot.
    `host` is as a URL parser gives it: IPv6 without brackets.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    bare = host.removesuffix(".")
    # inet_aton reads every legacy IPv4 spelling, as getaddrinfo does with such a host; it
    # also reads a lone number, which URL parsers take for an address as well.
    if bare and all(part.isalnum() and part.isascii() for part in bare.split(".")):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def host_refusal(host: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why a URL whose host is `host` must not be requested, known without asking DNS: the
    host is a refused address in some spelling, or `localhost` or a name under it, which
    resolvers answer with loopback (RFC 6761). None when only resolving can tell."""
    literal = _LOOPBACK if _LOCALHOST.fullmatch(host) else literal_host(host)
    reason = None if literal is None else refusal(literal, allowed)
    if literal is None or reason is None:
        return None
    spelled = "" if host == str(literal) else f" (that is {literal})"
    return explain(f"the URL's host {host}{spelled}", reason)


def parse_networks(text: str) -> tuple[Network, ...]:
    """`POSTBACK_ALLOW_NETWORKS`: CIDRs separated by commas or spaces; a bare address is one
    host. Raises ValueError naming the entry that is not a network."""
    networks: list[Network] = []
    for entry in re.split(r"[,\s]+", text.strip()):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            raise ValueError(_not_a_network(entry)) from None
    return tuple(networks)


def _not_a_network(entry: str) -> str:
    try:
        meant = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return (
            f"{entry!r} is not a network; write CIDRs such as 10.1.2.0/24 or 127.0.0.1/32, "
            "separated by commas"
        )
    return f"{entry!r} is not a network, its host bits are set; did you mean {meant}?"


def legacy_spelling(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address `host` spells in a legacy form (`2130706433`, `0177.0.0.1`,
    `127.1`), which HTTP clients may refuse to request; None for a canonical one or a name."""
    literal = literal_host(host)
    if isinstance(literal, ipaddress.IPv4Address) and host != str(literal):
        return literal
    return None


def host_problem(host: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why a URL with this host is refused when it is configured (a callback's, the ops
    webhook's), or None: the SSRF policy refuses it, or it spells an address in a legacy
    form, which HTTP clients refuse, so that every request would fail."""
    refused = host_refusal(host, allowed)
    if refused is not None:
        return refused
    legacy = legacy_spelling(host)
    if legacy is not None:
        return f"the URL's host {host} means {legacy}; write the address as {legacy}"
    return None


class BlockedAddress(OSError):
    """A connect the SSRF policy refused. Every instance has the same text, so that when all
    of a name's addresses are refused, the connector reports this error and not a mix."""

    def __init__(self, address: IPAddress | str, reason: str) -> None:
        super().__init__("address refused by the SSRF policy")
        self.address = address
        self.reason = reason

    @property
    def detail(self) -> str:
        return explain(str(self.address), self.reason)


def explain(subject: str, reason: str) -> str:
    """One line for a person: what was refused, why, and the way to allow it."""
    return (
        f"{subject} is a refused address ({reason}); the relay only sends to public "
        "addresses unless POSTBACK_ALLOW_NETWORKS allows it"
    )


@dataclass(frozen=True, slots=True)
class SocketFactory:
    """aiohttp's `socket_factory`: makes the socket for one resolved address, or refuses."""

    allowed: tuple[Network, ...]

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        _check(str(sockaddr[0]), self.allowed)
        return socket.socket(family, type_, proto)


def _check(text: str, allowed: Sequence[Network]) -> None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        # An address a redirect made up (`[fe80::1%25%25]`) that cannot be read cannot be
        # judged either: refused, and as an OSError, which the connector reports as a failure.
        raise BlockedAddress(text, "unreadable") from None
    reason = refusal(address, allowed)
    if reason is not None:
        raise BlockedAddress(address, reason)


class PolicyResolver(AbstractResolver):
    """Name resolution without the refused addresses, so aiohttp tries only allowed ones.

    Without it, a name answering with a private and a public address would fail with
    whichever error came last: `blocked_address` (dead at once) when the public address is
    briefly unreachable and the private one happened to be tried last. All refused: the
    first refusal is the answer.
    """

    def __init__(self, allowed: tuple[Network, ...], inner: AbstractResolver | None = None) -> None:
        self.allowed = allowed
        # The system's getaddrinfo, in a thread; it holds nothing that needs closing, as the
        # session does not close a resolver it was given.
        self.inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: BlockedAddress | None = None
        for answer in answers:
            try:
                _check(answer["host"], self.allowed)
            except BlockedAddress as exc:
                refused = refused or exc
            else:
                kept.append(answer)
        if not kept and refused is not None:
            raise refused
        return kept

    async def close(self) -> None:
        await self.inner.close()
