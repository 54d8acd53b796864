"""The review page under attack: concurrent password guessing, a replayed logged-out cookie, headers on
error responses, and cookies marked Secure behind TLS.

The app runs on aiohttp's test server as in tests/unit/test_review.py (no ClickHouse is read: the pages
tested here are the login page, logout and error responses; Kafka is a recording publisher).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from streams.core.config import Settings
from streams.apps.review.auth import UserStore
from streams.apps.review.data import ReviewData
from streams.apps.review.security import MAX_FAILED_LOGINS, MAX_FAILED_LOGINS_PER_ADDRESS, parse_proxies
from streams.apps.review.web import SESSION_COOKIE, ReviewConfig, create_review_app
from connectors.kafka.testing import MemoryPublisher
from tests.unit.test_review import PASSWORD, Page

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy")


class CountingStore(UserStore):
    """The real users file, counting the password checks that actually ran."""

    checks = 0

    def authenticate(self, name: str, password: str) -> Any:
        CountingStore.checks += 1
        return super().authenticate(name, password)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    UserStore(path).add("alice", "analyst", PASSWORD)
    return path


def serve(users: Path, body: Callable[[Page, MemoryPublisher], Awaitable[None]], *, secret: str | None = None,
          sessions: Path | None = None, **config: Any) -> MemoryPublisher:
    """Run ``body`` against a fresh app (fresh lockout state); the same ``secret`` and ``sessions``
    file across two calls stand for a restart of the review process."""
    settings = Settings()
    publisher = MemoryPublisher()
    cfg = ReviewConfig(port=0, users_path=users, secret=secret or Fernet.generate_key().decode(),
                       sessions_path=sessions, **config)

    async def go() -> None:
        app = create_review_app(settings, cfg, data=ReviewData(settings, runner=lambda *_: ([], [])), publisher=publisher)
        async with TestClient(TestServer(app)) as client:
            await body(Page(client), publisher)

    CountingStore.checks = 0
    asyncio.run(go())
    return publisher


def _use_counting_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.apps.review.web as web

    monkeypatch.setattr(web, "UserStore", CountingStore)


# ------------------------------------------------------------------ lockout
def test_concurrent_guesses_get_no_more_password_checks_than_the_limit(users, monkeypatch):
    _use_counting_store(monkeypatch)

    async def body(page: Page, pub: MemoryPublisher) -> None:
        token = await page.token("/login")

        async def guess(password: str) -> int:
            r = await page.client.post("/login", data={"csrf_token": token, "username": "alice",
                                                       "password": password}, allow_redirects=False)
            return r.status

        statuses = await asyncio.gather(*(guess(f"guess {i}") for i in range(40)))
        assert sorted(statuses) == [401] * MAX_FAILED_LOGINS + [429] * (40 - MAX_FAILED_LOGINS)
        assert CountingStore.checks == MAX_FAILED_LOGINS  # the refused 35 never reached scrypt
        assert await guess(PASSWORD) == 429  # locked: even the right password, unchecked
        assert CountingStore.checks == MAX_FAILED_LOGINS

    pub = serve(users, body)
    assert len(pub.audits("login.failed")) == MAX_FAILED_LOGINS
    assert len(pub.audits("login.refused")) == 40 - MAX_FAILED_LOGINS + 1


def test_one_address_guessing_many_names_is_locked_too(users, monkeypatch):
    _use_counting_store(monkeypatch)

    async def body(page: Page, pub: MemoryPublisher) -> None:
        token = await page.token("/login")

        async def guess(name: str, password: str = "guess") -> Any:
            return await page.client.post("/login", data={"csrf_token": token, "username": name,
                                                          "password": password}, allow_redirects=False)

        n = MAX_FAILED_LOGINS_PER_ADDRESS + 10
        statuses = [r.status for r in await asyncio.gather(*(guess(f"user{i}") for i in range(n)))]
        assert statuses.count(401) == MAX_FAILED_LOGINS_PER_ADDRESS and statuses.count(429) == 10
        r = await guess("alice", PASSWORD)  # alice herself has no failures, but this address does
        assert r.status == 429 and "from this address" in await r.text()
        assert CountingStore.checks == MAX_FAILED_LOGINS_PER_ADDRESS

    pub = serve(users, body)
    refused = [json.loads(a["detail"]) for a in pub.audits("login.refused")]
    assert refused and all("address" in d["reason"] for d in refused)


# ------------------------------------------------------------------ logout
async def _login(page: Page) -> str:
    r = await page.login("alice", PASSWORD)
    assert r.status == 303
    return page.client.session.cookie_jar.filter_cookies(page.client.make_url("/"))[SESSION_COOKIE].value


async def _get_with_cookie(page: Page, cookie: str, path: str = "/cases") -> Any:
    async with ClientSession(cookies={SESSION_COOKIE: cookie}) as other:  # e.g. a copy the attacker kept
        async with other.get(page.client.make_url(path), allow_redirects=False) as r:
            return r.status, r.headers.get("Location")


def test_a_cookie_from_before_logout_is_refused_after_it(users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        cookie = await _login(page)
        assert (await _get_with_cookie(page, cookie, "/nope"))[0] == 404  # the copy works while logged in
        token = await page.token("/cases")
        r = await page.client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
        assert r.status == 303
        assert await _get_with_cookie(page, cookie, "/nope") == (303, "/login")

    serve(users, body)


def test_a_logout_outlives_a_restart_when_the_cookie_key_does(users, tmp_path):
    secret, sessions = Fernet.generate_key().decode(), tmp_path / "review-sessions.json"
    kept: dict[str, str] = {}

    async def before(page: Page, pub: MemoryPublisher) -> None:
        kept["other"] = await _login(page)  # a second session of the same user, still logged in
        page.client.session.cookie_jar.clear()
        kept["old"] = await _login(page)
        r = await page.client.post("/logout", data={"csrf_token": await page.token("/cases")}, allow_redirects=False)
        assert r.status == 303

    async def after(page: Page, pub: MemoryPublisher) -> None:
        assert (await _get_with_cookie(page, kept["other"], "/nope"))[0] == 404  # still valid after the restart
        assert await _get_with_cookie(page, kept["old"], "/nope") == (303, "/login")  # still logged out

    serve(users, before, secret=secret, sessions=sessions)
    assert "alice" in sessions.read_text() and kept["old"] not in sessions.read_text()  # digests, not ids
    serve(users, after, secret=secret, sessions=sessions)


# ------------------------------------------------------------------ headers on every response
def test_error_responses_carry_the_security_headers(users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        await _login(page)
        for method, path, status in (("GET", "/no/such/page", 404), ("GET", "/logout", 405),
                                     ("GET", "/cases/not%20an%20id", 404), ("GET", "/", 303)):
            r = await page.client.request(method, path, allow_redirects=False)
            assert r.status == status, (method, path)
            for h in HEADERS:
                assert h in r.headers, (path, h)
            assert r.headers["Cache-Control"] == "no-store"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]

    serve(users, body)


# ------------------------------------------------------------------ Secure cookies
def _set_cookie(r: Any) -> str:
    return "; ".join(v for v in r.headers.getall("Set-Cookie", []) if v.startswith(SESSION_COOKIE))


@pytest.mark.parametrize("config,headers,secure", [
    ({}, {}, False),  # plain HTTP, nothing trusted
    ({}, {"X-Forwarded-Proto": "https"}, False),  # a claim from an untrusted client
    ({"trusted_proxies": parse_proxies("127.0.0.1, ::1")}, {"X-Forwarded-Proto": "https"}, True),
    ({"secure_cookies": "1"}, {}, True),
    ({"secure_cookies": "0", "trusted_proxies": parse_proxies("127.0.0.0/8")}, {"X-Forwarded-Proto": "https"}, False),
])
def test_the_session_cookie_is_secure_behind_tls_and_always_httponly_and_strict(users, config, headers, secure):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        r = await page.client.get("/login", headers=headers)
        token_cookie = _set_cookie(r)
        assert token_cookie and "HttpOnly" in token_cookie and "SameSite=Strict" in token_cookie
        assert ("Secure" in token_cookie) is secure, token_cookie

    serve(users, body, **config)


def test_a_bad_secure_cookies_setting_is_refused():
    with pytest.raises(ValueError, match="CSOS_REVIEW_SECURE_COOKIES"):
        ReviewConfig(port=0, users_path=Path("u"), secret="s", secure_cookies="yes")
