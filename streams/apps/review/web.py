"""The review page as an aiohttp application: login, the list of held cases, one case, and decisions.

Why these pieces: aiohttp is already here (Faust runs on it); aiohttp-jinja2 renders templates with
autoescaping on, so nothing from ClickHouse or the analyst reaches the page unescaped;
aiohttp-session's ``EncryptedCookieStorage`` (Fernet: AES-CBC + HMAC) keeps the session in a cookie
nobody can read or forge without ``CSOS_REVIEW_SECRET``; a small registry of live session ids
(``security.SessionRegistry``) lets a logout take a cookie back. Logins are throttled per user name
and per client address (``security.LoginThrottle``), and every response, errors included, carries
the security headers.

Every form carries the session's CSRF token. A decision is validated here (rationale given, case
HELD per ClickHouse) and published on ``som.decisions``; the case agent is the authority that
applies or refuses it. Every decision, every refused attempt and every failed login is an audit
event (stage ``review``) with the actor.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_session import get_session, new_session
from aiohttp_session import setup as setup_session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet
from markupsafe import Markup

from connectors.kafka.io import DeliveryFailed, Publisher

from connectors.kafka import catalogue as t
from streams.core.config import Settings
from connectors.kafka.emit import Emitter
from connectors.kafka.metrics import exposition, open_cases, set_refreshers
from connectors.clickhouse.query import QueryError
from streams.apps.review.auth import User, UserStore
from streams.apps.review.security import (ADDRESS, FAILED_LOGIN_WINDOW, MAX_FAILED_LOGINS, MAX_FAILED_LOGINS_PER_ADDRESS,  # noqa: F401
                       SECURE_MODES, Attempt, LoginThrottle, SessionRegistry, is_trusted, parse_proxies)
from streams.apps.review.chart import render_history_svg
from streams.apps.review.data import ReviewData, valid_order_id

log = logging.getLogger(__name__)
# aiohttp-session 2.12 stores its request keys as plain strings, which aiohttp 3.14 warns about on every
# request; the keys are the library's own, so there is nothing to fix on this side.
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module="aiohttp_session")
STAGE = "review"
HERE = Path(__file__).resolve().parent
ACTIONS = {
    "RELEASE": "Release after due diligence",
    "REPORT": "Report as suspicious",
    "CANCEL": "Cancel",
}
#: Decisions about the registrant, made from one of its cases (streams/cases/registrant_decisions.py).
REGISTRANT_ACTIONS = {
    "SET_LIMIT": "Set a monthly limit",
    "TERMINATE": "End the relationship",
    "ONBOARDED": "Onboarding review done",
}
MAX_TEXT = 4000
SESSION_HOURS = 8
CSRF_FIELD = "csrf_token"
SESSION_COOKIE = "csos_review"



class _Outputs:
    """The Kafka publisher, made at first use (a page that is only read never connects to Kafka)."""

    def __init__(self, bootstrap: str, publisher: Any = None) -> None:
        self.bootstrap = bootstrap
        self._publisher = publisher

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.bootstrap)
        return self._publisher


DATA_KEY = web.AppKey("data", ReviewData)
THROTTLE_KEY = web.AppKey("throttle", LoginThrottle)
STORE_KEY = web.AppKey("store", UserStore)
SESSIONS_KEY = web.AppKey("sessions", SessionRegistry)
OUTPUTS_KEY = web.AppKey("outputs", _Outputs)


@dataclass(frozen=True)
class ReviewConfig:
    """Where the page listens, whose users it knows, and the key that seals its session cookies."""

    port: int
    users_path: Path
    secret: str
    host: str = "127.0.0.1"  # loopback unless CSOS_REVIEW_HOST says otherwise (a container behind a TLS proxy)
    #: The live-session registry's file; None keeps it in memory (tests).
    sessions_path: Path | None = None
    #: Mark the session cookie Secure: "1" always, "0" never, "auto" when the request came over TLS.
    secure_cookies: str = "auto"
    #: Proxies whose X-Forwarded-Proto and X-Forwarded-For are believed (addresses or networks).
    trusted_proxies: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.secure_cookies not in SECURE_MODES:
            raise ValueError(f"CSOS_REVIEW_SECURE_COOKIES must be one of {', '.join(SECURE_MODES)}, "
                             f"not {self.secure_cookies!r}")

    @classmethod
    def from_env(cls, settings: Settings) -> "ReviewConfig":
        """From the settings' review section (``CSOS_REVIEW_PORT``, ``_USERS``, ``_SECRET``, ``_HOST``,
        ``_SECURE_COOKIES``, ``_TRUSTED_PROXIES``; ``streams.core.config.ReviewSettings``).

        Without a secret a random one is made: sessions then end when the process does, which is
        safe but logs everyone out at a restart, hence the warning.
        """
        review = settings.review
        secret = review.secret
        if not secret:
            log.warning("CSOS_REVIEW_SECRET is not set: using a random key; sessions end at restart")
            secret = Fernet.generate_key().decode("ascii")
        return cls(port=review.port, users_path=users_path(settings), secret=secret, host=review.host,
                   sessions_path=Path(settings.data_dir) / "review-sessions.json",
                   secure_cookies=review.secure_cookies, trusted_proxies=parse_proxies(review.trusted_proxies))


def users_path(settings: Settings) -> Path:
    """``CSOS_REVIEW_USERS``, else ``review-users.json`` in the data directory."""
    return Path(settings.review.users or settings.data_dir / "review-users.json")


# ------------------------------------------------------------------ helpers
def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt_dt(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _fmt_age(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{sign}{days} d {hours} h"
    return f"{sign}{hours} h {rest // 60} min"


def _fmt_num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:,.2f}"


CONFIG_KEY = web.AppKey("config", ReviewConfig)


def _from_trusted_proxy(request: web.Request) -> bool:
    return is_trusted(request.remote, request.app[CONFIG_KEY].trusted_proxies)


def client_address(request: web.Request) -> str:
    """The client's address: the nearest X-Forwarded-For entry when a trusted proxy sent the request."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded and _from_trusted_proxy(request):
        return forwarded.split(",")[-1].strip()  # the entry our proxy added; earlier ones are the client's claim
    return request.remote or ""


def came_over_tls(request: web.Request) -> bool:
    """TLS to this server, or to a trusted proxy that says so (X-Forwarded-Proto: https)."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https" and _from_trusted_proxy(request)


class ReviewCookieStorage(EncryptedCookieStorage):
    """The sealed-cookie storage, with the Secure flag decided per request (CSOS_REVIEW_SECURE_COOKIES)."""

    def __init__(self, fernet: Fernet, mode: str) -> None:
        super().__init__(fernet, cookie_name=SESSION_COOKIE, httponly=True, samesite="Strict",
                         max_age=SESSION_HOURS * 3600)
        self.mode = mode

    async def save_session(self, request: web.Request, response: web.StreamResponse, session: Any) -> None:
        await super().save_session(request, response, session)
        cookie = response.cookies.get(SESSION_COOKIE)
        if cookie is not None and (self.mode == "1" or (self.mode == "auto" and came_over_tls(request))):
            cookie["secure"] = True


async def current_user(request: web.Request) -> User | None:
    """The logged-in user, with the role the users file gives now (a removed user is logged out).

    The cookie must also name a session this server started and has not ended (logout, expiry).
    """
    session = await get_session(request)
    name = session.get("user")
    if not name:
        return None
    role = request.app[STORE_KEY].users().get(name)
    if role is None or not request.app[SESSIONS_KEY].live(session.get("sid"), name, _now()):
        session.invalidate()
        return None
    return User(name, role)


async def csrf_token(request: web.Request) -> str:
    session = await get_session(request)
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


async def csrf_ok(request: web.Request, form: Any) -> bool:
    session = await get_session(request)
    expected = session.get("csrf") or ""
    given = str(form.get(CSRF_FIELD, ""))
    return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


def _publisher(app: web.Application) -> Publisher:
    return app[OUTPUTS_KEY].publisher


async def audit(request: web.Request, actor: str, action: str, outcome: str, *, order_id: str | None = None,
                detail: dict[str, Any] | None = None) -> None:
    """An audit event (stage ``review``) with ``actor``, flushed before the response goes out."""
    pub = _publisher(request.app)
    Emitter(pub, actor).audit(STAGE, action, outcome, order_id=order_id,
                              detail=dict(detail or {}, remote=request.remote or ""))
    await asyncio.to_thread(pub.flush, 30.0)


async def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    user = await current_user(request)
    base = {"user": user, "csrf": await csrf_token(request), "csrf_field": CSRF_FIELD, "now": _now()}
    return aiohttp_jinja2.render_template(template, request, dict(base, **context), status=status)


async def error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return await render(request, "error.html", {"title": title, "message": message}, status=status)


# ------------------------------------------------------------------ middleware
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def _secure(request: web.Request, headers: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    if request.path != "/static/review.css":
        headers.setdefault("Cache-Control", "no-store")


@web.middleware
async def security_headers(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """No scripts at all, nothing loaded from elsewhere, never framed, never cached: on every response.

    The router's 404 and 405, redirects and other ``HTTPException`` responses are raised, not returned,
    and an unexpected error would become aiohttp's bare 500: both get the headers here too.
    """
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _secure(request, exc.headers)
        raise
    except Exception:  # noqa: BLE001 - answered here so that even the 500 has the headers
        log.exception("review page: error on %s %s", request.method, request.path)
        response = web.Response(status=500, text="500: Internal Server Error", content_type="text/plain")
    _secure(request, response.headers)
    return response


PUBLIC = {"/login", "/health", "/static/review.css", "/metrics"}  # /metrics: counts only (README "Metrics")


@web.middleware
async def require_login(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    if request.path in PUBLIC:
        return await handler(request)
    if await current_user(request) is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/login")
        return await error_page(request, 401, "Not logged in", "Log in first.")
    try:
        return await handler(request)
    except QueryError as exc:
        log.warning("ClickHouse query failed: %s", exc)
        return await error_page(request, 503, "ClickHouse unavailable",
                                f"The case data cannot be read right now ({exc}). Try again shortly.")


# ------------------------------------------------------------------ handlers
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus exposition; the open-case gauges query ClickHouse, so off the event loop."""
    body, content_type = await asyncio.to_thread(exposition)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def stylesheet(request: web.Request) -> web.FileResponse:
    return web.FileResponse(HERE / "static" / "review.css")


async def login_page(request: web.Request) -> web.Response:
    if await current_user(request) is not None:
        raise web.HTTPSeeOther("/cases")
    return await render(request, "login.html", {})


async def login_submit(request: web.Request) -> web.Response:
    form = await request.post()
    name = str(form.get("username", "")).strip()[:64]
    if not await csrf_ok(request, form):
        await audit(request, "anonymous", "login.refused", "REFUSED", detail={"username": name,
                                                                               "reason": "missing or wrong CSRF token"})
        return await error_page(request, 403, "Form expired", "The login form expired; reload the page and try again.")
    throttle = request.app[THROTTLE_KEY]
    attempt = throttle.reserve(name, client_address(request), _now())  # before any await: atomic
    if not isinstance(attempt, Attempt):
        return await _locked(request, name, attempt, throttle)
    user = None
    try:
        user = await asyncio.to_thread(request.app[STORE_KEY].authenticate, name, str(form.get("password", "")))
    finally:
        throttle.settle(attempt, user is not None, _now())
    if user is None:
        await audit(request, "anonymous", "login.failed", "REFUSED",
                    detail={"username": name, "reason": "unknown user or wrong password"})
        return await render(request, "login.html", {"error": "Wrong user name or password.", "username": name},
                            status=401)
    session = await new_session(request)  # a fresh session (and CSRF token) at login: no fixation
    sid = secrets.token_urlsafe(32)
    request.app[SESSIONS_KEY].start(sid, user.name, _now())
    session["user"] = user.name
    session["sid"] = sid
    session["csrf"] = secrets.token_urlsafe(32)
    await audit(request, user.name, "login.succeeded", "OK", detail={"role": user.role})
    raise web.HTTPSeeOther("/cases")


async def _locked(request: web.Request, name: str, locked: str, throttle: LoginThrottle) -> web.Response:
    """The answer to an attempt refused before its password was checked (audited)."""
    limit = throttle.address_limit if locked == ADDRESS else throttle.limit
    what = "from this address" if locked == ADDRESS else "for this user name"
    minutes = int(throttle.window.total_seconds() // 60)
    await audit(request, "anonymous", "login.refused", "REFUSED",
                detail={"username": name, "reason": f"{limit} failed logins {what} within {minutes} minutes",
                        "address": client_address(request)})
    return await render(request, "login.html", {"error": f"Too many failed logins {what}; wait {minutes} minutes.",
                                                "username": name}, status=429)


async def logout(request: web.Request) -> web.Response:
    form = await request.post()
    if not await csrf_ok(request, form):
        return await error_page(request, 403, "Form expired", "Reload the page and try again.")
    session = await get_session(request)
    request.app[SESSIONS_KEY].end(session.get("sid"), _now())  # the cookie is refused from now on, wherever it is
    session.invalidate()
    raise web.HTTPSeeOther("/login")


async def index(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/cases")


async def cases_page(request: web.Request) -> web.Response:
    data = request.app[DATA_KEY]
    held = await asyncio.to_thread(data.held_cases)
    closed = await asyncio.to_thread(data.closed_cases)
    return await render(request, "cases.html", {"held": held, "closed": closed})


async def _case_response(request: web.Request, order_id: str, *, status: int = 200, error: str = "",
                         form: dict[str, str] | None = None) -> web.Response:
    detail = await asyncio.to_thread(request.app[DATA_KEY].detail, order_id)
    if detail is None:
        return await error_page(request, 404, "No such case",
                                "There is no case for this order (yet): cases open when the case agent "
                                "has processed the hold.")
    charts = {family: Markup(render_history_svg(family, points, order_id, detail.thresholds.get(family)))
              for family, points in detail.history.items()}
    session = await get_session(request)
    flash = session.pop("flash", None)
    # The case this order joined (open case) or that was reported before it: named in the finding's window.
    joined = sorted({r.window[len("case "):] for r in detail.reasons
                     if r.detector in ("open_case", "reported_pending_limit") and r.window.startswith("case ")})
    return await render(request, "case.html", {
        "d": detail, "c": detail.case, "charts": charts, "actions": ACTIONS, "error": error,
        "flash": flash, "form": form or {}, "max_text": MAX_TEXT, "joined": joined,
        "registrant_actions": REGISTRANT_ACTIONS}, status=status)


async def case_page(request: web.Request) -> web.Response:
    order_id = request.match_info["order_id"]
    if not valid_order_id(order_id):
        return await error_page(request, 404, "No such case", "That is not an order id.")
    return await _case_response(request, order_id)


async def _admit(request: web.Request) -> tuple[str, Any, Any, str, web.Response | None]:
    """A decision's post read, then the checks every decision passes first: a real order id, this page's form,
    a role that may act.

    Both decision forms (the case's and the registrant's) go through here, so a
    refusal reads and is audited (``decision.refused``) the same way. Returns
    ``(order_id, user, form, action, refusal)``; the refusal page is None when admitted.
    """
    order_id = request.match_info["order_id"]
    user = await current_user(request)
    assert user is not None  # require_login
    form = await request.post()
    action = str(form.get("action", ""))
    return order_id, user, form, action, await _refusal(request, user, order_id, form, action)


async def _refusal(request: web.Request, user: Any, order_id: str, form: Any, action: str) -> web.Response | None:
    if not valid_order_id(order_id):
        return await error_page(request, 404, "No such case", "That is not an order id.")
    if not await csrf_ok(request, form):
        await audit(request, user.name, "decision.refused", "REFUSED", order_id=order_id,
                    detail={"action": action, "role": user.role, "reason": "missing or wrong CSRF token"})
        return await error_page(request, 403, "Form expired",
                                "The form expired or did not come from this page; reload the case and try again.")
    if not user.may_act:
        await audit(request, user.name, "decision.refused", "REFUSED", order_id=order_id,
                    detail={"action": action, "role": user.role, "reason": f"role {user.role} may not act"})
        return await error_page(request, 403, "Not allowed",
                                f"Your role ({user.role}) may read cases but not decide them.")
    return None


async def _submit(request: web.Request, user: Any, order_id: str, action: str, label: str, rationale: str, *,
                  values: dict[str, str], fields: dict[str, Any], audited: dict[str, Any],
                  after: str = "") -> web.Response:
    """Publish a valid som.Decision and its audit event, wait for delivery, then redirect (post/redirect/get).

    ``fields``: what the decision carries beyond the common ones; ``audited``: what the
    audit event adds to them; ``after``: said in the flash after "Decision submitted".
    Nothing is decided unless Kafka has the decision: on a delivery failure the case
    page comes back (503) with the form as it was.
    """
    decision_id = str(uuid.uuid4())
    decision = {"decision_id": decision_id, "order_id": order_id, "action": action, "actor": user.name,
                "actor_role": user.role, "rationale": rationale, "decided_at": _now(), **fields}
    pub = _publisher(request.app)
    emitter = Emitter(pub, user.name)
    emitter.send(t.DECISIONS, "som.Decision", order_id, decision)
    emitter.audit(STAGE, "decision.submitted", action, order_id=order_id,
                  detail={"decision_id": decision_id, "action": action, "role": user.role, "rationale": rationale,
                          **audited, "remote": request.remote or ""})
    try:
        await asyncio.to_thread(pub.flush, 30.0)
    except DeliveryFailed as exc:
        log.error("decision %s not delivered: %s", decision_id, exc)
        return await _case_response(request, order_id, status=503, form=values,
                                    error="The decision could not be delivered to Kafka; nothing was decided. "
                                          "Try again.")
    session = await get_session(request)
    session["flash"] = f"Decision submitted: {label} (decision {decision_id}).{after}"
    raise web.HTTPSeeOther(f"/cases/{order_id}")


async def decide(request: web.Request) -> web.Response:
    """Validate, publish a som.Decision, audit it, and redirect to the case (post/redirect/get)."""
    order_id, user, form, action, refused = await _admit(request)
    if refused is not None:
        return refused
    rationale = str(form.get("rationale", "")).strip()
    notes = str(form.get("evidence_notes", "")).strip()
    values = {"action": action, "rationale": rationale, "evidence_notes": notes}
    problem = ""
    if action not in ACTIONS:
        problem = "Choose one of the three actions."
    elif not rationale:
        problem = f"{ACTIONS[action]}: the rationale is required. Say what due diligence found."
    elif len(rationale) > MAX_TEXT or len(notes) > MAX_TEXT:
        problem = f"The rationale and the evidence notes are limited to {MAX_TEXT:,} characters each."
    if not problem:
        status = await asyncio.to_thread(request.app[DATA_KEY].case_status, order_id)
        if status is None:
            return await error_page(request, 404, "No such case", "There is no case for this order.")
        if status != "HELD":
            problem = f"This case is {status}, not HELD: it can no longer be decided."
    if problem:
        return await _case_response(request, order_id, status=409 if "no longer" in problem else 400,
                                    error=problem, form=values)
    return await _submit(request, user, order_id, action, ACTIONS[action], rationale, values=values,
                         fields={"evidence_notes": notes}, audited={"evidence_notes": notes},
                         after=" The case agent applies it; the status on this page follows within seconds.")


async def decide_registrant(request: web.Request) -> web.Response:
    """SET_LIMIT / TERMINATE / ONBOARDED from a case: a som.Decision naming the case's registrant (audited)."""
    order_id, user, form, action, refused = await _admit(request)
    if refused is not None:
        return refused
    detail = await asyncio.to_thread(request.app[DATA_KEY].detail, order_id)
    if detail is None:
        return await error_page(request, 404, "No such case", "There is no case for this order.")
    rationale = str(form.get("rationale", "")).strip()
    family = str(form.get("drug_family", "")).strip().upper()
    raw_units = str(form.get("monthly_limit_units", "")).strip()
    values = {"action": action, "rationale": rationale, "drug_family": family, "monthly_limit_units": raw_units}
    units: int | None = None
    problem = ""
    if action not in REGISTRANT_ACTIONS:
        problem = "Choose one of the registrant decisions."
    elif not rationale or len(rationale) > MAX_TEXT:
        problem = f"{REGISTRANT_ACTIONS[action]}: a rationale (up to {MAX_TEXT:,} characters) is required."
    elif action == "SET_LIMIT":
        if family not in detail.case.drug_families:
            problem = "Choose the drug family of the limit (one of this order's)."
        elif not raw_units.isdigit():
            problem = "The monthly limit is a whole number of dosage units (0 or more)."
        else:
            units = int(raw_units)
    if problem:
        return await _case_response(request, order_id, status=400, error=problem, form=values)
    dea = detail.case.purchaser_dea
    return await _submit(request, user, order_id, action, REGISTRANT_ACTIONS[action], rationale, values=values,
                         fields={"evidence_notes": "", "purchaser_dea": dea,
                                 "drug_family": family if units is not None else "", "monthly_limit_units": units},
                         audited={"purchaser_dea": dea, "drug_family": family, "monthly_limit_units": units})


# ------------------------------------------------------------------ the application
def create_review_app(settings: Settings, config: ReviewConfig, *, data: ReviewData | None = None,
                      publisher: Any = None) -> web.Application:
    """The review application; ``data`` and ``publisher`` may be replaced in tests."""
    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    setup_session(app, ReviewCookieStorage(Fernet(config.secret.encode("ascii")), config.secure_cookies))
    app.middlewares.append(require_login)  # after the session middleware that setup() added
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=jinja2.select_autoescape(default=True, default_for_string=True))
    env.filters.update(dt=_fmt_dt, age=_fmt_age, num=_fmt_num)
    app[DATA_KEY] = data or ReviewData(settings)
    app[STORE_KEY] = UserStore(config.users_path)
    app[OUTPUTS_KEY] = _Outputs(settings.kafka_bootstrap, publisher)
    app[THROTTLE_KEY] = LoginThrottle()
    app[CONFIG_KEY] = config
    app[SESSIONS_KEY] = SessionRegistry(config.sessions_path, timedelta(hours=SESSION_HOURS))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    set_refreshers(open_cases(app[DATA_KEY].held_cases))
    app.router.add_get("/static/review.css", stylesheet)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)
    app.router.add_get("/cases", cases_page)
    app.router.add_get("/cases/{order_id}", case_page)
    app.router.add_post("/cases/{order_id}/decision", decide)
    app.router.add_post("/cases/{order_id}/registrant-decision", decide_registrant)
    return app
