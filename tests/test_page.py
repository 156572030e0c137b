"""The ops page in a real headless browser: Chromium, driven by Playwright.

The browser is $POSTBACK_TEST_CHROMIUM, else Debian's /usr/bin/chromium, else Playwright's
own (tests/prerequisites.py, which `make test` runs first, obtains one where it can).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect

from producer import EVENT_TYPES, parse_event
from producer.publish import Producer
from tests import prerequisites
from tests.support.events import event_data, save_callback
from tests.support.ledger import make_deliveries
from tests.support.receivers import Flaky
from tests.support.service import OPS_TOKEN, Api
from tests.support.workers import drain
from worker import ledger
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
"""Where to save a screenshot of the page with a delivery open (the README's is made so)."""

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


async def open_page(browser: Browser, api: Api) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 800})
    # The page must work with no network but the service: fail the test on any other.
    await page.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(api.url) else route.abort(),
    )
    await page.goto(api.url + "/")
    await page.fill("#token", OPS_TOKEN)
    await page.fill("#actor", "dana")
    await page.click("#login button[type=submit]")
    await expect(page.locator("#login")).to_be_hidden()
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
    if SCREENSHOT:
        await page.screenshot(path=SCREENSHOT, full_page=True)

    flaky.fixed = True
    await page.click("#replay-rerender")
    await expect(page.locator("#message")).to_have_text("Replayed: the delivery is queued again.")
    await expect(rows).to_have_count(0)  # the list updated: #1002 is no longer a dead letter
    await expect(page.locator("#detail-title")).to_have_text("bob · order #1002 · pending")
    await expect(page.locator("#actions li")).to_contain_text("replay (rerender) by dana")
    await expect(page.locator("#replay-rerender")).to_be_disabled()

    await drain(settings)
    assert flaky.paths[-1] == "/fail/bob?o=%231002"
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
    await expect(page.locator("#message")).to_have_text("Replayed: the delivery is queued again.")
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
    assert asked == ['Replay all dead letters matching {"affiliate":"bob"}?']
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
