"""Users of the review page: who may log in, with which role, checked against a salted scrypt hash.

Why a file and not a database: the page is a small internal tool run next to the pipeline; the
users file (``CSOS_REVIEW_USERS``) is written by ``csos review add-user`` with mode 0600 and read at
every login, so adding or removing a user needs no restart. Passwords are never stored: each entry
keeps ``scrypt$n$r$p$salt$hash`` (hashlib.scrypt, 16-byte random salt), compared in constant time.

Roles: ``analyst`` may submit decisions; ``viewer`` may only read. The role is read from the file at
login and kept in the session; the case agent checks the role carried on every decision again.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from streams.core.file_safety import ensure_private_to_owner
from streams.core.errors import CsosError

ANALYST = "analyst"
VIEWER = "viewer"
ROLES = (ANALYST, VIEWER)

#: scrypt cost: n = 2**14, r = 8, p = 1 takes ~16 MiB and ~50 ms, the interactive-login figure in the
#: scrypt paper and OWASP's minimum; the parameters are stored with each hash, so they can be raised later.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2 ** 14, 8, 1, 32
USERNAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
#: A hash compared when the user does not exist, so an unknown name costs as long as a wrong password.
_DUMMY_HASH: str | None = None


class UserError(CsosError, ValueError):
    """A user name, role or password that cannot be accepted."""
    code = "REVIEW_USER"


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == ANALYST


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash``: self-describing, so verification never guesses the parameters."""
    if not password:
        raise UserError("the password may not be empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_LEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``; a malformed entry never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def validate_username(name: str) -> str:
    if not USERNAME_RE.match(name or ""):
        raise UserError("a user name is 1-64 characters: lower-case letters, digits, '.', '_' or '-', "
                        "starting with a letter")
    return name


class UserStore:
    """The users file: ``{"users": {name: {"role": ..., "password": "scrypt$..."}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, dict[str, str]]:
        """The users; :class:`~streams.core.file_safety.UnsafeFileError` if others could have written the file."""
        try:
            ensure_private_to_owner(self.path, "review users file")
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        users = data.get("users") if isinstance(data, dict) else None
        return users if isinstance(users, dict) else {}

    def users(self) -> dict[str, str]:
        """name -> role, for listing."""
        return {n: u.get("role", "") for n, u in self._load().items() if isinstance(u, dict)}

    def add(self, name: str, role: str, password: str) -> None:
        """Create or replace a user; the file is replaced atomically and readable by its owner only."""
        validate_username(name)
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}")
        users = self._load()
        users[name] = {"role": role, "password": hash_password(password)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"users": users}, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> bool:
        users = self._load()
        if name not in users:
            return False
        del users[name]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"users": users}, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        return True

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if the name exists, its role is known and the password matches; else None.

        Slow on purpose (scrypt), and as slow for an unknown name as for a wrong password.
        """
        global _DUMMY_HASH
        entry = self._load().get(name or "")
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            if _DUMMY_HASH is None:
                _DUMMY_HASH = hash_password(secrets.token_hex(8))
            verify_password(password or "", _DUMMY_HASH)
            return None
        if not verify_password(password or "", str(entry.get("password", ""))):
            return None
        return User(name, entry["role"])
