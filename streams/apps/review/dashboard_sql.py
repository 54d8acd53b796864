"""Every query the analysts' dashboards run, in one place: the pages, the tests and ``csos bench-dashboards``
all execute exactly this text.

Why one module: a dashboard is only as fast and as right as its SQL, so the benchmark must time the very
queries the page runs and the tests must check their aggregates, not copies. Every value is a
``%(name)s`` placeholder, bound and escaped by clickhouse-connect (``finalize_query``) at run time; no
user input is ever formatted into the text. Optional filters are written as ``(%(f)s = '' OR col = %(f)s)``
so one text serves every combination.

The volume charts and the growth ranking read the aggregates that materialized views keep
(``dash_volume_day``, ``dash_registrant_week``, ``dash_verdict_day``, ``schemas/clickhouse/017_dashboard_aggregates.sql``),
the growth ranking ``dash_growth`` and the fill report ``dash_released_orders`` (``018_dashboard_fast_paths.sql``); the small tables (cases,
rejections, dead letters, reports, shipments) are read directly with ``FINAL``. Every query passes
``connectors/clickhouse/sql_guard.py`` (one plain SELECT), since on the embedded engine it goes through the sink's ``/sql``.
"""
from __future__ import annotations

#: Date range, shared by most queries: ``start`` and ``end`` are 'YYYY-MM-DD' (inclusive, UTC days).
_DAYS = "day BETWEEN toDate(%(start)s) AND toDate(%(end)s)"
#: The first Monday of the recent weeks the growth ranking compares (the week holding ``end`` is the last).
_RECENT = "(toMonday(toDate(%(end)s)) - 7 * (%(recent_weeks)s - 1))"
#: The growth ranking's first week, the first 4-week block starting on or after it, and the end of the last block
#: ending on or before the recent weeks (blocks are aligned on Monday 1970-01-05, day 4: 018_dashboard_fast_paths.sql).
#: When no whole block fits, _BLOCKS_END <= _FIRST_BLOCK and every week is read as a weekly row.
_FIRST_WEEK = "toMonday(toDate(%(start)s))"
_FIRST_BLOCK = f"({_FIRST_WEEK} + modulo(28 - modulo(toUInt32({_FIRST_WEEK}) - 4, 28), 28))"
_BLOCKS_END = f"({_RECENT} - modulo(toUInt32({_RECENT}) - 4, 28))"
_PEERS = ("(%(state)s = '' OR purchaser_state = %(state)s) "
          "AND (%(activity)s = '' OR business_activity = %(activity)s)")

#: The families, states and business activities seen in the range: the filter form's choices.
FILTER_CHOICES = f"""
SELECT arraySort(groupUniqArray(toString(drug_family))), arraySort(groupUniqArray(toString(purchaser_state))),
       arraySort(groupUniqArray(toString(business_activity)))
FROM dash_volume_day WHERE {_DAYS}
"""

#: Orders per day and verdict: all orders (no family chosen) or those with a finding for the family.
VERDICTS_PER_DAY = f"""
SELECT day, verdict, sum(orders) AS orders
FROM dash_verdict_day
WHERE {_DAYS} AND detector = '' AND drug_family = %(family)s
GROUP BY day, verdict ORDER BY day, verdict
"""

#: Holds per day by the detector that decided them and the drug family it found (an order held for two
#: families counts once per family).
HOLDS_BY_DETECTOR = f"""
SELECT day, detector, drug_family, sum(orders) AS orders
FROM dash_verdict_day
WHERE {_DAYS} AND verdict = 'HOLD' AND detector != '' AND (%(family)s = '' OR drug_family = %(family)s)
GROUP BY day, detector, drug_family ORDER BY day, detector, drug_family
"""

#: Orders, dosage units and MME per day and family (the peer-group filters apply).
VOLUME_PER_DAY = f"""
SELECT day, drug_family, sum(orders) AS orders, sum(dosage_units) AS units, sum(mme) AS mme
FROM dash_volume_day
WHERE {_DAYS} AND (%(family)s = '' OR drug_family = %(family)s) AND {_PEERS}
GROUP BY day, drug_family ORDER BY day, drug_family
"""

#: Rejected orders per day and reason code.
REJECTIONS_PER_DAY = """
SELECT toDate(rejected_at) AS day, reason_code, count() AS orders
FROM rejections FINAL
WHERE rejected_at >= toDate(%(start)s) AND rejected_at < toDate(%(end)s) + 1
GROUP BY day, reason_code ORDER BY day, reason_code
"""

#: Dead letters per day and the stage that could not process them.
DEAD_LETTERS_PER_DAY = """
SELECT toDate(failed_at) AS day, stage, count() AS messages
FROM dead_letters FINAL
WHERE failed_at >= toDate(%(start)s) AND failed_at < toDate(%(end)s) + 1
GROUP BY day, stage ORDER BY day, stage
"""

#: Open cases by age in whole days, within the due-diligence clock or past it (``now`` in epoch ms).
OPEN_CASES_BY_AGE = """
SELECT toUInt32(intDiv(%(now)s - toUnixTimestamp64Milli(held_at), 86400000)) AS age_days,
       countIf(toUnixTimestamp64Milli(due_at) > %(now)s) AS within_clock,
       countIf(toUnixTimestamp64Milli(due_at) <= %(now)s) AS past_clock
FROM cases FINAL
WHERE status = 'HELD' AND (%(family)s = '' OR has(drug_families, %(family)s))
GROUP BY age_days ORDER BY age_days
"""

#: The open cases with the oldest deadline first (the overview lists them with links).
OLDEST_OPEN_CASES = """
SELECT order_id, order_number, purchaser_dea, toUnixTimestamp64Milli(held_at), toUnixTimestamp64Milli(due_at),
       drug_families, total_dosage_units
FROM cases FINAL
WHERE status = 'HELD' AND (%(family)s = '' OR has(drug_families, %(family)s))
ORDER BY due_at, held_at, order_id LIMIT %(limit)s
"""

#: Decisions per analyst (case events an analyst caused: RELEASED, REPORTED, CANCELLED, REFUSED, ...).
DECISIONS_PER_ANALYST = """
SELECT actor, kind, count() AS decisions
FROM case_events FINAL
WHERE kind NOT IN ('OPENED', 'ESCALATED') AND actor != ''
  AND at >= toDate(%(start)s) AND at < toDate(%(end)s) + 1
  AND (%(family)s = '' OR has(drug_families, %(family)s))
GROUP BY actor, kind ORDER BY actor, kind
"""

#: Orders reported to DEA as suspicious, per week (Monday), with their lines' dosage units.
REPORTED_PER_WEEK = """
SELECT toMonday(reported_at) AS week, uniqExact(order_id) AS orders, sum(dosage_units) AS units
FROM suspicious_order_reports FINAL
WHERE reported_at >= toDate(%(start)s) AND reported_at < toDate(%(end)s) + 1
  AND (%(family)s = '' OR drug_family = %(family)s)
GROUP BY week ORDER BY week
"""

#: The daily CSOS fill report over the last 14 days of the range (the reports still to send or just sent):
#: shipped lines and orders per ship date, and lines of orders never released (the report's NOT_RELEASED /
#: UNKNOWN_ORDER exceptions). Releases are looked up from 60 days before the first ship date (an order is filled
#: within 60 days of signing, 21 CFR 1305.22(e), and received after it) in ``dash_released_orders``
#: (018_dashboard_fast_paths.sql: one narrow column, not three of every verdict). One pass over the shipments:
#: a redelivered line is an exact copy of its key (``shipment_id``, ``line_no``), so counting distinct keys per day
#: deduplicates as FINAL would, without FINAL's merge of the whole month before the date filter applies.
FILL_REPORT_STATUS = """
SELECT toDate(s.shipped_at) AS ship_day, uniqExact(s.shipment_id, s.line_no) AS lines,
       uniqExact(s.order_id) AS orders, uniqExactIf((s.shipment_id, s.line_no), r.released = 0) AS not_released
FROM shipments AS s
LEFT ANY JOIN
(
    SELECT order_id, toUInt8(1) AS released
    FROM dash_released_orders
    WHERE received_day >= greatest(toDate(%(start)s), toDate(%(end)s) - 13) - 60
) AS r ON r.order_id = s.order_id
WHERE s.shipped_at >= greatest(toDate(%(start)s), toDate(%(end)s) - 13) AND s.shipped_at < toDate(%(end)s) + 1
GROUP BY ship_day ORDER BY ship_day
"""

#: The daily suspicious-order report: cases decided REPORTED per day against orders present in the report.
SOR_STATUS = """
SELECT day, sum(decided) AS decided, sum(reported) AS reported
FROM
(
    SELECT toDate(at) AS day, uniqExact(order_id) AS decided, toUInt64(0) AS reported
    FROM case_events FINAL
    WHERE kind = 'REPORTED' AND at >= toDate(%(start)s) AND at < toDate(%(end)s) + 1
    GROUP BY day
    UNION ALL
    SELECT toDate(reported_at) AS day, toUInt64(0) AS decided, uniqExact(order_id) AS reported
    FROM suspicious_order_reports FINAL
    WHERE reported_at >= toDate(%(start)s) AND reported_at < toDate(%(end)s) + 1
    GROUP BY day
)
GROUP BY day ORDER BY day
"""

#: Registrants whose dosage units (or MME) of a family grew most, in whole weeks (Monday to Sunday): the last
#: ``recent_weeks`` weeks up to ``end`` against the earlier weeks of the range, scaled to the same number of days,
#: and against the median of their peers (same family, business activity and state) over the same recent weeks.
#: Registrants with no earlier history are left out of the own-history ranking (nothing to grow from) but count
#: as peers. Read from ``dash_growth`` (018_dashboard_fast_paths.sql): the baseline's whole 4-week blocks as one row
#: each (counted as their first Monday, always before the recent weeks), the other weeks (at most three at each end
#: of the baseline, and the recent weeks) as weekly rows; the same sums as ``dash_registrant_week``'s weeks.
GROWTH = f"""
SELECT purchaser_dea, drug_family, peer_activity, peer_state, recent, baseline,
       if(baseline > 0, recent / baseline, 0) AS own_ratio, peer_median,
       if(peer_median > 0, recent / peer_median, 0) AS peer_ratio, peers
FROM
(
    SELECT purchaser_dea, drug_family, peer_activity, peer_state, recent, baseline,
           median(recent) OVER (PARTITION BY drug_family, peer_activity, peer_state) AS peer_median,
           count() OVER (PARTITION BY drug_family, peer_activity, peer_state) AS peers
    FROM
    (
        SELECT purchaser_dea, drug_family, any(business_activity) AS peer_activity, any(purchaser_state) AS peer_state,
               sumIf(if(%(metric)s = 'mme', mme, toFloat64(dosage_units)), week >= {_RECENT}) AS recent,
               sumIf(if(%(metric)s = 'mme', mme, toFloat64(dosage_units)), week < {_RECENT})
                   * (dateDiff('day', {_RECENT}, toDate(%(end)s)) + 1)
                   / greatest(1, dateDiff('day', {_FIRST_WEEK}, {_RECENT})) AS baseline
        FROM dash_growth
        WHERE week >= {_FIRST_WEEK} AND week <= toDate(%(end)s)
          AND if(week >= {_FIRST_BLOCK} AND week < {_BLOCKS_END}, weeks = 4, weeks = 1)
          AND (%(family)s = '' OR drug_family = %(family)s) AND {_PEERS}
        GROUP BY purchaser_dea, drug_family
    )
)
WHERE recent > 0 AND (baseline > 0 OR %(sort)s = 'peer')
ORDER BY if(%(sort)s = 'peer', peer_ratio, own_ratio) DESC, recent DESC, purchaser_dea, drug_family
LIMIT %(limit)s
"""

#: One registrant: what it ordered per family over all its history in the aggregates (first and last week),
#: and its peer group.
REGISTRANT_FAMILIES = """
SELECT drug_family, any(business_activity), any(purchaser_state), sum(orders), sum(dosage_units), sum(mme),
       min(week), max(week)
FROM dash_registrant_week
WHERE purchaser_dea = %(dea)s
GROUP BY drug_family ORDER BY drug_family
"""

#: The registrant's orders in the range, one point per order and family, with the monitor's verdict. Lines and
#: verdicts are deduplicated on their keys by GROUP BY rather than FINAL (a redelivered row is an exact copy),
#: which reads only the registrant's granules (FINAL costs ~3x more here).
REGISTRANT_ORDERS = """
SELECT l.order_id, l.family, toUnixTimestamp64Milli(min(l.line_at)) AS at, sum(l.line_units) AS units,
       any(v.order_verdict) AS verdict
FROM
(
    SELECT order_id, line_no, any(drug_family) AS family, any(received_at) AS line_at, any(dosage_units) AS line_units
    FROM order_lines
    WHERE purchaser_dea = %(dea)s AND received_at >= toDate(%(start)s) AND received_at < toDate(%(end)s) + 1
    GROUP BY order_id, line_no
) AS l
LEFT JOIN
(
    SELECT order_id, any(verdict) AS order_verdict
    FROM verdicts
    WHERE purchaser_dea = %(dea)s AND received_at >= toDate(%(start)s) AND received_at < toDate(%(end)s) + 1
    GROUP BY order_id
) AS v ON v.order_id = l.order_id
WHERE (%(family)s = '' OR l.family = %(family)s)
GROUP BY l.order_id, l.family ORDER BY at, l.order_id
"""

#: The size detector's latest threshold per family for the registrant up to the end of the range.
REGISTRANT_THRESHOLDS = """
SELECT drug_family, argMax(threshold, decided_at)
FROM verdict_reasons
WHERE purchaser_dea = %(dea)s AND detector = 'size' AND threshold > 0 AND decided_at < toDate(%(end)s) + 1
GROUP BY drug_family
"""

#: The registrant's cases, open ones first.
REGISTRANT_CASES = """
SELECT order_id, order_number, status, toUnixTimestamp64Milli(held_at), toUnixTimestamp64Milli(due_at),
       toUnixTimestamp64Milli(updated_at), decided_by, drug_families, total_dosage_units
FROM cases FINAL
WHERE purchaser_dea = %(dea)s
ORDER BY status = 'HELD' DESC, held_at DESC, order_id LIMIT %(limit)s
"""

#: The suspicious order reports filed about the registrant.
REGISTRANT_REPORTS = """
SELECT report_id, order_id, order_form_number, toUnixTimestamp64Milli(any(reported_at)) AS reported_ms, any(reported_by),
       groupUniqArray(toString(drug_family)), sum(dosage_units)
FROM suspicious_order_reports FINAL
WHERE ordering_registrant_dea = %(dea)s
GROUP BY report_id, order_id, order_form_number ORDER BY reported_ms DESC, report_id LIMIT %(limit)s
"""

#: name -> SQL, for the benchmark and the guard test: every dashboard query.
ALL: dict[str, str] = {name: sql for name, sql in globals().items() if name.isupper() and isinstance(sql, str)
                       and name.lstrip("_") == name}
