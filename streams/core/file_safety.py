"""Refuse to trust a file that someone other than this user (or root) could have written.

Why: the trust anchors (``trust/root*.pem``) decide which orders verify, and the review users file
decides who may release orders. A query engine, a web app or another local account that can write
either can plant a CA or a user. A ClickHouse server runs as its own OS user, so files it writes are
owned by that user and are refused here; the embedded engine runs as the pipeline's own user, so
there the SQL allow-list (``connectors/clickhouse/sql_guard.py``) is what keeps ``INTO OUTFILE`` out.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from streams.core.errors import ConfigError


class UnsafeFileError(ConfigError, RuntimeError):
    """A security-relevant file or directory is writable by others or owned by another user."""
    code = "UNSAFE_FILE"


def ensure_private_to_owner(path: Path, what: str) -> None:
    """Raise :class:`UnsafeFileError` if ``path`` is group/other-writable or owned by another non-root user.

    ``FileNotFoundError`` passes through (callers decide whether a missing file is fine). The owner
    does not matter on a read-only mount (a container's ``:ro`` volume, owned by the host's user):
    nothing here can change it.
    """
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                              f"refusing to trust it. Fix: chmod go-w {path} (and check its content)")
    if st.st_uid not in (0, os.geteuid()) and not _on_read_only_mount(path):
        raise UnsafeFileError(f"{what} {path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()}) "
                              "or root; refusing to trust it (was it written by another service?)")


def _on_read_only_mount(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
