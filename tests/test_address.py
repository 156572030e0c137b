"""The SSRF policy (README, "What it refuses to connect to"): no spelling of a refused
address, no name that resolves to one and no redirect to one gets a connection, at save
time or delivery time.

Where the refused address is loopback, a real listener stands there and counts connections:
the same spelling with 127.0.0.1 allowed does reach it, so a refusal is the guard's doing
and not a URL that would have gone nowhere anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from yarl import URL

from ops.cli.demo import serve
from producer import Producer
from tests.support.events import event_data, save_callback
from tests.support.ports import free_port
from tests.support.receivers import ALLOW_NETWORKS, HostsFile, Receiver, raw_server
from tests.support.service import Api
from tests.support.workers import drain
from worker import address, callbacks, deliver
from worker.config import Settings
from worker.exchange import Outcome, Request

LOOPBACK_ONLY = address.parse_networks(ALLOW_NETWORKS)

# One address from every refused range, as the policy names it.
REFUSED = [
    ("0.0.0.0", "unspecified"),  # noqa: S104 -- an address under test; nothing binds it
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.254", "benchmarking"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b:1::1", "NAT64"),
    ("2002:7f00:1::1", "loopback"),
    ("2002:a00:1::", "private"),
    ("100::1", "discard"),
    ("2001::1", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("::7f00:1", "reserved"),
    ("5f00::1", "reserved"),
]

PUBLIC = [
    "1.1.1.1",
    "8.8.8.8",
    "100.63.255.255",
    "100.128.0.0",
    "172.32.0.1",
    "198.20.0.1",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450::1",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]

# Spellings of 127.0.0.1 the HTTP client connects to (hex ones through name resolution).
CONNECTED_SPELLINGS = [
    "127.0.0.1",
    "0x7f000001",
    "0x7F000001",
    "0x7f.0.0.1",
    "0x7f.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
]
# Legacy spellings the HTTP client itself refuses to request ("not a canonical IPv4
# address"): never connected to, and reported as the refused address they spell.
LEGACY_SPELLINGS = [
    "2130706433",
    "017700000001",
    "127.1",
    "127.0.1",
    "0177.0.0.1",
    "127.000.000.001",
]
LOOPBACK_SPELLINGS = CONNECTED_SPELLINGS + LEGACY_SPELLINGS
# Spellings of refused addresses other than the listener's: refused, and nowhere to go.
OTHER_SPELLINGS = [
    ("[::1]", "loopback"),
    ("[0:0:0:0:0:0:0:1]", "loopback"),
    ("[64:ff9b::7f00:1]", "loopback"),
    ("[64:ff9b::127.0.0.1]", "loopback"),
    ("0", "unspecified"),
    ("0.0.0.0", "unspecified"),  # noqa: S104 -- an address under test; nothing binds it
    ("[::]", "unspecified"),
    ("2852039166", "link-local"),  # 169.254.169.254, cloud metadata
    ("0xa9fea9fe", "link-local"),
    ("0251.0376.0251.0376", "link-local"),
    ("169.254.43518", "link-local"),
    ("10.1", "private"),
    ("0xa.0.0.1", "private"),
    ("192.168.0x1.1", "private"),
    ("100.64.0.1", "CGNAT"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("224.0.0.1", "multicast"),
    ("[fd00::1]", "unique local"),
    ("[fe80::1]", "link-local"),
    ("[ff02::1]", "multicast"),
    ("[2001:db8::1]", "documentation"),
]
# Names every resolver answers with loopback: refused by name at save time.
LOCAL_NAMES = ["localhost", "localhost.", "LOCALHOST", "api.localhost", "api.localhost."]


def _ip(text: str) -> address.IPAddress:
    return ipaddress.ip_address(text)


# The policy as plain functions.


@pytest.mark.unit
@pytest.mark.parametrize(("ip", "named"), REFUSED)
def test_every_refused_range_is_refused_and_named(ip: str, named: str) -> None:
    reason = address.refusal(_ip(ip))
    assert reason is not None
    assert named in reason


@pytest.mark.unit
@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_allowed(ip: str) -> None:
    assert address.refusal(_ip(ip)) is None


@pytest.mark.unit
def test_an_allowed_network_opens_that_network_and_nothing_more() -> None:
    allowed = address.parse_networks("127.0.0.1/32, 10.20.0.0/16")
    assert address.refusal(_ip("127.0.0.1"), allowed) is None
    assert address.refusal(_ip("::ffff:127.0.0.1"), allowed) is None  # the same socket
    assert address.refusal(_ip("10.20.3.4"), allowed) is None
    assert address.refusal(_ip("127.0.0.2"), allowed) == "loopback"
    assert address.refusal(_ip("10.21.0.1"), allowed) == "private"
    assert address.refusal(_ip("::1"), allowed) == "loopback"


@pytest.mark.unit
@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0.1/8", "example.com", "10.0.0.0/8;"])
def test_a_bad_allow_list_entry_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="is not a network") as caught:
        address.parse_networks(f"127.0.0.1/32, {text}")
    assert repr(text) in str(caught.value)


@pytest.mark.unit
@pytest.mark.parametrize("spelled", [s.strip("[]") for s in LOOPBACK_SPELLINGS])
def test_every_spelling_of_loopback_is_read_as_the_address(spelled: str) -> None:
    literal = address.literal_host(spelled)
    assert literal is not None
    assert address.refusal(literal) is not None
    assert literal in (_ip("127.0.0.1"), _ip("::ffff:127.0.0.1"))


@pytest.mark.unit
@pytest.mark.parametrize(
    "host", ["shop.example", "1e3", "0x", "1.2.3.4.5", "xn--bcher-kva.example"]
)
def test_names_are_not_read_as_addresses(host: str) -> None:
    assert address.literal_host(host) is None


# Save time: a callback whose host is a refused literal address is not saved.


def _validate(url: str, allowed: Sequence[address.Network] = ()) -> callbacks.CallbackSpec:
    return callbacks.validate("ann", "order.created", "GET", url, allowed=allowed)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "named"),
    [(s, "loopback") for s in LOOPBACK_SPELLINGS]
    + OTHER_SPELLINGS
    + [(name, "loopback") for name in LOCAL_NAMES]
    + [("127.0.0.1.", "loopback"), ("2130706433.", "loopback"), ("10.0.0.1.", "private")],
)
def test_saving_a_callback_to_a_refused_address_fails_at_once(host: str, named: str) -> None:
    with pytest.raises(callbacks.CallbackError) as caught:
        _validate(f"https://{host}:8443/pb?o={{{{order.number}}}}")
    assert caught.value.field == "url"
    message = caught.value.message
    assert named in message
    assert "POSTBACK_ALLOW_NETWORKS" in message  # and how to open it
    assert "the URL's host" in message


@pytest.mark.unit
def test_a_spelled_address_is_said_in_plain_form() -> None:
    with pytest.raises(callbacks.CallbackError) as caught:
        _validate("http://2130706433/pb")
    assert "the URL's host 2130706433 (that is 127.0.0.1) is a refused address (loopback)" in (
        caught.value.message
    )


@pytest.mark.unit
def test_an_allowed_network_can_be_saved_and_public_hosts_always_can() -> None:
    assert _validate("http://127.0.0.1:8080/pb", LOOPBACK_ONLY).template.host == "127.0.0.1"
    assert _validate("http://[::ffff:7f00:1]/pb", LOOPBACK_ONLY).template.host == "::ffff:7f00:1"
    assert _validate("https://8.8.8.8/pb").template.host == "8.8.8.8"
    assert _validate("https://track.affiliate.example/pb").template.host == (
        "track.affiliate.example"
    )
    with pytest.raises(callbacks.CallbackError, match="loopback"):
        _validate("http://127.0.0.2:8080/pb", LOOPBACK_ONLY)


async def test_the_api_refuses_a_refused_host_and_saves_nothing(
    api: Api, db: asyncpg.Connection
) -> None:
    status, body = await api.call(
        "PUT", "/v1/callbacks/ann/order.created", json={"url": "http://0x7f000002/pb"}
    )
    assert status == 422
    assert body["errors"][0]["field"] == "url"
    assert "(that is 127.0.0.2) is a refused address (loopback)" in body["errors"][0]["message"]
    status, _ = await api.call(
        "PUT", "/v1/callbacks/ann/order.created", json={"url": "http://169.254.169.254/"}
    )
    assert status == 422
    assert await db.fetchval("SELECT count(*) FROM callbacks") == 0


# Delivery time: the guard sits where the socket is opened.


def _addr_info(ip: str) -> tuple[int, int, int, str, tuple[str, int]]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, 80))


@pytest.mark.unit
@pytest.mark.parametrize("ip", ["127.0.0.1", "10.0.0.1", "::1", "fe80::1%lo", "fe80::1%%"])
def test_the_socket_factory_refuses_what_the_policy_refuses(ip: str) -> None:
    # The last line of defence, whatever name resolution answered; an address it cannot
    # read (a made-up zone) is refused too, as an OSError the connector reports.
    with pytest.raises(address.BlockedAddress):
        address.SocketFactory(())(_addr_info(ip))


@pytest.mark.unit
def test_the_socket_factory_makes_sockets_for_allowed_addresses() -> None:
    for ip in ("8.8.8.8", "2606:4700::1111", "127.0.0.1"):
        made = address.SocketFactory(LOOPBACK_ONLY)(_addr_info(ip))
        assert made.family == _addr_info(ip)[0]
        made.close()


@dataclass
class Listener:
    """A TCP server that answers 200 to anything and counts the connections it accepted."""

    port: int = 0
    connections: int = 0


@contextlib.asynccontextmanager
async def listening(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Listener]:
    state = Listener()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    async with raw_server(answer, host, port) as url:
        state.port = URL(url).port or 0
        yield state


@contextlib.asynccontextmanager
async def guarded(
    allowed: Sequence[address.Network] = (), resolver: AbstractResolver | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    http = deliver.session(1.0, 3.0, tuple(allowed), resolver)
    try:
        yield http
    finally:
        await http.close()


async def _get(http: aiohttp.ClientSession, url: str) -> Outcome:
    return await deliver.attempt(http, Request("GET", url, {}, None))


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with listening() as state:
        yield state


@pytest.mark.parametrize("spelled", CONNECTED_SPELLINGS)
async def test_every_spelling_of_loopback_is_refused_when_delivering(
    listener: Listener, spelled: str
) -> None:
    url = f"http://{spelled}:{listener.port}/pb"
    async with guarded() as http:
        outcome = await _get(http, url)
    assert outcome.error_class == "blocked_address"
    assert outcome.error is not None
    assert "loopback" in outcome.error
    assert listener.connections == 0

    # The same URL does reach the listener once loopback is allowed: the spelling was real.
    async with guarded(LOOPBACK_ONLY) as http:
        outcome = await _get(http, url)
    assert outcome.status == 200
    assert listener.connections == 1


@pytest.mark.parametrize("spelled", LEGACY_SPELLINGS)
async def test_legacy_spellings_of_loopback_are_never_requested(
    listener: Listener, spelled: str
) -> None:
    # The HTTP client refuses these spellings before any lookup, allow-list or not.
    url = f"http://{spelled}:{listener.port}/pb"
    for allowed in ((), LOOPBACK_ONLY):
        async with guarded(allowed) as http:
            outcome = await _get(http, url)
        assert outcome.error_class == "blocked_address"
        assert outcome.error == (
            f"the URL's host {spelled} is 127.0.0.1 in a legacy spelling, which is never "
            "requested; it is loopback"
        )
    assert listener.connections == 0


@pytest.mark.unit
async def test_a_legacy_spelling_of_a_public_address_is_an_invalid_url() -> None:
    async with guarded() as http:
        outcome = await _get(http, "http://134744072/pb")  # 8.8.8.8
    assert outcome.error_class == "invalid_url"
    assert outcome.error == (
        "the URL's host 134744072 is 8.8.8.8 in a legacy spelling, which is never requested"
    )


@pytest.mark.unit
def test_a_legacy_spelling_of_an_allowed_or_public_address_is_refused_when_saved() -> None:
    for url, canonical in (("http://2130706433/", "127.0.0.1"), ("http://134744072/", "8.8.8.8")):
        with pytest.raises(callbacks.CallbackError, match=f"write the address as {canonical}"):
            _validate(url, LOOPBACK_ONLY)


@pytest.mark.parametrize(("spelled", "named"), OTHER_SPELLINGS)
async def test_other_refused_addresses_are_refused_when_delivering(
    spelled: str, named: str
) -> None:
    async with guarded(LOOPBACK_ONLY) as http:
        outcome = await _get(http, f"http://{spelled}:9/latest/meta-data/")
    assert outcome.error_class == "blocked_address"
    assert outcome.error is not None
    assert named in outcome.error
    assert outcome.duration_ms < 500  # refused before any packet, not timed out


async def test_ipv6_loopback_is_refused_though_a_server_listens_there() -> None:
    async with listening("::1") as v6:
        async with guarded(LOOPBACK_ONLY) as http:
            outcome = await _get(http, f"http://[::1]:{v6.port}/")
        assert outcome.error_class == "blocked_address"
        assert v6.connections == 0
        async with guarded(address.parse_networks("::1/128")) as http:
            assert (await _get(http, f"http://[::1]:{v6.port}/")).status == 200
        assert v6.connections == 1


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["10.0.0.1", "192.168.0.1", "127.0.0.2"],
        ["169.254.169.254"],
    ],
)
@pytest.mark.parametrize("name", ["internal.shop.example", "internal.shop.example."])
async def test_a_name_that_resolves_to_a_refused_address_is_refused(
    listener: Listener, name: str, answers: list[str]
) -> None:
    hosts = HostsFile({name: [answers]})
    async with guarded(resolver=hosts) as http:
        outcome = await _get(http, f"http://{name}:{listener.port}/pb")
    assert outcome.error_class == "blocked_address"
    assert hosts.lookups == {name: 1}  # the name was looked up, then every answer refused
    assert listener.connections == 0


async def test_of_a_name_s_addresses_only_the_allowed_one_is_used(listener: Listener) -> None:
    # A name answering with a refused and an allowed address: the refused one is never
    # connected to, the allowed one is.
    hosts = HostsFile({"mixed.example": [["127.0.0.3", "127.0.0.1"]]})
    async with listening("127.0.0.3", listener.port) as other:
        async with guarded(LOOPBACK_ONLY, hosts) as http:
            outcome = await _get(http, f"http://mixed.example:{listener.port}/pb")
        assert outcome.status == 200
        assert (other.connections, listener.connections) == (0, 1)


@pytest.mark.parametrize(
    "answers", [["127.0.0.1", "10.0.0.1"], ["10.0.0.1", "127.0.0.1"], ["::1", "127.0.0.1"]]
)
async def test_a_name_whose_allowed_address_is_down_fails_as_a_connect_error(
    answers: list[str],
) -> None:
    # Nothing listens on the allowed address: in whatever order the refused one comes,
    # the failure is the allowed one's, which is retried, not a dead letter for the other.
    port = free_port()
    hosts = HostsFile({"partly.example": [answers]})
    async with guarded(LOOPBACK_ONLY, hosts) as http:
        outcome = await _get(http, f"http://partly.example:{port}/pb")
    assert outcome.error_class == "connect_error"


async def test_dns_rebinding_cannot_race_the_check(listener: Listener) -> None:
    # The name first answers with an allowed address, then with a refused one: the check is
    # made on each connect, so the second answer is refused however little time passed.
    async with listening("127.0.0.3", listener.port) as inside:
        hosts = HostsFile({"rebind.example": [["127.0.0.1"], ["127.0.0.3"]]})
        async with guarded(LOOPBACK_ONLY, hosts) as http:
            first = await _get(http, f"http://rebind.example:{listener.port}/pb")
            assert isinstance(http.connector, aiohttp.TCPConnector)
            http.connector.clear_dns_cache()  # as when the answer's TTL runs out
            second = await _get(http, f"http://rebind.example:{listener.port}/pb")
        assert first.status == 200
        assert second.error_class == "blocked_address"
        assert hosts.lookups == {"rebind.example": 2}
        assert (listener.connections, inside.connections) == (1, 0)


@dataclass
class Redirector:
    """A receiver on an allowed address whose every answer redirects to `target`."""

    target: str = ""
    hits: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path_qs)
        raise web.HTTPFound(self.target)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.3:{port}/admin",
        "http://2130706435:{port}/admin",  # 127.0.0.3
        "http://[::ffff:127.0.0.3]:{port}/admin",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/admin",
        "http://[fe80::1%25%25]:{port}/",  # an address no one can read: refused, no crash
    ],
)
async def test_a_redirect_to_a_refused_address_is_never_followed(target: str) -> None:
    redirector = Redirector()
    async with listening("127.0.0.3") as inside, serve(redirector.handle) as url:
        redirector.target = target.format(port=inside.port)
        async with guarded(LOOPBACK_ONLY) as http:
            outcome = await _get(http, url + "/pb")
        assert redirector.hits == ["/pb"]
        assert outcome.error_class == "blocked_address"
        assert inside.connections == 0  # the second request never arrived


# In the pipeline: dead-lettered at once, never retried, nothing sent.


async def test_a_refused_delivery_is_dead_lettered_at_once_and_never_retried(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    # Saved while loopback was allowed; the operator has since closed it.
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    event = event_data("closed")
    await producer.publish(event)
    await drain(settings.model_copy(update={"allow_networks": None}))

    delivery = await db.fetchrow("SELECT * FROM deliveries WHERE event_id = $1", event["id"])
    assert delivery is not None
    assert (delivery["state"], delivery["attempts"], delivery["error_class"]) == (
        "dead",
        1,
        "blocked_address",
    )
    attempts = await db.fetch("SELECT * FROM attempts WHERE delivery_id = $1", delivery["id"])
    assert len(attempts) == 1
    assert "127.0.0.1 is a refused address (loopback)" in attempts[0]["error"]
    assert receiver.requests == []


async def test_a_test_fire_to_a_refused_address_says_so(
    db: asyncpg.Connection, api: Api, receiver: Receiver
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    # Pointed at a private address by an older release, before hosts were checked on save.
    await db.execute("UPDATE callbacks SET url_template = 'http://10.0.0.1:9/pb'")
    status, fired = await api.call("POST", "/v1/callbacks/ann/order.created/test")
    assert status == 200, fired
    assert (fired["delivered"], fired["response"]) == (False, None)
    assert fired["error_class"] == "blocked_address"
    assert "10.0.0.1 is a refused address (private)" in fired["error"]
