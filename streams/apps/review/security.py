"""The review page's defences that hold state or read the transport: login lockout, live sessions,
whether the client is behind TLS, and which address it has.

Why server-side state at all: the session itself is a sealed cookie (aiohttp-session, Fernet), which
the server cannot take back; a logged-out cookie would stay valid until it expires. So each login
registers a random session id here, and a cookie counts only while its id is registered (logout and
expiry remove it). The registry is kept in a small file so that, with ``CSOS_REVIEW_SECRET`` set
(cookies outlive a restart), a logout also outlives it; losing the file logs everyone out (fails
closed). One review process per file: the file is written by this process only.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

#: Failed logins per user name, and per client address, that lock further attempts until the oldest of
#: them leaves the window. Attempts in flight count as failures until their password check ends, so
#: concurrent attempts cannot get more than the limit checked.
MAX_FAILED_LOGINS, MAX_FAILED_LOGINS_PER_ADDRESS = 5, 20
FAILED_LOGIN_WINDOW = timedelta(minutes=15)
#: Above this many remembered names and addresses, expired entries are swept (attackers choose names).
_SWEEP_ABOVE = 10_000

USER, ADDRESS = "user", "address"


@dataclass(frozen=True)
class Attempt:
    """A reserved login attempt: counted against its user name and address until settled."""

    name: str
    address: str

    @property
    def keys(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (USER, self.name), (ADDRESS, self.address)


class LoginThrottle:
    """Counts failed logins per user name and per client address (in memory: per process).

    ``reserve`` and ``settle`` run on the event loop without awaiting in between, so checking the
    count and taking a slot is atomic: of N concurrent attempts at most the remaining allowance gets
    to the password check, the rest are refused before it.
    """

    def __init__(self, limit: int = MAX_FAILED_LOGINS, address_limit: int = MAX_FAILED_LOGINS_PER_ADDRESS,
                 window: timedelta = FAILED_LOGIN_WINDOW) -> None:
        self.limit, self.address_limit, self.window = limit, address_limit, window
        self.failures: dict[tuple[str, str], list[datetime]] = {}
        self.pending: Counter[tuple[str, str]] = Counter()

    def _recent(self, key: tuple[str, str], now: datetime) -> list[datetime]:
        recent = [at for at in self.failures.get(key, []) if now - at < self.window]
        if recent:
            self.failures[key] = recent
        else:
            self.failures.pop(key, None)
        return recent

    def _sweep(self, now: datetime) -> None:
        if len(self.failures) > _SWEEP_ABOVE:
            for key in list(self.failures):
                self._recent(key, now)

    def reserve(self, name: str, address: str, now: datetime) -> Attempt | str:
        """A slot for one password check, or what is locked (``"user"`` or ``"address"``)."""
        self._sweep(now)
        attempt = Attempt(name, address)
        for (kind, value), limit in zip(attempt.keys, (self.limit, self.address_limit)):
            if len(self._recent((kind, value), now)) + self.pending[(kind, value)] >= limit:
                return kind
        for key in attempt.keys:
            self.pending[key] += 1
        return attempt

    def settle(self, attempt: Attempt, succeeded: bool, now: datetime) -> None:
        """The check is over: a failure counts for the name and the address; a success clears the name."""
        for key in attempt.keys:
            self.pending[key] -= 1
            if self.pending[key] <= 0:
                del self.pending[key]
            if not succeeded:
                self.failures.setdefault(key, []).append(now)
        if succeeded:  # the address keeps its failures: one known password must not unlock guessing others
            self.failures.pop((USER, attempt.name), None)


class SessionRegistry:
    """Sessions that are live: a session id (kept inside the sealed cookie) -> user and expiry.

    Only a SHA-256 of each id is kept, so the file reveals no usable id. ``path`` None keeps the
    registry in memory (sessions then end with the process, as do cookies sealed with a random key).
    """

    def __init__(self, path: Path | None, lifetime: timedelta) -> None:
        self.path, self.lifetime = path, lifetime
        self._live: dict[str, tuple[str, datetime]] = self._load()

    @staticmethod
    def _digest(sid: str) -> str:
        return hashlib.sha256(sid.encode("utf-8")).hexdigest()

    def _load(self) -> dict[str, tuple[str, datetime]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))["sessions"]
            return {d: (str(v["user"]), datetime.fromisoformat(v["expires"])) for d, v in raw.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("review sessions file %s unreadable (%s): every session must log in again", self.path, exc)
            return {}

    def _save(self, now: datetime) -> None:
        """Write the registry; an unwritable file is logged, not fatal (the registry in memory still holds)."""
        self._live = {d: v for d, v in self._live.items() if v[1] > now}
        if self.path is None:
            return
        try:
            self._write()
        except OSError as exc:
            log.error("review sessions file %s not written (%s): logins and logouts since hold only until "
                      "this process stops", self.path, exc)

    def _write(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".review-sessions-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"sessions": {d: {"user": u, "expires": e.isoformat()} for d, (u, e) in self._live.items()}},
                          f)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def start(self, sid: str, user: str, now: datetime) -> None:
        self._live[self._digest(sid)] = (user, now + self.lifetime)
        self._save(now)

    def live(self, sid: str | None, user: str, now: datetime) -> bool:
        """Whether the session ``sid`` of ``user`` was started here, is not ended, and not expired."""
        if not sid:
            return False
        entry = self._live.get(self._digest(sid))
        return entry is not None and entry[0] == user and entry[1] > now

    def end(self, sid: str | None, now: datetime) -> None:
        if sid and self._live.pop(self._digest(sid), None) is not None:
            self._save(now)


# ------------------------------------------------------------------ the transport
SECURE_MODES = ("auto", "1", "0")


def parse_proxies(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``CSOS_REVIEW_TRUSTED_PROXIES``: comma-separated addresses or networks (``10.0.0.0/8``)."""
    try:
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise ValueError(f"CSOS_REVIEW_TRUSTED_PROXIES: {exc}") from None


def is_trusted(remote: str | None, proxies: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(addr in net for net in proxies)
