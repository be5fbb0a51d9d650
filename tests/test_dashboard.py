"""The dashboard in a real browser: Debian's Chromium, headless, driven by
Playwright against real FT and Core processes. Playwright never downloads a
browser here: it is given ``/usr/bin/chromium``.

The page must show prices changing without a reload, turn FT's box and the gRPC
link red when FT is killed and green when it is back, make no request to any
other host, log no console error, and not shift its layout while prices tick.
Screenshots at desktop and phone width are saved in the test's directory, and
also in ``$QUOTOPIA_SCREENSHOTS`` if set (``docs/`` holds the README's copies).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _kafka import tansu_broker
from _procs import QuotopiaProcess, missing_server, wait_until
from _services import DEADLINE, core_args, quotes, run_cli, running_core, running_ft
from playwright.sync_api import Browser, ConsoleMessage, Page, ViewportSize, sync_playwright

#: Core's static files. (Not imported from quotopia.core: that imports trio-asyncio,
#: whose event loop policy breaks Playwright's asyncio loop in this process.)
STATIC_FOLDER = Path(__file__).resolve().parents[1] / "quotopia" / "core" / "static"
DASHBOARD_PAGE = STATIC_FOLDER / "dashboard" / "index.html"

logger = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
#: Headless as root, and no traffic of Chromium's own (updates, sync, lookups):
#: this machine's network is closed, and the test checks every request it sees.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
#: Playwright's waits take milliseconds.
WAIT_MS = DEADLINE * 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        missing_server(
            f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)",
            in_ci=f"{CHROMIUM} is missing: .ci/run installs Debian's chromium",
        )
    # trio-asyncio (which Core's modules import, in other tests of this process)
    # installs its own event loop policy; Playwright's sync API needs asyncio's.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                yield launched
            finally:
                launched.close()
    finally:
        asyncio.set_event_loop_policy(policy)


class Watched:
    """A page, with every console error, page error and request host it had.

    One error Chromium logs is no error of the page: a history route's 503 (Core
    has no history database), which the page handles by using Core's own quotes.
    """

    def __init__(self, browser: Browser, viewport: ViewportSize) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.hosts: set[str] = set()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.hosts.add(urlsplit(request.url).netloc))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if "status of 503" in message.text and "/history?" in message.location.get("url", ""):
            return
        self.errors.append(message.text)

    def close(self) -> None:
        self.context.close()


def screenshot(watched: Watched, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    watched.page.screenshot(path=str(path), full_page=True)
    if wanted := os.environ.get("QUOTOPIA_SCREENSHOTS"):
        shutil.copy(path, Path(wanted) / name)
    return path


@contextmanager
def live_dashboard(
    browser: Browser, origin: str, viewport: ViewportSize = DESKTOP
) -> Iterator[Watched]:
    """The dashboard of the Core at ``origin``, once its push connection is live."""
    watched = Watched(browser, viewport)
    try:
        watched.page.goto(f"http://{origin}/")
        watched.page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
        yield watched
    finally:
        watched.close()


def map_state(page: Page, key: str) -> str | None:
    return page.get_attribute(f'#map [data-key="{key}"]', "data-state")


def wait_for_state(page: Page, key: str, state: str) -> None:
    page.wait_for_selector(f'#map [data-key="{key}"][data-state="{state}"]', timeout=WAIT_MS)


@pytest.mark.e2e
def test_the_dashboard_is_live_and_its_map_follows_ft(browser: Browser, tmp_path: Path) -> None:
    with running_ft() as ft, running_core(ft.port) as core:
        origin = f"127.0.0.1:{core.port}"
        with live_dashboard(browser, origin) as watched:
            page = watched.page
            price = page.locator('.card[data-symbol="BTC"] .price data')
            price.wait_for(timeout=WAIT_MS)
            first = price.inner_text()
            # Prices change on screen, with no reload.
            page.wait_for_function(
                "first => document.querySelector('.card[data-symbol=\"BTC\"] .price data')"
                ".textContent !== first",
                arg=first,
                timeout=WAIT_MS,
            )
            assert page.locator(".card").count() == 3
            wait_for_state(page, "ft", "up")
            wait_for_state(page, "ft->core", "up")
            assert page.locator('#map [data-key="ft->core"] .state').inner_text() == "connected"

            # Layout shift while prices tick: none.
            page.evaluate(
                """() => {
                    window.shifted = 0;
                    new PerformanceObserver(list => {
                        for (const entry of list.getEntries())
                            if (!entry.hadRecentInput) window.shifted += entry.value;
                    }).observe({type: "layout-shift"});
                }"""
            )
            sequence = page.locator('.card[data-symbol="ETH"] .price data')
            for _ in range(3):
                before = sequence.inner_text()
                page.wait_for_function(
                    "before => document.querySelector('.card[data-symbol=\"ETH\"] .price data')"
                    ".textContent !== before",
                    arg=before,
                    timeout=WAIT_MS,
                )
            assert page.evaluate("window.shifted") < 0.01
            screenshot(watched, "dashboard-desktop.png", tmp_path)

            # Kill FT: its box and the link turn red; Core and the page stay up.
            killed = time.monotonic()
            ft.process.kill()
            wait_for_state(page, "ft", "down")
            wait_for_state(page, "ft->core", "down")
            logger.info("FT's box turned red %.2fs after the kill", time.monotonic() - killed)
            assert page.locator('#map [data-key="ft->core"] .state').inner_text() == "retrying"
            assert map_state(page, "core") == "up"
            assert page.get_attribute("#connection", "data-state") == "live"
            screenshot(watched, "dashboard-feed-down.png", tmp_path)

            # FT again: green again, one reconnect, prices moving.
            with running_ft(port=ft.port, seed=2):
                wait_for_state(page, "ft", "up")
                wait_for_state(page, "ft->core", "up")
                assert "Reconnects: 1" in page.locator('#map [data-key="ft->core"]').inner_text()
                now = price.inner_text()
                page.wait_for_function(
                    "now => document.querySelector('.card[data-symbol=\"BTC\"] .price data')"
                    ".textContent !== now",
                    arg=now,
                    timeout=WAIT_MS,
                )

                with live_dashboard(browser, origin, PHONE) as phone:
                    wait_for_state(phone.page, "ft", "up")
                    # Filled from Core's recent history: not empty on arrival.
                    phone.page.wait_for_selector(".card .plot canvas", timeout=WAIT_MS)
                    width = phone.page.evaluate("document.documentElement.scrollWidth")
                    assert width <= PHONE["width"], "the page scrolls sideways on a phone"
                    screenshot(phone, "dashboard-phone.png", tmp_path)
                    assert phone.errors == []
                    assert phone.hosts == {origin}
            assert watched.errors == []
            assert watched.hosts == {origin}


@pytest.mark.e2e
def test_fed_from_kafka_the_map_goes_through_the_broker(browser: Browser, tmp_path: Path) -> None:
    with (
        tansu_broker() as broker,
        # Tansu refuses aiokafka's idempotent producer (tests/test_kafka_harness.py).
        running_ft("--kafka", broker.bootstrap, "--no-kafka-idempotence") as ft,
        QuotopiaProcess(
            *core_args(ft.port, "--source", "kafka", "--kafka", broker.bootstrap)
        ) as core,
    ):
        port = int(core.wait_for_line(r"Core listening on http://127\.0\.0\.1:(\d+)", DEADLINE)[1])
        origin = f"127.0.0.1:{port}"
        with live_dashboard(browser, origin) as watched:
            page = watched.page
            for key in ("ft", "ft->kafka", "kafka", "kafka->core", "core"):
                wait_for_state(page, key, "up")
            order = page.eval_on_selector_all(
                "#map [data-key]", "items => items.map(item => item.dataset.key)"
            )
            assert order == [
                "ft",
                "ft->kafka",
                "kafka",
                "kafka->core",
                "core",
                "core->clients",
                "clients",
            ]
            assert broker.bootstrap in page.locator('#map [data-key="kafka"]').inner_text()
            assert page.locator('#map [data-key="ft->kafka"] .state').inner_text() == "publishing"
            assert page.locator('#map [data-key="kafka->core"] .state').inner_text() == "connected"
            screenshot(watched, "dashboard-kafka.png", tmp_path)

            # Kill FT: no quote reaches the topic any more. FT and Core's feed turn
            # red; the broker, which still answers Core, stays green.
            ft.process.kill()
            wait_for_state(page, "ft", "down")
            wait_for_state(page, "ft->kafka", "down")
            wait_for_state(page, "kafka->core", "down")
            assert page.locator('#map [data-key="ft->kafka"] .state').inner_text() == "silent"
            assert page.locator('#map [data-key="kafka->core"] .state').inner_text() == "retrying"
            assert map_state(page, "kafka") == "up"
            assert map_state(page, "core") == "up"

            # Kill the broker too: now its box turns red.
            broker.kill()
            wait_for_state(page, "kafka", "down")
            assert watched.errors == []
            assert watched.hosts == {origin}


def _stored_btc(db: str, count: int) -> tuple[str, float]:
    """Store ``count`` BTC quotes of a past FT run, five a second from 9 minutes ago
    (inside the charts' 10 minutes), as the recorder would have; return the first's
    time (as JavaScript writes it) and its price, which no quote of this test's FT has."""
    from sqlalchemy import create_engine

    from quotopia.history import queries
    from quotopia.history.database import parse_database_url
    from quotopia.history.queries import StoredQuote

    url = parse_database_url(db)
    assert url is not None
    first_ms = (time.time_ns() // 1_000_000) - 9 * 60_000
    price = 12345.67
    rows = [
        StoredQuote("BTC", 4242, n, (first_ms + n * 200) * 1000, price + n, 0.01)
        for n in range(count)
    ]
    # Blocking, in this thread: Playwright's event loop runs in it.
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            queries.insert_quotes(connection, rows)
    finally:
        engine.dispose()
    first = datetime.fromtimestamp(first_ms / 1000, UTC)
    return first.isoformat(timespec="milliseconds").replace("+00:00", "Z"), price


@pytest.mark.e2e
def test_the_charts_start_from_the_history_database(browser: Browser, tmp_path: Path) -> None:
    """With a database, a chart holds quotes from before Core started, which only the
    database has, fetched page by page from /history (and nothing logs an error)."""
    db = f"sqlite:///{tmp_path / 'quotes.db'}"
    upgraded = run_cli("db", "upgrade", "--db", db)
    assert upgraded.returncode == 0, upgraded
    since, price = _stored_btc(db, count=1500)  # two pages of 1000
    with running_ft() as ft, running_core(ft.port, "--db", db) as core:
        origin = f"127.0.0.1:{core.port}"
        watched = Watched(browser, DESKTOP)
        page = watched.page
        history: list[tuple[str, int]] = []
        page.on(
            "response",
            lambda response: (
                history.append((urlsplit(response.url).path, response.status))
                if "/history" in response.url
                else None
            ),
        )
        try:
            page.goto(f"http://{origin}/")
            page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
            card = page.locator('.card[data-symbol="BTC"]')
            card.wait_for(timeout=WAIT_MS)
            assert card.get_attribute("data-since") == since
            assert ("/quotes/BTC/history", 200) in history
            assert history.count(("/quotes/BTC/history", 200)) == 2, history
            assert all(status == 200 for _, status in history), history
            # Live quotes follow on the same chart.
            first = card.locator(".price data").inner_text()
            page.wait_for_function(
                "first => document.querySelector('.card[data-symbol=\"BTC\"] .price data')"
                ".textContent !== first",
                arg=first,
                timeout=WAIT_MS,
            )
            assert card.get_attribute("data-since") == since
            assert float(card.locator(".price data").get_attribute("value") or 0) != price
            assert watched.errors == []
            assert watched.hosts == {origin}
        finally:
            watched.close()


@pytest.mark.e2e
def test_without_history_the_charts_start_from_core_s_own_quotes(browser: Browser) -> None:
    with running_ft() as ft, running_core(ft.port, "--db", "none") as core:
        watched = Watched(browser, DESKTOP)
        page = watched.page
        history: list[int] = []
        page.on(
            "response",
            lambda response: (
                history.append(response.status) if "/history" in response.url else None
            ),
        )
        try:
            # Some quotes in Core first, so that /recent has something to give.
            wait_until(lambda: len(quotes(core.port)) == 3, DEADLINE, what="three symbols")
            page.goto(f"http://127.0.0.1:{core.port}/")
            page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
            page.wait_for_selector('.card[data-symbol="BTC"][data-since]', timeout=WAIT_MS)
            assert history == [503], "asked once, then not again for the other symbols"
            assert watched.errors == []
        finally:
            watched.close()


@pytest.mark.e2e
def test_every_control_is_reachable_by_keyboard_and_labelled(
    browser: Browser,
) -> None:
    with running_ft() as ft, running_core(ft.port) as core:
        watched = Watched(browser, DESKTOP)
        page = watched.page
        try:
            page.goto(f"http://127.0.0.1:{core.port}/")
            page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
            page.wait_for_selector(".card .plot canvas", timeout=WAIT_MS)
            controls = page.evaluate(
                "[...document.querySelectorAll('a[href], button:not([hidden])')]"
                ".map(e => e.textContent.trim())"
            )
            reached = []
            for _ in range(len(controls)):
                page.keyboard.press("Tab")
                reached.append(page.evaluate("document.activeElement.textContent.trim()"))
            assert sorted(reached) == sorted(controls)
            assert page.get_attribute("#connection", "role") == "status"
            labels = page.eval_on_selector_all(
                ".plot", "plots => plots.map(p => p.getAttribute('aria-label'))"
            )
            assert labels == [f"{s} price over the last 10 minutes" for s in ("BTC", "ETH", "SBER")]
            assert page.get_attribute("html", "lang") == "en"
            assert watched.errors == []
        finally:
            watched.close()


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (
                (tag == "script" and name == "src") or (tag == "link" and name == "href")
            ):
                self.found.append(value)


def test_the_page_loads_only_core_s_own_files() -> None:
    """Every script and stylesheet is one of Core's static files, named relatively
    (the page works below a root path); the icon is inline; nothing names a host."""
    page = DASHBOARD_PAGE.read_text()
    parser = _Assets()
    parser.feed(page)
    assets = [asset for asset in parser.found if not asset.startswith("data:")]
    assert assets
    for asset in assets:
        assert asset.startswith("static/"), asset
        assert (STATIC_FOLDER / asset.removeprefix("static/")).is_file(), asset
    for text in (page, (STATIC_FOLDER / "dashboard" / "dashboard.js").read_text()):
        # The one URL: the inline icon's SVG namespace, a name that is never fetched.
        urls = re.findall(r"(?i)\bhttps?://[^\s'\"<>]*", text.replace("%27", "'"))
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, urls
    # The vendored chart library comes with its licence and its provenance.
    for name in ("LICENSE", "README.md", "uPlot.iife.min.js", "uPlot.min.css"):
        assert (STATIC_FOLDER / "uplot" / name).is_file(), name
