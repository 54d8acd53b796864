"""The review page: compliance analysts look at held orders and release, report or cancel them.

Small modules, each with one job:

* ``auth``  - users file, salted scrypt password hashes, roles (analyst acts, viewer reads);
* ``data``  - read-only ClickHouse access through :mod:`connectors.clickhouse.query`, every value bound and escaped;
* ``chart`` - the registrant's history for a drug family as inline SVG, rendered on the server;
* ``web``   - the aiohttp application: sessions, CSRF, pages, and publishing ``som.Decision``.

The page never changes a case itself: it publishes a decision on ``som.decisions`` and the case
agent, the only authority over case state, applies or refuses it.
"""
