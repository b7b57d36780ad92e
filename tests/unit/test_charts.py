"""The dashboard's SVG charts: one stacked rect per non-zero value, names escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from worker.api import charts

DAYS = ["2026-11-29", "2026-11-30", "2026-12-01"]


def bars(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [e for e in root.iter() if e.get("class") == "bar"]


def test_each_nonzero_value_is_a_bar_stacked_on_its_day() -> None:
    svg = charts.stacked_bars(
        DAYS,
        {"alpha": {"2026-11-30": 300.0, "2026-12-01": 100.0}, "beta": {"2026-12-01": 100.0}},
        label="tokens per day by key",
    )
    drawn = bars(svg)
    assert len(drawn) == 3
    heights = [float(b.get("height", 0)) for b in drawn]
    # The tallest day (300) sets the scale: alpha's 300 is the full height, 100 a third.
    assert max(heights) == charts.HEIGHT - charts.TOP - charts.BOTTOM
    assert abs(heights[1] - heights[0] / 3) < 0.2
    titles = [b.find("title").text for b in drawn]  # type: ignore[union-attr]
    assert "alpha 2026-11-30: 300" in titles


def test_a_name_is_escaped_and_an_empty_period_says_so() -> None:
    svg = charts.stacked_bars(DAYS, {"<script>x</script>": {DAYS[0]: 5.0}}, label="l")
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    ET.fromstring(svg)  # well-formed
    empty = charts.stacked_bars(DAYS, {}, label="l")
    assert not bars(empty) and "no usage in this period" in empty
    assert re.search(r'data-days="3"', empty)
