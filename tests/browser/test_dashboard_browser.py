"""The dashboards as an analyst uses them, in headless Chromium: log in, open the overview, filter to one drug
family, follow a registrant to its page and from there to its held case.

The review application runs in this process (a thread with its own event loop) on the embedded ClickHouse that
``tests/unit/test_dashboards.py`` loads with known rows through the real sink, so the test knows which registrant and
which held case to expect and needs no broker. Chromium is launched as ``tests/browser/test_review_browser.py`` does
(its ``browser_context`` fixture: Debian's /usr/bin/chromium driven by Playwright, a fresh profile per test).
Screenshots of every step are written to the test's pytest tmp dir (``tmp_path``, kept by pytest under
``/tmp/pytest-of-$USER/``).
"""
from __future__ import annotations

import asyncio
import re
import threading
from typing import Iterator

import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from streams.tools.broker import free_port
from streams.apps.review.server import create_app as create_review_app
from streams.apps.review.web import ReviewConfig
from tests.unit.test_dashboards import GROWER, HELD_ID, HYDRO, OXY, PASSWORD, RecordingPublisher, data, store, users  # noqa: F401
from test_review_browser import browser_context, sync_api  # noqa: F401 - fixtures and the skip if no Chromium

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


@pytest.fixture(scope="module")
def server(data, users) -> Iterator[str]:  # noqa: F811 - the fixtures imported above
    """The review app on 127.0.0.1 in a background thread; yields its base URL."""
    config = ReviewConfig(port=0, users_path=users, secret=Fernet.generate_key().decode())
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner: dict[str, web.AppRunner] = {}

    async def start() -> None:
        app = create_review_app(data.settings, config, data=data, publisher=RecordingPublisher())
        runner["r"] = web.AppRunner(app)
        await runner["r"].setup()
        await web.TCPSite(runner["r"], "127.0.0.1", port).start()
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(30), "the review app did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner["r"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def _script_and_origins_policy(csp: str) -> None:
    """No inline script allowed, nothing from another origin: 'none'/'self' only, no scheme or host."""
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert not re.search(r"https?:|wss?:|\*", csp), csp
    directives = dict((part.split() + [""])[:2] for part in csp.split(";") if part.strip())
    assert "script-src" not in directives and directives["default-src"] == "'none'", csp


def test_an_analyst_filters_to_a_family_and_follows_a_registrant_to_a_held_case(server, browser_context,
                                                                                  tmp_path):
    page = browser_context.new_page()
    page.goto(server + "/dashboard")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", "victor")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button[type=submit]")
    page.wait_for_url(server + "/cases")
    page.click("header a[href='/dashboard']")
    page.wait_for_url(server + "/dashboard")
    sync_api.expect(page.locator("svg#chart-verdicts")).to_be_visible()
    assert page.locator("#holds-table tr[data-family]").count() == 2  # both families held before filtering
    page.screenshot(path=str(tmp_path / "1-overview.png"), full_page=True)

    response = page.request.get(server + "/dashboard")
    _script_and_origins_policy(response.headers["content-security-policy"])

    page.select_option("#filters select[name=family]", OXY)
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r".*/dashboard\?.*family=OXYCODONE.*"))
    families = {page.locator("#holds-table tr[data-family]").nth(i).get_attribute("data-family")
                for i in range(page.locator("#holds-table tr[data-family]").count())}
    assert families == {OXY}
    assert page.locator("#chart-holds rect.bar").count() >= 1
    page.screenshot(path=str(tmp_path / "2-oxycodone.png"), full_page=True)

    page.locator(f"#oldest tr[data-order-id='{HELD_ID}'] a.registrant").click()
    page.wait_for_url(re.compile(rf".*/dashboard/registrants/{GROWER}\?.*family=OXYCODONE.*"))
    sync_api.expect(page.locator("#dea")).to_have_text(GROWER)
    chart = page.locator(f"svg.history[data-family='{OXY}']")
    sync_api.expect(chart).to_be_visible()
    assert chart.locator(".pt.held").count() == 3 and chart.locator("line.threshold").count() == 1
    assert page.locator(f"svg.history[data-family='{HYDRO}']").count() == 0  # the filter carried over
    page.screenshot(path=str(tmp_path / "3-registrant.png"), full_page=True)

    page.locator(f"#open-cases tr[data-order-id='{HELD_ID}'] a").click()
    page.wait_for_url(f"{server}/cases/{HELD_ID}")
    sync_api.expect(page.locator("#case-status")).to_have_text("HELD")
    page.screenshot(path=str(tmp_path / "4-held-case.png"), full_page=True)
    assert all((tmp_path / f).stat().st_size > 0 for f in ("1-overview.png", "2-oxycodone.png", "3-registrant.png",
                                                            "4-held-case.png"))
