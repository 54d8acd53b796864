"""The review web app with all its pages: held-order review (``web``) and the analysts' dashboards.

Why a module of its own: the dashboard pages (``dashboard_web``) are built
with the review app's page helpers (login, CSRF, templates), so the review
app cannot import them back; this module puts the two together.
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from streams.apps.review.auth import UserStore
from streams.apps.review.dashboard_web import add_dashboard_routes
from streams.apps.review.web import ReviewConfig, create_review_app
from streams.core.config import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, config: ReviewConfig, **kwargs: Any) -> web.Application:
    """The review app (``create_review_app``'s arguments) with the dashboards' routes added."""
    app = create_review_app(settings, config, **kwargs)
    add_dashboard_routes(app)
    return app


def run_review(settings: Settings, config: ReviewConfig) -> None:
    """Serve on ``config.host`` (127.0.0.1 by default) until SIGINT/SIGTERM."""
    app = create_app(settings, config)
    if not UserStore(config.users_path).users():
        log.warning("no users in %s: nobody can log in; add one with `csos review add-user NAME --role analyst`",
                    config.users_path)
    log.warning("review page on http://%s:%d (users: %s)", config.host, config.port, config.users_path)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)
