"""The review page end to end in headless Chromium, against the real broker, worker, sink and ClickHouse.

An order far above its registrant's usual size is signed and submitted; the monitor holds it and
the case agent opens a case. A viewer logs in and sees the case without any action (a forged POST
gets 403). An analyst logs in, opens the case, writes a rationale and clicks Release: the test
then sees the ``som.Release`` for that order with ``released_by`` = the analyst on ``som.release``,
and ``cases FINAL`` RELEASED by the analyst in ClickHouse.

Why Playwright (Python): its wheel carries its own driver, so with ``executable_path`` it drives
Debian's /usr/bin/chromium without downloading a browser; its locators wait for the page by
themselves (no sleeps), and screenshots are one call. Chromium comes from ``make browser``.
"""
from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.fernet import Fernet

from streams.tools.broker import free_port
from connectors.sources.intake import OrderIntake
from connectors.kafka.io import Publisher, consume_all
from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.domain.cms import sign_order
from streams.domain.model import Order
from streams.domain.order_document import encode_order
from streams.tools.processes import review_process
from streams.apps.review.auth import UserStore

pytestmark = pytest.mark.kafka
codec = default_codec()
CHROMIUM = "/usr/bin/chromium"
#: What this machine needs: as root no sandbox; without the background-networking flags Chromium keeps
#: calling Google's hosts on a closed network and hangs on the refused connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANALYST, VIEWER, PASSWORD = "alice", "victor", "Due diligence 4 all!"
RATIONALE = "Called the pharmacist in charge: a second store opened; DEA registration and invoices checked."

if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed: run `make browser` (make test does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def held(streamed) -> dict[str, Any]:
    """A fresh order held by the monitor, with its case open (status HELD) in ClickHouse.

    The purchaser is an established registrant (so its history chart has points) other than the one
    tests/e2e/test_verify_e2e.py orders for; each line is 40x its usual size, far past the size detector.
    """
    feed = streamed.feed
    normal = [m.sim for m in feed.messages if m.sim.label == "normal"]
    first = normal[0].registrant.dea_number
    counts: dict[str, int] = {}
    for sim in normal:
        counts[sim.registrant.dea_number] = counts.get(sim.registrant.dea_number, 0) + 1
    dea = max((d for d in counts if d != first), key=lambda d: counts[d])
    template = next(sim for sim in reversed(normal) if sim.registrant.dea_number == dea)
    reg = template.registrant
    at = feed.result.end + timedelta(hours=3)
    lines = tuple(replace(ln, packages=ln.packages * 40) for ln in template.order.lines)
    order = Order(f"{at:%y}X{uuid.uuid4().hex[:6].upper()}", reg.party, template.order.supplier, at, lines)
    cred = feed.pki.registrants[dea]
    doc = encode_order(order)
    sig = sign_order(doc, cred.cert, cred.key, signing_time=at, intermediates=cred.chain)
    intake = OrderIntake(Publisher(streamed.settings.kafka_bootstrap), "review-browser-test")
    order_id = intake.submit(sig, document=doc, purchaser_dea=dea, received_at=at + timedelta(minutes=1))
    intake.flush()
    verdict = streamed.eventually(f"SELECT verdict FROM verdicts FINAL WHERE order_id = '{order_id}'")
    assert verdict == [["HOLD"]], verdict
    streamed.eventually(f"SELECT status FROM cases FINAL WHERE order_id = '{order_id}'",
               want=lambda rows: rows == [["HELD"]])
    return {"order_id": order_id, "order_number": order.order_number, "dea": dea}


@pytest.fixture(scope="module")
def review(streamed, tmp_path_factory) -> Iterator[str]:
    """``csos review`` as a child process, with one analyst and one viewer; yields its base URL."""
    users = tmp_path_factory.mktemp("review") / "users.json"
    store = UserStore(users)
    store.add(ANALYST, "analyst", PASSWORD)
    store.add(VIEWER, "viewer", PASSWORD)
    port = free_port()
    proc = review_process(streamed.settings, port, users, Fernet.generate_key().decode("ascii"))
    proc.start(timeout=60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def browser_context(tmp_path) -> Iterator[Any]:
    """A fresh Chromium profile in the test's tmp dir (launch_persistent_context owns --user-data-dir)."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1600})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


def log_in(page: Any, base: str, name: str) -> None:
    page.goto(base + "/cases")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button[type=submit]")
    page.wait_for_url(base + "/cases")


def test_a_viewer_sees_the_case_but_cannot_act(held, review, browser_context, tmp_path, streamed):
    page = browser_context.new_page()
    log_in(page, review, VIEWER)
    row = page.locator(f"#held tr[data-order-id='{held['order_id']}']")
    sync_api.expect(row).to_be_visible()
    row.locator("a").click()
    page.wait_for_url(f"{review}/cases/{held['order_id']}")
    sync_api.expect(page.locator("#case-status")).to_have_text("HELD")
    charts = page.locator("svg.history")
    sync_api.expect(charts.first).to_be_visible()
    # One chart per held drug family, each with this order marked once.
    assert page.locator("svg.history .pt.current").count() == charts.count() >= 1
    sync_api.expect(page.locator("#read-only")).to_be_visible()
    assert page.locator("form.decision").count() == 0 and page.locator("button.act").count() == 0
    page.screenshot(path=str(tmp_path / "viewer-case.png"), full_page=True)
    # A hand-made POST with the viewer's own session and CSRF token is refused and audited.
    token = page.locator("form.logout input[name=csrf_token]").get_attribute("value")
    response = page.request.post(f"{review}/cases/{held['order_id']}/decision", form={
        "csrf_token": token, "action": "RELEASE", "rationale": "I am only a viewer"})
    assert response.status == 403
    refused = streamed.eventually("SELECT actor, detail FROM audit_events WHERE stage = 'review' "
                         f"AND action = 'decision.refused' AND order_id = '{held['order_id']}'")
    assert refused[0][0] == VIEWER and "viewer" in refused[0][1]
    assert streamed.sql(f"SELECT status FROM cases FINAL WHERE order_id = '{held['order_id']}'") == [["HELD"]]


def test_an_analyst_releases_a_held_order_in_chromium(held, review, browser_context, tmp_path, streamed):
    oid = held["order_id"]
    page = browser_context.new_page()
    log_in(page, review, ANALYST)
    row = page.locator(f"#held tr[data-order-id='{oid}']")
    sync_api.expect(row).to_contain_text(held["order_number"])
    row.locator("a").click()
    page.wait_for_url(f"{review}/cases/{oid}")
    # The hold's reasons, its lines and the registrant's history with this order marked.
    sync_api.expect(page.locator("table.reasons.enforced")).to_contain_text("size")
    assert page.locator("table.lines tbody tr").count() >= 1
    assert page.locator("svg.history").count() >= 1
    sync_api.expect(page.locator("svg.history .pt.current").first).to_be_attached()
    assert page.locator("svg.history .pt.released").count() >= 3  # the registrant's earlier orders
    # Release, with a rationale (required) and evidence notes.
    release = page.locator("form#release")
    release.locator("textarea[name=rationale]").fill(RATIONALE)
    release.locator("textarea[name=evidence_notes]").fill("Invoices 2026-10, store license #4471")
    release.locator("button[type=submit]").click()
    page.wait_for_url(f"{review}/cases/{oid}")
    sync_api.expect(page.locator(".flash")).to_contain_text("Decision submitted")
    page.screenshot(path=str(tmp_path / "decision-submitted.png"), full_page=True)

    # The warehouse sees the release, by the analyst.
    found: dict[str, Any] = {}

    def released(messages: list[Any]) -> bool:
        for m in messages:
            if m.key() is not None and m.key().decode() == oid:
                rec = codec.decode(m.value(), expect="som.Release")[1]
                if rec["released_by"] == ANALYST:
                    found["release"] = rec
                    return True
        return False

    consume_all(streamed.settings.kafka_bootstrap, [t.RELEASE], until=released, timeout=90)
    assert "release" in found, f"no som.Release for {oid} by {ANALYST}\n{streamed.processes.tail()}"
    assert found["release"]["order_id"] == oid and found["release"]["lines"]

    # ClickHouse has the closed case, decided by the analyst with the rationale typed in the browser.
    rows = streamed.eventually(f"SELECT status, decided_by, rationale FROM cases FINAL WHERE order_id = '{oid}'",
                      want=lambda r: bool(r) and r[0][0] == "RELEASED")
    assert rows == [["RELEASED", ANALYST, RATIONALE]]
    audit = streamed.eventually("SELECT actor, outcome FROM audit_events WHERE stage = 'review' "
                       f"AND action = 'decision.submitted' AND order_id = '{oid}'")
    assert audit == [[ANALYST, "RELEASE"]]

    # The page follows: the case shows RELEASED by the analyst, with no actions left.
    page.reload()
    sync_api.expect(page.locator("#case-status")).to_have_text("RELEASED")
    sync_api.expect(page.locator("#decided-by")).to_contain_text(ANALYST)
    assert page.locator("form.decision").count() == 0
    page.goto(review + "/cases")
    sync_api.expect(page.locator(f"#closed tr[data-order-id='{oid}']")).to_contain_text("RELEASED")
    page.screenshot(path=str(tmp_path / "released.png"), full_page=True)
