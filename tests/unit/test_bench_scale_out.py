"""The scale-out figure `csos bench --workers N` prints: what a second worker adds, not only what it costs."""
from __future__ import annotations

import pytest

from streams.tools.bench import BenchResult, scale_out_summary


def _result(lines: int, worker_cpu: list[float]) -> BenchResult:
    return BenchResult(orders=lines // 7, lines=lines, publish_seconds=1.0, end_to_end_seconds=10.0,
                       latencies_ms=[], worker_cpu_seconds=sum(worker_cpu), workers=len(worker_cpu),
                       worker_cpu_each=worker_cpu)


def test_one_worker_capacity_is_its_lines_per_cpu_second() -> None:
    one = _result(7_000, [5.0])
    assert one.capacity == pytest.approx(one.lines_per_worker_cpu) == pytest.approx(1_400)


def test_an_uneven_split_counts_against_the_group() -> None:
    even = _result(7_000, [2.5, 2.5])
    uneven = _result(7_000, [4.0, 1.0])  # the same summed CPU, one worker doing most of it
    assert even.lines_per_worker_cpu == uneven.lines_per_worker_cpu
    assert even.capacity == pytest.approx(2_800)
    assert uneven.capacity == pytest.approx(1_750)


def test_the_summary_gives_both_ratios() -> None:
    one, two = _result(7_000, [5.0]), _result(7_000, [2.8, 3.0])
    text = scale_out_summary(one, two)
    assert "= 1.67x" in text  # 7,000 / 3.0 against 7,000 / 5.0
    assert "= 0.86" in text  # 7,000 / 5.8 against 7,000 / 5.0
    assert "2 workers" in text
    assert "order lines per second" in two.render() and "busiest" in two.render()
    assert "busiest" not in one.render()
