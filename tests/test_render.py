"""Templates: parse-time refusals, exact values, and encoding that keeps values as data."""

from __future__ import annotations

import random
import re
import string
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from producer.event import Event, loads_event
from tests.support.samples import LINK, make_event, refusal
from worker.render import (
    KNOWN_VARIABLES,
    Template,
    TemplateError,
    Variable,
    body,
    check_new,
    parse,
    render,
    variables,
)

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parent.parent / "README.md"


def fill(source: str, event: Event) -> str:
    return render(parse(source), variables(event))


# --- values of a realistic event ---------------------------------------------------------


def test_known_variables_are_the_ones_the_readme_documents() -> None:
    table = README.read_text().split("## Callbacks and templates", 1)[1].split("Rules:", 1)[0]
    documented = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", table))
    assert documented == set(KNOWN_VARIABLES)
    assert "`link.query.NAME`" in table


def test_variables_of_a_realistic_event() -> None:
    assert variables(make_event()) == {
        "event.id": "evt_01HX",
        "event.type": "order.created",
        "event.occurred_at": "2024-05-01T12:30:00+02:00",
        "affiliate.id": "aff-42",
        "order.number": "#1001",
        "order.amount": "10.50",
        "order.commission": "1.05",
        "order.currency": "EUR",
        "order.status": "pending",
        "link.url": LINK,
        "link.path": "/summer",
        "link.hash": "promo",
        "link.sub_id": "fb1",
        "link.query.ref": "ann",
        "link.query.campaign": "summer",
        "link.query.sub_id": "fb1",
    }


def test_every_known_variable_has_a_value_even_for_a_minimal_event() -> None:
    event = make_event(
        occurred_at=None,
        order={"currency": None, "status": None},
        link={"url": "https://shop.example"},
    )
    values = variables(event)
    assert {name: values[name] for name in KNOWN_VARIABLES} == {
        "event.id": "evt_01HX",
        "event.type": "order.created",
        "event.occurred_at": "",
        "affiliate.id": "aff-42",
        "order.number": "#1001",
        "order.amount": "10.50",
        "order.commission": "1.05",
        "order.currency": "",
        "order.status": "",
        "link.url": "https://shop.example",
        "link.path": "",
        "link.hash": "",
        "link.sub_id": "",
    }
    assert set(values) == set(KNOWN_VARIABLES)


@pytest.mark.parametrize(
    ("name", "rendered"),
    [
        ("event.id", "evt_01HX"),
        ("event.type", "order.created"),
        ("event.occurred_at", "2024-05-01T12%3A30%3A00%2B02%3A00"),
        ("affiliate.id", "aff-42"),
        ("order.number", "%231001"),
        ("order.amount", "10.50"),
        ("order.commission", "1.05"),
        ("order.currency", "EUR"),
        ("order.status", "pending"),
        (
            "link.url",
            "https%3A%2F%2Fshop.example%2Fsummer%3Fref%3Dann%26campaign%3Dsummer"
            "%26sub_id%3Dfb1%23promo",
        ),
        ("link.path", "%2Fsummer"),
        ("link.hash", "promo"),
        ("link.sub_id", "fb1"),
        ("link.query.ref", "ann"),
        ("link.query.campaign", "summer"),
        ("link.query.sub_id", "fb1"),
    ],
)
def test_each_variable_renders_from_the_event(name: str, rendered: str) -> None:
    assert fill(f"https://track.example/pb?v={{{{{name}}}}}", make_event()) == (
        f"https://track.example/pb?v={rendered}"
    )


def test_a_full_template_renders_exactly() -> None:
    source = (
        "https://track.example/postback?order={{order.number}}&amt={{order.amount}}"
        "&com={{ order.commission }}&cur={{order.currency}}&st={{order.status}}"
        "&subid={{link.sub_id}}&ref={{link.query.ref}}&c={{link.query.campaign}}"
        "&h={{link.hash}}&p={{link.path}}&e={{event.id}}&t={{event.type}}&a={{affiliate.id}}"
    )
    assert fill(source, make_event()) == (
        "https://track.example/postback?order=%231001&amt=10.50&com=1.05&cur=EUR&st=pending"
        "&subid=fb1&ref=ann&c=summer&h=promo&p=%2Fsummer&e=evt_01HX&t=order.created&a=aff-42"
    )


def test_occurred_at_keeps_its_offset() -> None:
    event = make_event(occurred_at="2024-12-31T23:59:59.250Z")
    assert variables(event)["event.occurred_at"] == "2024-12-31T23:59:59.250000+00:00"


# --- encoding of values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("a b", "a%20b"),
        ("a&b", "a%26b"),
        ("a=b", "a%3Db"),
        ("#1001", "%231001"),
        ("a+b", "a%2Bb"),
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        ("%20", "%2520"),
        ("a?b", "a%3Fb"),
        ("Zoë 北京", "Zo%C3%AB%20%E5%8C%97%E4%BA%AC"),
        ("", ""),
        ("AZaz09-._~", "AZaz09-._~"),
        ("line\r\nX-Injected: 1", "line%0D%0AX-Injected%3A%201"),
        ("a;b,c:d@e!f$g'h(i)j*k", "a%3Bb%2Cc%3Ad%40e%21f%24g%27h%28i%29j%2Ak"),
        ('[x]{y}<z>"|\\^`', "%5Bx%5D%7By%7D%3Cz%3E%22%7C%5C%5E%60"),
        ("\x00\t", "%00%09"),
        ("😀", "%F0%9F%98%80"),
    ],
)
def test_values_are_percent_encoded(value: str, encoded: str) -> None:
    template = parse("https://t.example/p/{{order.number}}?n={{order.number}}")
    assert render(template, {"order.number": value}) == (
        f"https://t.example/p/{encoded}?n={encoded}"
    )


def test_values_from_the_event_are_encoded_end_to_end() -> None:
    event = make_event(order={"number": "A&B =#1/2?x+y%", "status": "Zoë 北京"})
    assert fill("https://t.example/?o={{order.number}}&s={{order.status}}", event) == (
        "https://t.example/?o=A%26B%20%3D%231%2F2%3Fx%2By%25&s=Zo%C3%AB%20%E5%8C%97%E4%BA%AC"
    )


def test_the_templates_own_characters_are_left_as_written() -> None:
    source = (
        "https://t.example/a%2Fb/p+q;v=1/[x]?list[]=a&sp=%20+&t=~!$'()*,"
        "&o={{order.number}}&e=#frag%2F"
    )
    assert render(parse(source), {"order.number": "x y/z"}) == (
        "https://t.example/a%2Fb/p+q;v=1/[x]?list[]=a&sp=%20+&t=~!$'()*,&o=x%20y%2Fz&e=#frag%2F"
    )


def test_a_template_without_variables_renders_unchanged() -> None:
    assert render(parse("HTTPS://Track.Example:8443/pb?x=1"), {}) == (
        "HTTPS://Track.Example:8443/pb?x=1"
    )


def test_a_known_variable_without_a_value_renders_empty() -> None:
    template = parse(
        "https://t.example/?c={{order.currency}}&s={{order.status}}&o={{order.number}}"
    )
    assert render(template, {"order.number": "7"}) == "https://t.example/?c=&s=&o=7"
    event = make_event(order={"currency": None, "status": None})
    assert render(template, variables(event)) == "https://t.example/?c=&s=&o=%231001"


# --- decimals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "rendered"),
    [
        ("10.50", "10.50"),
        ("0.1", "0.1"),
        ("1E+3", "1000"),
        (Decimal("1E+3"), "1000"),
        ("10", "10"),
        ("-5.00", "-5.00"),
        ("0.000001", "0.000001"),
        ("1.0E-7", "0.00000010"),
        ("12345678901234567890.99", "12345678901234567890.99"),
        (7, "7"),
    ],
)
def test_amounts_are_exact_and_without_exponent(amount: Any, rendered: str) -> None:
    event = make_event(order={"amount": amount, "commission": amount})
    assert fill("https://t.example/?a={{order.amount}}&c={{order.commission}}", event) == (
        f"https://t.example/?a={rendered}&c={rendered}"
    )


def test_json_numbers_stay_exact_from_the_wire() -> None:
    event = loads_event(
        '{"id": "e1", "type": "order.updated", "affiliate_id": "a1",'
        ' "order": {"number": "1", "amount": 10.50, "commission": 0.10},'
        ' "link": {"url": "https://shop.example/"}}'
    )
    assert fill("https://t.example/?a={{order.amount}}&c={{order.commission}}", event) == (
        "https://t.example/?a=10.50&c=0.10"
    )


# --- link.sub_id and link.query ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "sub_id"),
    [
        ({"sub_id": "tw9"}, "tw9"),  # the event's own sub_id overrides the link's
        ({}, "fb1"),  # from the link's query
        ({"url": "https://shop.example/summer?ref=ann"}, ""),  # absent everywhere
        ({"url": "https://shop.example/?sub_id=&ref=ann"}, ""),  # present but blank
        ({"url": "https://shop.example/?sub_id=a&sub_id=b"}, "a"),  # first value wins
        ({"sub_id": ""}, "fb1"),  # an empty override counts as absent
        ({"sub_id": "a b&c", "url": "https://shop.example/"}, "a%20b%26c"),
    ],
)
def test_link_sub_id(link: dict[str, Any], sub_id: str) -> None:
    assert fill("https://t.example/?s={{link.sub_id}}", make_event(link=link)) == (
        f"https://t.example/?s={sub_id}"
    )


def test_link_query_of_a_missing_name_renders_empty() -> None:
    assert fill("https://t.example/?x={{link.query.nope}}&r={{link.query.ref}}", make_event()) == (
        "https://t.example/?x=&r=ann"
    )


def test_link_query_values_are_decoded_then_encoded_once() -> None:
    url = "https://shop.example/a%2Fb?q=a%20b+c&q=second&flag&utm.source=x%26y&Ref=Upper#x%20y"
    values = variables(make_event(link={"url": url}))
    assert {k: v for k, v in values.items() if k.startswith("link.")} == {
        "link.url": url,
        "link.path": "/a%2Fb",
        "link.hash": "x%20y",
        "link.sub_id": "",
        "link.query.q": "a b c",
        "link.query.flag": "",
        "link.query.utm.source": "x&y",
        "link.query.Ref": "Upper",
    }
    source = "https://t.example/?q={{link.query.q}}&u={{link.query.utm.source}}&p={{link.path}}"
    assert render(parse(source), values) == "https://t.example/?q=a%20b%20c&u=x%26y&p=%2Fa%252Fb"


# --- parse: names, braces, positions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "https://t.example/?o={{order.numbr}}",
            "unknown variable 'order.numbr' in template; did you mean 'order.number'?",
        ),
        (
            "https://t.example/?a={{amount}}",
            "unknown variable 'amount' in template; did you mean 'order.amount'?",
        ),
        (
            "https://t.example/?s={{link.subid}}",
            "unknown variable 'link.subid' in template; did you mean 'link.sub_id'?",
        ),
        (
            "https://t.example/?o={{Order.Number}}",
            "unknown variable 'Order.Number' in template; did you mean 'order.number'?",
        ),
        (
            "https://t.example/?s={{LINK.SUB_ID}}",
            "unknown variable 'LINK.SUB_ID' in template; did you mean 'link.sub_id'?",
        ),
        (
            "https://t.example/?r={{link.qeury.ref}}",
            "unknown variable 'link.qeury.ref' in template; did you mean 'link.query.ref'?",
        ),
        (
            "https://t.example/?o={{{order.number}}}",
            "unknown variable '{order.number' in template; did you mean 'order.number'?",
        ),
        (
            "https://t.example/?x={{banana}}",
            "unknown variable 'banana' in template; known variables are event.id, event.type,"
            " event.occurred_at, affiliate.id, order.number, order.amount, order.commission,"
            " order.currency, order.status, link.url, link.path, link.hash, link.sub_id,"
            " link.query.NAME",
        ),
        (
            "https://t.example/?r={{link.query}}",
            "variable 'link.query' needs a query parameter name after 'link.query.',"
            " e.g. 'link.query.ref' for ?ref=...",
        ),
        (
            "https://t.example/?r={{ link.query. }}",
            "variable 'link.query.' needs a query parameter name after 'link.query.',"
            " e.g. 'link.query.ref' for ?ref=...",
        ),
    ],
)
def test_unknown_variables_are_refused_with_a_suggestion(source: str, message: str) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "https://t.example/?o={{order.number",
            "unclosed '{{' at character 22 of the template; close it with '}}'",
        ),
        (
            "https://t.example/?o={{order.number&a={{order.amount}}",
            "unclosed '{{' at character 22 of the template; close it with '}}'",
        ),
        (
            "https://t.example/?o={{order.number}}&a={{",
            "unclosed '{{' at character 41 of the template; close it with '}}'",
        ),
        (
            "https://t.example/?o={{}}",
            "empty variable '{{}}' at character 22 of the template;"
            " put a name inside, e.g. {{order.number}}",
        ),
        (
            "https://t.example/?o={{   }}",
            "empty variable '{{}}' at character 22 of the template;"
            " put a name inside, e.g. {{order.number}}",
        ),
        (
            "https://t.example/?o={order.number}}",
            "unmatched '}}' at character 35 of the template; variables are written {{name}}",
        ),
        (
            "https://t.example/?o=1\n",
            "template contains control character U+000A at character 23; a URL cannot contain it",
        ),
        ("", "template is empty; expected a URL such as https://host/path"),
    ],
)
def test_malformed_templates_are_refused_with_the_position(source: str, message: str) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize(
    "source",
    [
        "https://t.example/?o={{order.number}}",
        "https://t.example/?o={{ order.number }}",
        "https://t.example/?o={{order.number   }}",
        "https://t.example/?o={{\torder.number}}",
        r"https://t.example/?o=\{{order.number\}}",
        r"https://t.example/?o=\{\{order.number\}\}",
        r"https://t.example/?o=\{\{ order.number \}\}",
        r"https://t.example/?o={\{order.number}\}",
    ],
)
def test_spaces_and_escaped_braces_mean_the_plain_form(source: str) -> None:
    template = parse(source)
    assert template.source == source
    assert template.parts == ("https://t.example/?o=", Variable("order.number"))
    assert render(template, {"order.number": "#1"}) == "https://t.example/?o=%231"


def test_template_parts_keep_every_variable_in_order() -> None:
    template = parse(
        "https://t.example/{{link.path}}?a={{order.amount}}&b={{order.number}}"
        "&c={{ order.amount }}&r={{link.query.ref}}"
    )
    assert template.parts == (
        "https://t.example/",
        Variable("link.path"),
        "?a=",
        Variable("order.amount"),
        "&b=",
        Variable("order.number"),
        "&c=",
        Variable("order.amount"),
        "&r=",
        Variable("link.query.ref"),
    )


def test_adjacent_variables_and_query_names_with_any_characters() -> None:
    template = parse("https://t.example/{{order.number}}{{order.amount}}?{{link.query.utm source}}")
    assert template.parts == (
        "https://t.example/",
        Variable("order.number"),
        Variable("order.amount"),
        "?",
        Variable("link.query.utm source"),
    )
    event = make_event(link={"url": "https://s.example/?utm+source=a%3Fb"})
    assert render(template, variables(event)) == "https://t.example/%23100110.50?a%3Fb"


def test_template_length_limit() -> None:
    prefix = "https://t.example/"
    longest = prefix + "a" * (4096 - len(prefix))
    assert parse(longest).parts == (longest,)
    assert refusal(prefix + "a" * (4097 - len(prefix))) == (
        "template is 4097 characters long; the limit is 4096"
    )


# --- parse: the scheme and host are literal http(s) -------------------------------------------

PREFIX = "template must start with http:// or https:// and a literal host"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("ftp://t.example/x", f"{PREFIX}, got 'ftp://t.example/x'"),
        ("/x", f"{PREFIX}, got '/x'"),
        ("//t.example/x", f"{PREFIX}, got '//t.example/x'"),
        ("t.example/x", f"{PREFIX}, got 't.example/x'"),
        ("javascript:alert(1)", f"{PREFIX}, got 'javascript:alert(1)'"),
        ("https:/t.example/x", f"{PREFIX}, got 'https:/t.example/x'"),
        (" https://t.example/x", f"{PREFIX}, got ' https://t.example/x'"),
        ("{{link.url}}", f"{PREFIX}, got '{{{{link.url}}}}'"),
        ("https:///x", f"{PREFIX}; the host is empty, got 'https:///x'"),
        ("https://", f"{PREFIX}; the host is empty, got 'https://'"),
        ("https://user@/x", f"{PREFIX}; the host is empty, got 'https://user@/x'"),
        ("https://:443/x", f"{PREFIX}; the host is empty, got 'https://:443/x'"),
        (
            "https://{{link.query.h}}/x",
            f"{PREFIX}; a variable cannot be part of the host, got 'https://{{{{link.query.h}}}}/x'",
        ),
        (
            "https://t.example{{link.query.h}}/x",
            f"{PREFIX}; a variable cannot be part of the host,"
            " got 'https://t.example{{link.query.h}}/x'",
        ),
        (
            "https://t.example:{{link.query.port}}/x",
            f"{PREFIX}; a variable cannot be part of the host,"
            " got 'https://t.example:{{link.query.port}}/x'",
        ),
        (
            "https://{{order.number}}@t.example/x",
            f"{PREFIX}; a variable cannot be part of the host,"
            " got 'https://{{order.number}}@t.example/x'",
        ),
        (
            r"https://\{{link.query.h\}}/x",
            f"{PREFIX}; a variable cannot be part of the host,"
            r" got 'https://\{{link.query.h\}}/x'",
        ),
        (
            "https://t.example:99999/x",
            f"{PREFIX}; the host is not valid (Port out of range 0-65535),"
            " got 'https://t.example:99999/x'",
        ),
        ("https://t ex/x", f"{PREFIX}; the host contains ' ', got 'https://t ex/x'"),
        (
            "https://bücher.example/{{order.number}}",
            f"{PREFIX}; write the host in its ASCII form, xn--bcher-kva.example,"
            " got 'https://bücher.example/{{order.number}}'",
        ),
        (
            "https://münchen.example/{{order.number}}",
            f"{PREFIX}; write the host in its ASCII form, xn--mnchen-3ya.example,"
            " got 'https://münchen.example/{{order.number}}'",
        ),
        (  # the host's own punycode, lower case as IDNA spells it, without the port
            "https://MÜNCHEN.example:8443/x",
            f"{PREFIX}; write the host in its ASCII form, xn--mnchen-3ya.example,"
            " got 'https://MÜNCHEN.example:8443/x'",
        ),
        (
            "https://a..münchen.example/x",
            f"{PREFIX}; write the host in its ASCII (punycode) form,"
            " got 'https://a..münchen.example/x'",
        ),
        (
            "https://jürgen@t.example/x",
            f"{PREFIX}; the text before '@' has non-ASCII characters; percent-encode them,"
            " got 'https://jürgen@t.example/x'",
        ),
        (
            # `\@` alone is a markdown escape for `@` (see the markdown tests below). `\\`
            # stands for a backslash, which URL parsers read differently in a host: refused.
            r"https://evil.example\\@t.example/x",
            r"escaped backslash '\\' at character 21 of the template stands for a backslash,"
            " which a URL cannot carry; write %5C for a literal backslash",
        ),
        (
            "ftp://t.example/" + "x" * 100,
            f"{PREFIX}, got 'ftp://t.example/" + "x" * 61 + "...'",
        ),
    ],
)
def test_urls_that_are_not_absolute_http_with_a_literal_host_are_refused(
    source: str, message: str
) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize(
    "source",
    [
        "http://t.example",
        "HTTPS://T.Example/x",
        "https://t.example?o={{order.number}}",
        "https://t.example#{{link.hash}}",
        "https://user:pw@t.example:8443/x/{{order.number}}",
        "https://[2001:db8::1]:8443/{{order.number}}",
    ],
)
def test_absolute_http_urls_with_a_literal_host_are_accepted(source: str) -> None:
    # Credentials and a fragment too: a callback saved before `check_new` refused them
    # is still sent.
    assert parse(source).source == source


CREDENTIALS = (
    "template has credentials (user:password@) before the host t.example; they would be "
    "shown in listings and on the page: remove them (a secret signs the requests instead)"
)
FRAGMENT = (
    "template has a fragment ('#' and what follows), which is never sent to the affiliate: "
    "remove it, or write %23 for a literal '#'"
)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("https://user:pw@t.example:8443/x/{{order.number}}", CREDENTIALS),
        ("https://user@T.Example/x", CREDENTIALS),
        (r"https://token\@t.example/x", CREDENTIALS),  # a markdown-escaped `@` is an `@`
        ("https://t.example#{{link.hash}}", FRAGMENT),
        ("https://t.example/pb?o={{order.number}}#top", FRAGMENT),
        (r"https://t.example/pb\#x", FRAGMENT),
    ],
)
def test_a_new_template_with_credentials_or_a_fragment_is_refused(
    source: str, message: str
) -> None:
    with pytest.raises(TemplateError) as caught:
        check_new(parse(source))
    assert str(caught.value) == message
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "source",
    [
        "https://t.example/pb?o={{order.number}}&h={{link.hash}}",
        "https://t.example/pb?o=%23{{order.number}}",  # an encoded `#` is data, not a fragment
        "https://t.example/pb/{{link.query.a@b}}",  # an `@` in the path is no credential
    ],
)
def test_a_new_template_without_credentials_or_fragment_is_accepted(source: str) -> None:
    check_new(parse(source))


# --- parse: markdown backslash escapes, as copied from the docs' raw text -----------------------

# CommonMark lets a backslash escape any ASCII punctuation character.
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
# In the template's own text every one of them but the backslash reads as the character.
TEXT_ESCAPABLE = PUNCTUATION.replace("\\", "")
NOT_AN_ESCAPE = "remove it, or write %5C for a literal backslash"


def test_the_escapable_set_is_all_ascii_punctuation() -> None:
    assert len(PUNCTUATION) == 32
    assert set(PUNCTUATION) == {chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()}


@pytest.mark.parametrize(
    "source",
    [
        r"https://t.example/?s={{link.sub\_id}}",
        r"https://t.example/?s=\{{link.sub\_id\}}",
        r"https://t.example/?s=\{\{ link.sub\_id \}\}",
        r"https://t.example/?s={{link\.sub\_id}}",
        r"https://t.example/?s={{ link.sub\_id\}}",
    ],
)
def test_an_escaped_underscore_in_a_variable_is_the_plain_name(source: str) -> None:
    template = parse(source)
    assert template.parts == ("https://t.example/?s=", Variable("link.sub_id"))
    assert template.source == source  # stored as typed; the worker parses it again
    assert render(template, variables(make_event())) == "https://t.example/?s=fb1"


def test_an_escaped_query_parameter_name_is_the_plain_name() -> None:
    template = parse(
        r"https://t.example/?u={{link.query.utm\_source}}&m=\{{link.query.utm\_medium\}}"
    )
    assert template.parts == (
        "https://t.example/?u=",
        Variable("link.query.utm_source"),
        "&m=",
        Variable("link.query.utm_medium"),
    )
    event = make_event(link={"url": "https://shop.example/?utm_source=fb&utm_medium=cpc"})
    assert render(template, variables(event)) == "https://t.example/?u=fb&m=cpc"


@pytest.mark.parametrize("char", PUNCTUATION.replace("|", ""))
def test_inside_a_variable_a_backslash_before_punctuation_is_dropped(char: str) -> None:
    template = parse(f"https://t.example/?v={{{{link.query.a\\{char}b}}}}")
    assert template.parts == ("https://t.example/?v=", Variable(f"link.query.a{char}b"))


def test_inside_a_variable_an_escaped_bar_starts_filters_as_markdown_shows_it() -> None:
    # `\|` is how a markdown table cell writes `|`; read as shown, it is the filters' bar.
    escaped = parse(r"https://t.example/?v={{link.query.a \| upper}}")
    assert escaped.parts == parse("https://t.example/?v={{link.query.a | upper}}").parts
    assert render(escaped, {"link.query.a": "x"}) == "https://t.example/?v=X"


def test_inside_a_variable_other_backslashes_are_kept() -> None:
    # Markdown shows `\b` as typed, so the name keeps it; `\\` shows one backslash.
    assert parse(r"https://t.example/?v={{link.query.a\b}}").parts[1] == Variable(r"link.query.a\b")
    assert parse(r"https://t.example/?v={{link.query.a\\_}}").parts[1] == (
        Variable(r"link.query.a\_")
    )


def _with(char: str) -> str:
    """A template with `char` in its path, query and fragment text, as typed."""
    return f"https://t.example/a{char}b?q=1{char}2&o={{{{order.number}}}}#x{char}"


@pytest.mark.parametrize("char", TEXT_ESCAPABLE)
def test_an_escape_in_the_text_renders_exactly_as_the_character(char: str) -> None:
    escaped, plain = parse(_with("\\" + char)), parse(_with(char))
    assert escaped.source == _with("\\" + char)
    assert escaped.parts == plain.parts
    assert escaped.host == plain.host == "t.example"
    values = variables(make_event())
    assert render(escaped, values) == render(plain, values)
    assert "%5C" not in render(escaped, values)


# Next to a variable too; `\{` before `{{` would make the escaped pair `\{{` (see above).
@pytest.mark.parametrize("char", TEXT_ESCAPABLE.replace("{", ""))
def test_an_escape_next_to_a_variable_renders_as_the_character(char: str) -> None:
    def shaped(c: str) -> str:
        return f"https://t.example/{c}{{{{order.number}}}}{c}{{{{order.amount}}}}{c}"

    values = variables(make_event())
    assert render(parse(shaped("\\" + char)), values) == render(parse(shaped(char)), values)


def test_the_docs_example_with_an_escaped_ampersand_sends_the_plain_url() -> None:
    escaped = r"https://t.example/pb?order={{order.number}}\&amount={{order.amount}}"
    plain = "https://t.example/pb?order={{order.number}}&amount={{order.amount}}"
    sent = "https://t.example/pb?order=%231001&amount=10.50"
    assert fill(escaped, make_event()) == fill(plain, make_event()) == sent
    assert fill(r"https://t.example/?a=1\&b=2", make_event()) == "https://t.example/?a=1&b=2"


@pytest.mark.parametrize(
    ("source", "host", "rendered"),
    [
        (r"https://t\.example\:8443/pb\?o=1", "t.example", "https://t.example:8443/pb?o=1"),
        (r"https\://t\-x.example/x", "t-x.example", "https://t-x.example/x"),
        (r"https://evil.example\@t.example/x", "t.example", "https://evil.example@t.example/x"),
        (r"https://\[2001:db8::1\]:8443/x", "2001:db8::1", "https://[2001:db8::1]:8443/x"),
        (r"https://t.example\/{{order.number}}", "t.example", "https://t.example/%231001"),
        (r"https://t.example\#{{link.hash}}", "t.example", "https://t.example#promo"),
    ],
)
def test_the_host_is_read_from_the_unescaped_text(source: str, host: str, rendered: str) -> None:
    template = parse(source)
    assert (template.host, template.source) == (host, source)
    assert render(template, variables(make_event())) == rendered


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            r"https://t.example\[::1\]/x",
            f"{PREFIX}; brackets may only enclose an IPv6 host, e.g. [2001:db8::1]:8080,"
            r" got 'https://t.example\[::1\]/x'",
        ),
        (
            r"https://t.example\:x/",
            f"{PREFIX}; the host is not valid (Port could not be cast to integer value as 'x'),"
            r" got 'https://t.example\:x/'",
        ),
        (
            r"ftp\://t.example/a\_b",
            rf"{PREFIX}, got 'ftp\://t.example/a\_b'",
        ),
    ],
)
def test_a_host_refusal_after_unescaping_quotes_the_template_as_typed(
    source: str, message: str
) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            r"https://t.example/pb?o=1\x",
            "backslash before 'x' at character 25 of the template escapes nothing"
            f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}",
        ),
        (
            r"https://t.example/\&\_\q",
            "backslash before 'q' at character 23 of the template escapes nothing"
            f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}",
        ),
        (
            r"https://t.example/?o={{order.number}}\b",
            "backslash before 'b' at character 38 of the template escapes nothing"
            f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}",
        ),
        (
            r"https://t\ ex/x",
            "backslash before ' ' at character 10 of the template escapes nothing"
            f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}",
        ),
        (
            "https://t.example/a\\\u00a0",
            "backslash before '<U+00A0>' at character 20 of the template escapes nothing"
            f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}",
        ),
        (
            "https://t.example/pb\\",
            "backslash at character 21 of the template is its last character and escapes"
            f" nothing; {NOT_AN_ESCAPE}",
        ),
        (
            r"https://t.example/a\\b",
            r"escaped backslash '\\' at character 20 of the template stands for a backslash,"
            " which a URL cannot carry; write %5C for a literal backslash",
        ),
        (
            r"https://t.example/pb\\&x=1",
            r"escaped backslash '\\' at character 21 of the template stands for a backslash,"
            " which a URL cannot carry; write %5C for a literal backslash",
        ),
        (
            # Markdown reads `\\{{` as a backslash, then a variable.
            r"https://t.example/?o=\\{{order.number}}",
            r"escaped backslash '\\' at character 22 of the template stands for a backslash,"
            " which a URL cannot carry; write %5C for a literal backslash",
        ),
    ],
)
def test_a_backslash_that_is_not_a_markdown_escape_is_refused(source: str, message: str) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize("char", [*string.ascii_letters, *string.digits, " ", "é", "€"])
def test_a_backslash_before_anything_but_punctuation_is_refused(char: str) -> None:
    assert refusal(f"https://t.example/a\\{char}") == (
        f"backslash before '{char}' at character 20 of the template escapes nothing"
        f" (only ASCII punctuation can be escaped); {NOT_AN_ESCAPE}"
    )


def test_percent_5c_is_how_to_send_a_backslash() -> None:
    assert fill("https://t.example/a%5Cb?o={{order.number}}", make_event()) == (
        "https://t.example/a%5Cb?o=%231001"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "https://t.example/\\&\\_?o={order.number}}",
            "unmatched '}}' at character 39 of the template; variables are written {{name}}",
        ),
        (
            "https://t.example/\\&\\_?o={{order.number",
            "unclosed '{{' at character 26 of the template; close it with '}}'",
        ),
        (
            "https://t.example/\\&\\_?o=1\n",
            "template contains control character U+000A at character 27; a URL cannot contain it",
        ),
        (
            "https://t.example/\\&\\_?o={{\\}}",
            "empty variable '{{}}' at character 26 of the template;"
            " put a name inside, e.g. {{order.number}}",
        ),
    ],
)
def test_positions_count_the_template_as_typed(source: str, message: str) -> None:
    assert refusal(source) == message


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            r"https://t.example/?s={{link.sub\_idd}}",
            r"unknown variable 'link.sub\_idd' in template; did you mean 'link.sub_id'?",
        ),
        (
            r"https://t.example/?o={{order\number}}",
            r"unknown variable 'order\number' in template; did you mean 'order.number'?",
        ),
        (
            r"https://t.example/?u={{link.qeury.utm\_source}}",
            r"unknown variable 'link.qeury.utm\_source' in template;"
            " did you mean 'link.query.utm_source'?",
        ),
        (
            r"https://t.example/?u={{link.query\.}}",
            r"variable 'link.query\.' needs a query parameter name after 'link.query.',"
            " e.g. 'link.query.ref' for ?ref=...",
        ),
        (
            "https://t.example/?o={{it's}}",
            "unknown variable 'it's' in template; known variables are event.id, event.type,"
            " event.occurred_at, affiliate.id, order.number, order.amount, order.commission,"
            " order.currency, order.status, link.url, link.path, link.hash, link.sub_id,"
            " link.query.NAME",
        ),
        (
            "https://t.example/?o={{order.\nnumber}}",
            "unknown variable 'order.<U+000A>number' in template; did you mean 'order.number'?",
        ),
        (r"it's\_", rf"{PREFIX}, got 'it's\_'"),
    ],
)
def test_messages_quote_the_template_as_typed_on_one_line(source: str, message: str) -> None:
    assert refusal(source) == message
    assert "\n" not in message


MARKDOWN_PIECES = (
    "\\", "\\\\", "\\&", "\\_", "\\#", "\\.", "\\{", "\\}", "\\ ", "\\a", "\\1", "&", "_",
    "%5C", "%5c", "%", "a", " ", "é", "?", "/", "#", "=", "{", "}",
    "{{order.number}}", "\\{{link.sub\\_id\\}}", "{{link.query.a\\&b}}", "{{link.query.a\\b}}",
)  # fmt: skip


def test_no_backslash_is_ever_sent_and_percent_5c_only_where_typed() -> None:
    rng = random.Random(2024)
    values = {"order.number": "1", "link.sub_id": "s", "link.query.a&b": "q"}
    accepted = 0
    refusals: list[str] = []
    for _ in range(3000):
        tail = "".join(rng.choices(MARKDOWN_PIECES, k=rng.randint(1, 8)))
        source = "https://t.example/" + tail
        try:
            template = parse(source)
        except TemplateError as exc:
            refusals.append(str(exc))
            continue
        accepted += 1
        url = render(template, values)
        assert "\\" not in url, source
        assert url.upper().count("%5C") == source.upper().count("%5C"), source
        assert urlsplit(url).hostname == template.host == "t.example"
    assert accepted > 300
    assert len(refusals) > 300
    assert not [message for message in refusals if "\n" in message]


# --- body -----------------------------------------------------------------------------------


def test_body_nests_the_variables_on_dots() -> None:
    assert body(variables(make_event())) == {
        "event": {
            "id": "evt_01HX",
            "type": "order.created",
            "occurred_at": "2024-05-01T12:30:00+02:00",
        },
        "affiliate": {"id": "aff-42"},
        "order": {
            "number": "#1001",
            "amount": "10.50",
            "commission": "1.05",
            "currency": "EUR",
            "status": "pending",
        },
        "link": {
            "url": LINK,
            "path": "/summer",
            "hash": "promo",
            "sub_id": "fb1",
            "query": {"ref": "ann", "campaign": "summer", "sub_id": "fb1"},
        },
    }


def test_body_keeps_a_dotted_query_name_as_one_key_and_always_has_query() -> None:
    dotted = variables(make_event(link={"url": "https://s.example/?utm.source=x&a.b.c=y"}))
    assert body(dotted)["link"]["query"] == {"utm.source": "x", "a.b.c": "y"}
    plain = variables(make_event(link={"url": "https://s.example/p"}))
    assert body(plain)["link"] == {
        "url": "https://s.example/p",
        "path": "/p",
        "hash": "",
        "sub_id": "",
        "query": {},
    }


# --- property-like: no value can change the host, path shape or query structure -----------------

NASTY = [
    "",
    " ",
    "a b",
    "&",
    "=",
    "a=b&c=d",
    "#frag",
    "?q=1",
    "/",
    "../../etc/passwd",
    "%",
    "%2F",
    "%%25",
    "+",
    "a+b c",
    "\\",
    "@evil.example",
    "//evil.example/x",
    "https://evil.example/",
    "\r\nHost: evil.example",
    "\x00",
    "Zoë 北京",
    "😀\u200b\ufeff",
    ";,:!$'()*[]{}<>\"|^`",
    "~-._",
    "{{order.number}}",
    "\t\x7f",
]


def _nasty_values() -> list[str]:
    rng = random.Random(3986)
    alphabet = [chr(c) for c in range(0x00, 0x80)] + list("éß北京😀\u00a0\u2028")
    generated = ["".join(rng.choices(alphabet, k=rng.randint(1, 24))) for _ in range(300)]
    return NASTY + generated


def test_no_value_can_change_host_path_or_query_structure() -> None:
    template = parse(
        "https://track.example/pb/{{order.number}}/end"
        "?a={{order.number}}&b={{order.status}}&c=fixed#{{link.hash}}"
    )
    values = _nasty_values()
    checked = 0
    for first, second in zip(values, reversed(values), strict=True):
        url = render(template, {"order.number": first, "order.status": second, "link.hash": first})
        split = urlsplit(url)
        assert (split.scheme, split.hostname, split.port) == ("https", "track.example", None), url
        segments = split.path.split("/")
        assert len(segments) == 4, url
        assert segments[:2] == ["", "pb"]
        assert segments[3] == "end"
        assert unquote(segments[2]) == first
        assert parse_qsl(split.query, keep_blank_values=True) == [
            ("a", first),
            ("b", second),
            ("c", "fixed"),
        ], url
        assert unquote(split.fragment) == first
        assert url.isascii()
        assert all(c.isalnum() or c in "-._~%/?&=#:" for c in url), url
        checked += 1
    assert checked == len(NASTY) + 300


def test_a_parsed_template_is_immutable_and_reusable() -> None:
    template = parse("https://t.example/?o={{order.number}}")
    assert isinstance(template, Template)
    assert [render(template, {"order.number": str(n)}) for n in range(3)] == [
        "https://t.example/?o=0",
        "https://t.example/?o=1",
        "https://t.example/?o=2",
    ]
    with pytest.raises(AttributeError):
        template.source = "https://other.example/"  # type: ignore[misc]


def test_characters_a_request_line_cannot_carry_are_encoded_and_valid_ones_kept() -> None:
    template = parse("https://t.example/pfad mit/ü?x=%2F&a[]=1;b=+{{order.number}}")
    assert render(template, {"order.number": "#1"}) == (
        "https://t.example/pfad%20mit/%C3%BC?x=%2F&a[]=1;b=+%231"
    )
    assert template.source == "https://t.example/pfad mit/ü?x=%2F&a[]=1;b=+{{order.number}}"
