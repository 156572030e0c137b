"""The ops page in a real headless browser: Chromium, driven by Playwright.

The browser is $POSTBACK_TEST_CHROMIUM, else Debian's /usr/bin/chromium, else Playwright's
own (tests/prerequisites.py, which `make test` runs first, obtains one where it can).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from playwright.async_api import Browser, Dialog, Page, Request, async_playwright, expect

from ops.cli.demo import serve
from producer import EVENT_TYPES, parse_event
from producer.publish import Producer
from tests import prerequisites
from tests.support.cli import postback_env
from tests.support.demo import staying_demo
from tests.support.events import event_data, events, publish, save_callback
from tests.support.ledger import (
    DELAYED_REASON,
    add_delivery,
    make_deliveries,
    make_store_wide_and_delayed,
)
from tests.support.receivers import Flaky
from tests.support.service import OPS_TOKEN, Api, running_service, with_tokens
from tests.support.wait import until
from tests.support.workers import drain
from worker import callbacks, ledger
from worker.config import Settings
from worker.deliver import delivery_id
from worker.exchange import FAILURE_CLASSES
from worker.ledger import STATES

# Flags for a machine with no display and a closed network: without the background
# networking ones, Chromium keeps trying to reach Google's hosts.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("POSTBACK_TEST_SCREENSHOT")
"""Where to save a screenshot of the demo's page with its dead letter open (the README's
is made so)."""


NO_WORKER = "Replayed and queued, but no worker is alive to send it: it goes when one starts."

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = prerequisites.chromium(playwright.chromium.executable_path)
        assert chromium is not None, prerequisites.NO_CHROMIUM
        assert chromium.exists(), f"POSTBACK_TEST_CHROMIUM={chromium} does not exist"
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, api: Api, view: str = "dead", token: str = OPS_TOKEN) -> Page:
    """The page logged in with `token`, on the tab `view`: the Overview opens first."""
    page = await browser.new_page(viewport={"width": 1400, "height": 800})
    # The page must work with no network but the service: fail the test on any other.
    await page.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(api.url) else route.abort(),
    )
    await page.goto(api.url + "/")
    await page.fill("#token", token)
    await page.fill("#actor", "dana")
    await page.click("#login button[type=submit]")
    await expect(page.locator("#login")).to_be_hidden()
    await expect(page.locator("nav .tab.current")).to_have_attribute("data-view", "overview")
    if view != "overview":
        await page.click(f"nav button[data-view={view}]")
    if view == "dead":
        await expect(page.locator("#state-filter")).to_be_hidden()  # dead letters are all dead
    return page


async def test_the_page_lists_opens_and_replays_a_dead_letter(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=2)
    page = await open_page(browser, api)

    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("#count")).to_have_text("2 dead letters")
    await expect(page.locator("#health")).to_have_text("down: worker")

    await page.fill("#filters input[name=order]", "#1002")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await rows.first.click()
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · dead")
    await expect(page.locator("#attempts tr")).to_have_count(3)
    await expect(page.locator("#attempts tr").first).to_contain_text("HTTP 500")
    await expect(page.locator("#attempts tr").first).to_contain_text("down for maintenance")

    flaky.fixed = True
    await page.click("#replay-rerender")
    # No worker runs yet (the badge says so): the message says the replay waits for one.
    await expect(page.locator("#message")).to_have_text(NO_WORKER)
    await expect(rows).to_have_count(0)  # the list updated: #1002 is no longer a dead letter
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · pending")
    await expect(page.locator("#actions li")).to_contain_text("replay (rerender) by dana")
    await expect(page.locator("#replay-rerender")).to_be_disabled()

    # A worker sends it: the page, following the delivery, shows it delivered unasked.
    await drain(settings)
    assert flaky.paths[-1] == "/fail/bob?o=%231002"
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · delivered")
    await expect(page.locator("#message")).to_have_text(NO_WORKER + " Now delivered.")
    await expect(page.locator("#attempts tr")).to_have_count(4)
    await page.click("#filters button[type=submit]")
    await page.fill("#filters input[name=order]", "")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1)  # #1001 is still dead
    await page.close()


async def test_the_page_discards_with_a_note_and_test_fires_a_callback(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=2)
    page = await open_page(browser, api)
    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(2)
    await rows.first.click()
    await page.click("#discard")
    await expect(page.locator("#message")).to_contain_text("Say why")
    await page.fill("#discard-note", "order cancelled by the shop")
    await page.click("#discard")
    await expect(rows).to_have_count(1)
    await expect(page.locator("#actions li")).to_contain_text("discard by dana at")
    await expect(page.locator("#actions li")).to_contain_text("order cancelled by the shop")

    await page.click("nav button[data-view=deliveries]")
    await expect(page.locator("#rows tr")).to_have_count(5)  # ann 2, bob 2, carol 1

    await page.click("nav button[data-view=callbacks]")
    callback_rows = page.locator("#callback-rows tr")
    await expect(callback_rows).to_have_count(3)
    ann = callback_rows.filter(has_text="ann").filter(has_text="order.created")
    await ann.get_by_role("button", name="Test fire").click()
    result = page.locator("#fire-result")
    await expect(result).to_contain_text("GET " + flaky.url + "/ann?o=TEST-1001")
    await expect(result).to_contain_text("HTTP 200")
    await page.close()


async def test_a_wrong_token_sends_you_back_to_the_login(api: Api, browser: Browser) -> None:
    page = await browser.new_page()
    await page.goto(api.url + "/")
    await page.fill("#token", "not-the-token-at-all")
    await page.click("#login button[type=submit]")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#login-error")).to_have_text("wrong token")
    await page.close()


async def test_the_page_says_what_an_update_waits_for_and_that_one_went_without_its_create(
    api: Api, db: asyncpg.Connection, browser: Browser
) -> None:
    """The ledger's own functions put one update waiting for its create, and let another
    go without one; the page says so in the list and in the detail."""
    order = {"number": "#7", "amount": "1", "commission": "0"}
    waiting = parse_event(
        event_data("waits", type="order.updated", occurred_at="2026-11-29T09:00:00Z")
    )
    alone = parse_event(
        event_data("alone", type="order.updated", order=order, occurred_at="2026-11-29T09:00:00Z")
    )
    taken = await ledger.take(db, delivery_id(waiting), waiting, None, "job-a", 60, None, None, 600)
    assert taken.action == "awaiting"
    went = await ledger.take(db, delivery_id(alone), alone, None, "job-b", 60, None, None, 0.0)
    assert (went.action, went.gave_up_waiting) == ("claimed", True)

    page = await open_page(browser, api)
    await page.click("nav button[data-view=deliveries]")
    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(2)
    waiting_row = rows.filter(has_text="#1001")
    await expect(waiting_row).to_contain_text(
        "waiting for its order.created, not received yet; goes without it at"
    )
    await waiting_row.click()
    await expect(page.locator("#detail-facts")).to_contain_text("waiting for its order.created")
    await rows.filter(has_text="#7").click()
    await expect(page.locator("#detail-facts")).to_contain_text(
        "sent without its order.created: none had come 0 s after the order's first update"
    )
    await page.close()


async def test_the_page_resends_replays_all_matching_and_filters_deliveries_by_state(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    # Dead letters: bob's #1001, #1002 and #1003, and dan's #2001.
    await save_callback(db, "dan", "order.created", "GET", flaky.url + "/fail/dan")
    order = {"number": "#2001", "amount": "1", "commission": "0.1"}
    await producer.publish(event_data("dan", affiliate_id="dan", order=order))
    await make_deliveries(db, producer, flaky, settings, dead=3)
    # bob fixed his URL since; his receiver is back, and so is dan's.
    await save_callback(
        db, "bob", "order.created", "GET", flaky.url + "/new/bob?o={{order.number}}"
    )
    flaky.fixed = True
    flaky.paths.clear()

    page = await open_page(browser, api)
    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(4)

    # Resend: the request as it was, to the URL bob had then.
    await page.fill("#filters input[name=order]", "#1001")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await rows.first.click()
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1001 · dead")
    await page.click("#replay-resend")
    await expect(page.locator("#message")).to_have_text(NO_WORKER)
    await expect(page.locator("#actions li")).to_contain_text("replay (resend) by dana")

    # Replay all matching: bob's two left, not dan's.
    await page.fill("#filters input[name=order]", "")
    await page.fill("#filters input[name=affiliate]", "bob")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(2)
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await page.click("#replay-all")
    await expect(page.locator("#message")).to_have_text("Replayed 2, skipped 0, failed 0.")
    await expect(rows).to_have_count(0)
    assert asked == ["Replay 2 dead letters of affiliate bob?"]
    await page.fill("#filters input[name=affiliate]", "")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("dan")

    await drain(settings)
    assert sorted(flaky.paths) == [
        "/fail/bob?o=%231001",
        "/new/bob?o=%231002",
        "/new/bob?o=%231003",
    ]

    # Deliveries, by state: ann's two and bob's three delivered, dan's dead, carol's skipped.
    await page.click("nav button[data-view=deliveries]")
    await expect(rows).to_have_count(7)
    # The choices are the API's own, as its OpenAPI document lists them.
    for name, known in (
        ("event_type", EVENT_TYPES),
        ("state", STATES),
        ("error_class", FAILURE_CLASSES),
    ):
        options = page.locator(f"#filters select[name={name}] option")
        await expect(options).to_have_text(["any", *known])
    state = page.locator("#filters select[name=state]")
    for chosen, affiliates in (
        ("delivered", ["ann", "ann", "bob", "bob", "bob"]),
        ("dead", ["dan"]),
        ("skipped", ["carol"]),
        ("retrying", []),
    ):
        await state.select_option(chosen)
        await page.click("#filters button[type=submit]")
        await expect(rows).to_have_count(len(affiliates))
        await expect(rows.locator("td:nth-child(5)")).to_have_text([chosen] * len(affiliates))
        assert sorted(await rows.locator("td:nth-child(2)").all_text_contents()) == affiliates
    await page.close()


async def test_a_replay_that_dies_again_says_both_counts_and_redis_down_is_told(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    """The list's Tries and the reason agree after a replay; a replay that Redis did not
    take says it is left to the sweep."""
    await make_deliveries(db, producer, flaky, settings, dead=2)
    page = await open_page(browser, api)
    rows = page.locator("#rows tr")
    await rows.filter(has_text="#1001").click()
    await page.click("#replay-rerender")
    await expect(page.locator("#message")).to_have_text(NO_WORKER)
    await drain(settings)  # bob's receiver still fails: three more attempts
    again = "gave up after 3 attempts since the replay (6 in all), last: HTTP 500"
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1001 · dead")
    await expect(page.locator("#message")).to_have_text(NO_WORKER + f" Now dead: {again}.")
    await expect(page.locator("#detail-facts")).to_contain_text(f"dead: {again}")
    await expect(page.locator("#attempts tr")).to_have_count(6)
    row = rows.filter(has_text="#1001")
    await expect(row.locator("td:nth-child(6)")).to_have_text("6")
    await expect(row.locator("td:nth-child(9)")).to_have_text(again)
    await page.close()

    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_service(gone) as down:
        page = await open_page(browser, down)
        await page.clock.install()  # to let the two minutes of following pass at once
        await expect(page.locator("#health")).to_have_text("down: redis, worker")
        await page.locator("#rows tr").filter(has_text="#1002").click()
        await page.click("#replay-rerender")
        left = (
            "Replayed, but Redis is unreachable: the delivery is reopened, "
            "and the sweep queues it within a minute."
        )
        await expect(page.locator("#message")).to_have_text(left)
        await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · pending")
        # Nothing sends it here: the page follows it for two minutes, then says it stopped.
        for _ in range(250):  # a second at a time, each look at the delivery answered
            await page.clock.run_for(1000)
            if "Still" in (await page.locator("#message").text_content() or ""):
                break
            await page.wait_for_timeout(20)
        await expect(page.locator("#message")).to_have_text(
            left + " Still pending after 2 minutes; the page stopped following it: "
            "open it again to look."
        )
        await page.close()


async def test_replay_all_asks_with_the_number_and_an_empty_list_says_why(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    page = await open_page(browser, api)
    count = page.locator("#count")
    await expect(count).to_have_text(
        "No dead letters: nothing has failed, or every failure was replayed or discarded."
    )
    await page.click("nav button[data-view=deliveries]")
    await expect(count).to_have_text("No deliveries yet: no event has been received.")

    await make_deliveries(db, producer, flaky, settings, dead=3)
    await page.click("nav button[data-view=dead]")
    await expect(page.locator("#rows tr")).to_have_count(3)
    asked: list[str] = []

    async def refuse(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", refuse)
    await page.click("#replay-all")
    await until(lambda: len(asked) == 1, what="the question")
    await page.fill("#filters input[name=affiliate]", "bob")
    await page.fill("#filters input[name=since]", "1h")
    await page.click("#replay-all")
    await until(lambda: len(asked) == 2, what="the question")
    assert asked == [
        "Replay 3 dead letters: every dead letter there is?",
        "Replay 3 dead letters of affiliate bob, since 1h?",
    ]
    await expect(page.locator("#rows tr")).to_have_count(3)  # dismissed: nothing replayed

    await page.fill("#filters input[name=affiliate]", "ann")
    await page.click("#replay-all")  # none to replay: said, not asked
    none = "No dead letters match affiliate ann, since 1h."
    await expect(page.locator("#message")).to_have_text(none)
    await page.click("#filters button[type=submit]")
    await expect(count).to_have_text(none)
    assert len(asked) == 2
    await page.close()


async def test_opening_the_detail_moves_no_row_and_placeholders_fit(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=3)
    page = await open_page(browser, api)
    rows = page.locator("#rows tr")
    # Wide: the detail opens beside the list; narrower: under it.
    for width in (1400, 1000):
        await page.set_viewport_size({"width": width, "height": 800})
        await page.click("nav button[data-view=deliveries]")  # the detail closed
        await expect(page.locator("#detail")).to_be_hidden()
        await expect(rows).to_have_count(6)
        before = [await row.bounding_box() for row in await rows.all()]
        box = await rows.filter(has_text="#1002").bounding_box()
        assert box is not None
        x, y = box["x"] + 40, box["y"] + box["height"] / 2
        await page.mouse.click(x, y)
        await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · dead")
        after = [await row.bounding_box() for row in await rows.all()]
        # Each row where it was, as tall as it was: none rewrapped; the cursor on its row.
        assert [(b["y"], b["height"]) for b in after if b] == [
            (b["y"], b["height"]) for b in before if b
        ], width
        under = await page.evaluate(
            "([x, y]) => document.elementFromPoint(x, y).closest('tr').textContent", [x, y]
        )
        assert "#1002" in under, width
        reason = "gave up after 3 attempts, last: HTTP 500"  # cut, and whole on hover
        cut = rows.filter(has_text="#1002").locator("td:nth-child(9)")
        await expect(cut).to_have_attribute("title", reason)
        # Every column of the list in view: cut cells, no scrolling sideways.
        assert await page.evaluate(
            "() => { const s = document.getElementById('list');"
            " return s.scrollWidth <= s.clientWidth; }"
        ), width

    # The filters' and the detail's placeholders, then the login's.
    assert await page.evaluate(PLACEHOLDERS_TOO_WIDE) == []
    await page.close()
    page = await browser.new_page(viewport={"width": 1000, "height": 800})
    await page.goto(api.url + "/")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate(PLACEHOLDERS_TOO_WIDE) == []
    await page.close()


PLACEHOLDERS_TOO_WIDE = """() => {
  const context = document.createElement("canvas").getContext("2d");
  return [...document.querySelectorAll("input[placeholder]")]
    .filter((input) => input.offsetParent !== null)
    .map((input) => {
      const style = getComputedStyle(input);
      context.font = style.font;
      const room = input.clientWidth - parseFloat(style.paddingLeft)
        - parseFloat(style.paddingRight);
      return [input.name || input.id, context.measureText(input.placeholder).width, room];
    })
    .filter(([, needs, room]) => needs > room);
}"""
"""The shown inputs whose placeholder is wider than the box, in the font the box uses."""


async def test_the_page_works_under_its_content_security_policy_and_shows_markup_as_text(
    api: Api, db: asyncpg.Connection, producer: Producer, settings: Settings, browser: Browser
) -> None:
    """Markup a producer or a receiver wrote is text on the page; nothing the policy blocks
    is needed, nothing but the service is asked, and the token is never in a URL."""
    markup = "<img src=x onerror=alert(1)>"

    async def answer_markup(request: web.Request) -> web.Response:
        return web.Response(status=500, text=markup + "<script>alert(2)</script>")

    async with serve(answer_markup) as url:
        await save_callback(db, "eve", "order.created", "GET", url + "/pb?o={{order.number}}")
        order = {"number": markup, "amount": "1", "commission": "0.1"}
        await producer.publish(event_data("eve", affiliate_id="eve", order=order))
        await drain(settings.model_copy(update={"retry_schedule": ""}))

    page = await browser.new_page(viewport={"width": 1400, "height": 800})
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    failed: list[str] = []
    page.on(
        "response",
        lambda response: (
            failed.append(f"{response.status} {response.url}") if response.status >= 400 else None
        ),
    )
    await page.goto(api.url + "/")
    await page.fill("#token", OPS_TOKEN)
    await page.click("#login button[type=submit]")
    await expect(page.locator("#overview")).to_be_visible()  # drawn under the policy too
    await page.click("nav button[data-view=dead]")
    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td:nth-child(4)")).to_have_text(markup)
    await rows.first.click()
    await expect(page.locator("#detail-title")).to_have_text(f"eve · order {markup} · dead")
    await expect(page.locator("#attempts .excerpt")).to_have_text(
        markup + "<script>alert(2)</script>"
    )
    await expect(page.locator("#event")).to_contain_text(markup)
    await page.click("nav button[data-view=deliveries]")
    await expect(rows).to_have_count(1)
    await page.click("nav button[data-view=callbacks]")
    await expect(page.locator("#callback-rows tr")).to_have_count(1)

    assert await page.locator("main img, main script").count() == 0
    assert dialogs == []
    # /healthz answers 503 (no worker runs here), which Chromium logs; nothing else may be
    # logged: a script, style or request the policy blocked would be.
    healthz = f"503 {api.url}/healthz"
    assert {f for f in failed if f != healthz} == set()  # no 404 for the favicon either
    assert console == [
        "error: Failed to load resource: the server responded with a status of 503 "
        "(Service Unavailable)"
    ] * len(failed)
    assert any(r.url == api.url + "/page/favicon.svg" for r in requests)
    assert all(OPS_TOKEN not in r.url for r in requests)
    calls = [r for r in requests if "/v1/" in r.url]
    assert calls
    for request in calls:
        assert await request.header_value("Authorization") == f"Bearer {OPS_TOKEN}"
    await page.close()


async def ann_callback(db: asyncpg.Connection) -> callbacks.Callback:
    found = await callbacks.get(db, "ann", "order.created")
    assert found is not None
    return found


async def test_the_callbacks_tab_sets_edits_switches_and_removes_a_callback(
    api: Api, db: asyncpg.Connection, flaky: Flaky, browser: Browser
) -> None:
    page = await open_page(browser, api)
    await page.click("nav button[data-view=callbacks]")
    await expect(page.locator("#count")).to_have_text(
        "No callbacks yet: set one up with the form above."
    )
    form = page.locator("#callback-form")
    preview = page.locator("#cb-preview")
    url = form.locator("input[name=url]")
    url_error = form.locator(".field-error[data-field=url]")
    secret_error = form.locator(".field-error[data-field=secret]")
    message = page.locator("#message")
    rows = page.locator("#callback-rows tr")

    # New: the rendered request shows as the template is typed; a refusal shows under its
    # field as the API (and `postback callbacks set`) words it.
    await page.click("#cb-save")
    await expect(form.locator(".field-error[data-field=affiliate_id]")).to_have_text(
        "affiliate id must be 1 to 64 characters"
    )
    await form.locator("input[name=affiliate_id]").fill("ann")
    await url.press_sequentially(flaky.url + "/ann?o={{order.numbr}}")
    await expect(url_error).to_have_text(
        "unknown variable 'order.numbr' in template; did you mean 'order.number'?"
    )
    await expect(preview).to_have_text("No request until what is marked is fixed.")
    await url.fill(flaky.url + "/ann?o={{order.number}}")
    await expect(preview).to_have_text(f"Sample order TEST-1001: GET {flaky.url}/ann?o=TEST-1001")
    await expect(url_error).to_be_empty()
    await form.locator("select[name=secret_action]").select_option("generate")
    await page.click("#cb-save")
    template = flaky.url + "/ann?o={{order.number}}"
    await expect(message).to_have_text(
        f"Saved the order.created callback of affiliate ann: GET {template}; secret set."
    )
    generated = await page.locator("#cb-secret-value").text_content() or ""
    assert generated.startswith("whsec_")  # shown this once
    await expect(rows).to_have_count(1)
    cells = rows.first.locator("td")
    await expect(cells.nth(4)).to_have_text("set")
    await expect(cells.nth(5)).to_have_text("all")  # statuses
    await expect(cells.nth(6)).to_have_text("none")  # delay
    await expect(cells.nth(7)).to_have_text(template)
    assert (await ann_callback(db)).secret == generated

    # Edit: method, template and secret; the stored secret is never shown back.
    await rows.first.get_by_role("button", name="Edit").click()
    await expect(page.locator("#cb-title")).to_have_text(
        "Edit the order.created callback of affiliate ann"
    )
    await expect(page.locator("#cb-secret-now")).to_have_text("set")
    assert generated not in await page.content()
    await form.locator("select[name=method]").select_option("POST")
    await url.fill(flaky.url + "/hook/{{affiliate.id}}")
    await expect(preview).to_have_text(
        f"Sample order TEST-1001: POST {flaky.url}/hook/ann (the order as a JSON body)"
    )
    await form.locator("select[name=secret_action]").select_option("set")
    await form.locator("input[name=secret]").fill("whsec_!!")
    await page.click("#cb-save")
    await expect(secret_error).to_contain_text("must be followed by base64 key bytes")
    await form.locator("input[name=secret]").fill("whsec_c2VjcmV0")
    await page.click("#cb-save")
    await expect(message).to_have_text(
        f"Saved the order.created callback of affiliate ann: POST {flaky.url}"
        "/hook/{{affiliate.id}}; secret set."
    )
    await expect(secret_error).to_be_empty()
    await expect(page.locator("#cb-secret-shown")).to_be_hidden()
    stored = await ann_callback(db)
    assert (stored.method, stored.secret) == ("POST", "whsec_c2VjcmV0")
    assert "whsec_c2VjcmV0" not in await page.content()

    # Saved again as it is told to (the form goes on editing it), the secret is kept.
    await expect(form.locator("select[name=secret_action]")).to_have_value("keep")
    await form.locator("select[name=method]").select_option("GET")
    await page.click("#cb-save")
    await expect(cells.nth(2)).to_have_text("GET")
    assert (await ann_callback(db)).secret == "whsec_c2VjcmV0"

    # Remove the secret.
    await form.locator("select[name=secret_action]").select_option("remove")
    await page.click("#cb-save")
    await expect(cells.nth(4)).to_have_text("none")
    await expect(page.locator("#cb-secret-now")).to_have_text("none")
    assert (await ann_callback(db)).secret is None

    # Disable; a test fire says it is disabled, and is sent all the same; enable.
    await rows.first.get_by_role("button", name="Disable").click()
    await expect(message).to_contain_text("Disabled the order.created callback of affiliate ann")
    await expect(cells.nth(3)).to_have_text("no")
    await rows.first.get_by_role("button", name="Test fire").click()
    result = page.locator("#fire-result")
    await expect(result).to_contain_text("This callback is disabled")
    await expect(result).to_contain_text("HTTP 200")
    assert flaky.paths == ["/hook/ann"]
    await rows.first.get_by_role("button", name="Enable").click()
    await expect(cells.nth(3)).to_have_text("yes")
    assert (await ann_callback(db)).enabled

    # Remove, after a confirmation that names it: first declined, then accepted.
    asked: list[str] = []
    answers = iter([False, True])

    async def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await (dialog.accept() if next(answers) else dialog.dismiss())

    page.on("dialog", answer)
    await rows.first.get_by_role("button", name="Remove").click()
    await until(lambda: asked, what="the confirmation")
    await expect(rows).to_have_count(1)
    await ann_callback(db)  # still there
    await rows.first.get_by_role("button", name="Remove").click()
    await expect(rows).to_have_count(0)
    await expect(message).to_have_text(
        "Removed the order.created callback of affiliate ann; its past deliveries stay recorded."
    )
    assert asked == ["Remove the order.created callback of affiliate ann?"] * 2
    assert await callbacks.get(db, "ann", "order.created") is None
    await page.close()


async def test_a_callback_the_relay_disabled_says_why_and_is_enabled_with_its_dead_letters(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    rule = Settings(**{**settings.model_dump(), "auto_disable_after": 3, "auto_disable_span": "0"})
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/fail")
    dead = await publish(producer, events("dies", 3))
    await drain(rule)
    page = await open_page(browser, api, "callbacks")
    rows = page.locator("#callback-rows tr")
    await expect(rows).to_have_count(2)
    cells = rows.first.locator("td")
    await expect(cells.nth(3)).to_have_text("no")
    await expect(cells.nth(8)).to_have_text("3")  # dead in a row
    await expect(rows.nth(1)).to_contain_text("Disabled by relay at ")
    await expect(rows.nth(1)).to_contain_text("3 deliveries in a row died since ")

    flaky.fixed = True
    await rows.first.get_by_role("button", name="Enable and replay its 3 dead letters").click()
    await expect(page.locator("#message")).to_have_text(
        "Enabled the order.created callback of affiliate ann. "
        "Replayed 3 of its 3 dead letters, skipped 0, failed 0."
    )
    await expect(rows).to_have_count(1)
    await expect(cells.nth(3)).to_have_text("yes")
    await expect(cells.nth(8)).to_have_text("-")
    enabled = await db.fetch("SELECT actor FROM actions WHERE action = 'enable'")
    assert [row["actor"] for row in enabled] == ["dana"]
    await drain(rule)
    states = await db.fetch("SELECT state FROM deliveries WHERE event_id = ANY($1::text[])", dead)
    assert [row["state"] for row in states] == ["delivered"] * 3
    await page.close()


async def test_the_callbacks_tab_sets_statuses_a_delay_and_a_store_wide_callback(
    api: Api, db: asyncpg.Connection, flaky: Flaky, browser: Browser
) -> None:
    page = await open_page(browser, api, "callbacks")
    form = page.locator("#callback-form")
    preview = page.locator("#cb-preview")
    statuses = form.locator("input[name=statuses]")
    delay = form.locator("input[name=delay]")
    statuses_error = form.locator(".field-error[data-field=statuses]")
    delay_error = form.locator(".field-error[data-field=delay]")
    rows = page.locator("#callback-rows tr")
    template = flaky.url + "/pb?s={{order.status}}&a={{affiliate.id}}"

    await form.locator("input[name=affiliate_id]").fill("*")
    await form.locator("input[name=url]").fill(template)
    await expect(preview).to_have_text(
        f"Sample order TEST-1001: GET {flaky.url}/pb?s=pending&a=sample-affiliate"
    )
    # Each refusal under its field as it is typed, worded as `postback callbacks set` does.
    await statuses.fill("approved,,x")
    await expect(statuses_error).to_have_text(
        "statuses must be order statuses separated by commas, e.g. approved,refunded; "
        "got an empty one"
    )
    await expect(statuses).to_have_class(re.compile("invalid"))
    await expect(preview).to_have_text("No request until what is marked is fixed.")
    await statuses.fill("refunded, approved")
    await expect(statuses_error).to_be_empty()
    await expect(preview).to_have_text(
        f"Sample order TEST-1001: GET {flaky.url}/pb?s=refunded&a=sample-affiliate"
    )
    await delay.fill("25h")
    await expect(delay_error).to_have_text(
        "delay '25h' is out of range; it may be 0 to 24h (86400 s)"
    )
    await page.click("#cb-save")  # refused by the PUT too, under the field
    await expect(delay_error).to_have_text(
        "delay '25h' is out of range; it may be 0 to 24h (86400 s)"
    )
    await expect(rows).to_have_count(0)
    await delay.fill("5m")
    await expect(delay_error).to_be_empty()
    await page.click("#cb-save")
    await expect(page.locator("#message")).to_have_text(
        f"Saved the store-wide order.created callback: GET {template}; "
        "statuses refunded, approved; delay 5m; secret none."
    )
    stored = await callbacks.get(db, "*", "order.created")
    assert stored is not None
    assert (stored.statuses, stored.delay_seconds) == (["refunded", "approved"], 300)
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td")).to_have_text(
        ["* (store-wide)", "order.created", "GET", "yes", "none", "refunded, approved", "5m",
         template, "-", re.compile("Edit")]
    )  # fmt: skip
    await expect(page.locator("#cb-title")).to_have_text(
        "Edit the store-wide order.created callback"
    )

    # Edited: the form holds them as saved; emptied, every status and no delay.
    await page.click("#cb-new")
    await expect(statuses).to_have_value("")
    await rows.first.get_by_role("button", name="Edit").click()
    await expect(statuses).to_have_value("refunded,approved")
    await expect(delay).to_have_value("5m")
    await statuses.fill("")
    await delay.fill("")
    await page.click("#cb-save")
    await expect(rows.first.locator("td:nth-child(6)")).to_have_text("all")
    await expect(rows.first.locator("td:nth-child(7)")).to_have_text("none")
    stored = await callbacks.get(db, "*", "order.created")
    assert stored is not None
    assert (stored.statuses, stored.delay_seconds) == (None, 0)
    await page.close()


async def test_the_page_says_which_callback_a_delivery_went_to_and_when_a_delayed_one_is_due(
    api: Api,
    db: asyncpg.Connection,
    producer: Producer,
    flaky: Flaky,
    settings: Settings,
    browser: Browser,
) -> None:
    made = await make_store_wide_and_delayed(db, producer, flaky, settings)
    due = f"due {made.due:%Y-%m-%d %H:%M:%S} UTC ({DELAYED_REASON})"
    page = await open_page(browser, api, "deliveries")
    rows = page.locator("#rows tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("#list th:nth-child(8)")).to_have_text("Callback")
    zed, ann = rows.filter(has_text="zed"), rows.filter(has_text="ann")
    await expect(zed.locator("td:nth-child(8)")).to_have_text("store-wide")
    await expect(ann.locator("td:nth-child(8)")).to_have_text("own")
    await expect(ann.locator("td:nth-child(9)")).to_have_text(due)

    facts = page.locator("#detail-facts")
    await zed.click()
    await expect(page.locator("#detail-title")).to_have_text("zed · order #9 · delivered")
    await expect(facts.locator("dt")).to_contain_text(["Callback"])
    await expect(facts).to_contain_text(f"#{made.store_callback} (store-wide)")
    await ann.click()
    await expect(page.locator("#detail-title")).to_have_text("ann · order #1001 · pending")
    await expect(facts).to_contain_text(f"pending: {due}")
    await expect(facts).to_contain_text(f"#{made.delayed_callback} (own)")
    await expect(facts).not_to_contain_text("Next try")  # the state says when
    await page.close()


async def test_the_overview_opens_first_charts_the_day_and_links_each_number_to_its_list(
    api: Api, db: asyncpg.Connection, browser: Browser
) -> None:
    hour = timedelta(hours=1)
    await add_delivery(db, "ann", "delivered", 0 * hour, [120])
    await add_delivery(db, "bob", "dead", 2 * hour, [300, 400], order="#1002")
    await add_delivery(db, "bob", "dead", 2 * hour, [500], order="#1003")
    await add_delivery(db, "bob", "retrying", 2 * hour, [250], order="#1004")
    await add_delivery(db, "carol", "dead", 30 * hour, [900])  # before the last 24 hours
    page = await open_page(browser, api, view="overview")
    tabs = page.locator("nav .tab")
    await expect(tabs.first).to_have_text("Overview")
    await expect(tabs.first).to_have_class(re.compile(r"\bcurrent\b"))
    await expect(page.locator("#list")).to_be_hidden()
    await expect(page.locator("#filters")).to_be_hidden()

    # A bar for each hour with deliveries: now (delivered) and two hours ago (dead, retrying).
    _, body = await api.call("GET", "/v1/overview")
    busy = [h["start"] for h in body["hours"] if any(h["states"].values())]
    assert len(busy) == 2
    bars = page.locator("#overview svg rect.bar")
    await expect(bars).to_have_count(3)
    charted = page.locator("#overview svg g.hour:has(rect.bar)")
    assert await charted.evaluate_all("hours => hours.map((h) => h.dataset.start)") == busy
    await expect(bars.and_(page.locator("[data-state=dead]")).locator("title")).to_have_text(
        re.compile(r"^\d\d:00 to \d\d:00 UTC: 2 dead$")
    )
    key = page.locator("#overview .legend .key")
    await expect(key.filter(has_text="dead")).to_have_text("dead 2")
    await expect(key.filter(has_text="delivered")).to_have_text("delivered 1")

    tiles = page.locator("#overview .tile")
    await expect(tiles.filter(has_text="Dead letters").locator(".tile-value")).to_have_text("3")
    await expect(tiles.filter(has_text="Retries waiting").locator(".tile-value")).to_have_text("1")
    # Of the window's five attempts: 120, 250, 300, 400, 500 ms (not carol's 900).
    attempt_time = tiles.filter(has_text="Attempt time")
    await expect(attempt_time.locator(".tile-value")).to_have_text("300 ms / 480 ms")
    await expect(tiles.filter(has_text="Queue").locator(".tile-value")).to_have_text("0 due")
    await expect(tiles.filter(has_text="Circuits")).to_contain_text("which alone know")
    failing = page.locator("#overview .failing tbody tr")
    await expect(failing).to_have_count(1)
    await expect(failing.first.locator("td")).to_have_text(["bob", "2", "1"])

    rows = page.locator("#rows tr")
    # Dead letters: the tab, unfiltered, with all three (carol's of yesterday too).
    await tiles.filter(has_text="Dead letters").get_by_role("link").click()
    await expect(page.locator("nav .tab.current")).to_have_text("Dead letters")
    await expect(rows).to_have_count(3)

    # An affiliate: its deliveries of the last 24 hours.
    await page.click("nav button[data-view=overview]")
    await failing.first.get_by_role("link", name="bob").click()
    await expect(page.locator("nav .tab.current")).to_have_text("Deliveries")
    await expect(page.locator("#filters input[name=affiliate]")).to_have_value("bob")
    await expect(page.locator("#filters input[name=since]")).to_have_value(body["since"])
    await expect(rows).to_have_count(3)
    await expect(rows.locator("td:nth-child(2)")).to_have_text(["bob"] * 3)

    # A bar: that hour's deliveries in that state.
    await page.click("nav button[data-view=overview]")
    await bars.and_(page.locator("[data-state=dead]")).click()
    await expect(page.locator("nav .tab.current")).to_have_text("Deliveries")
    await expect(page.locator("#filters select[name=state]")).to_have_value("dead")
    await expect(page.locator("#filters input[name=affiliate]")).to_have_value("")
    await expect(rows).to_have_count(2)
    await expect(rows.locator("td:nth-child(4)")).to_have_text(["#1003", "#1002"])
    await page.close()


async def test_the_overview_lists_the_notifications_newest_first_with_how_sending_went(
    api: Api, db: asyncpg.Connection, browser: Browser
) -> None:
    await db.fetchval(
        "SELECT postback_notify('dead_letters:ann', 'dead_letters', 'Postback affiliate ann: "
        "120 deliveries died', '{}')"
    )
    await db.execute("UPDATE notifications SET state = 'failed', error = 'HTTP 500: down'")
    await db.fetchval(
        "SELECT postback_notify('circuit_open:https://t.example:443', 'circuit_open', "
        "'Postback destination https://t.example:443: its circuit has been open for 16m', '{}')"
    )
    page = await open_page(browser, api, view="overview")
    rows = page.locator("#overview .notifications tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0).locator("td").nth(1)).to_have_text("circuit_open")
    await expect(rows.nth(0).locator("td").nth(3)).to_contain_text("open for 16m")
    await expect(rows.nth(1).locator("td").nth(2)).to_have_text("failed")
    await expect(rows.nth(1).locator("td").nth(2)).to_have_attribute("title", "HTTP 500: down")
    await page.close()


@pytest.mark.usefixtures("producer")  # an empty queue
async def test_the_demo_left_running_shows_its_dead_letter_and_a_live_worker(
    settings: Settings, browser: Browser
) -> None:
    """What a newcomer sees after `make demo`, with the token it printed: a healthy relay
    and demo-dan's dead letter to practise the runbook on (the README's screenshot)."""
    with staying_demo(postback_env(settings), "--stay", "--port", "0") as demo:
        async with aiohttp.ClientSession() as http:
            page = await open_page(browser, Api(demo.url.rstrip("/"), http), token=demo.token)
            await expect(page.locator("#health")).to_have_text("all up")
            rows = page.locator("#rows tr")
            await expect(rows).to_have_count(1)
            await rows.first.click()
            title = page.locator("#detail-title")
            await expect(title).to_have_text("demo-dan · order #1004 · dead")
            attempt = page.locator("#attempts tr").first
            await expect(attempt).to_contain_text("HTTP 404")
            await expect(attempt).to_contain_text("moved to /dan/v2/")
            if SCREENSHOT:
                await page.screenshot(path=SCREENSHOT, full_page=True)
            await page.close()
        demo.interrupt()
    assert demo.process.returncode == 0, demo.output + demo.stderr
