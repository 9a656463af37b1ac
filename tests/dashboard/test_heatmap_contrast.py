"""The kept-rank heatmap's numbers are readable on every cell: WCAG AA (4.5:1) between each
cell's text colour and its fill, computed here (in Python, from the WCAG 2 formula) on what
`charts.js` draws in a real Chromium, not taken from the script's own arithmetic. No service
is needed: the page is `app.css` with `common.js` and `charts.js`."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page

from tests.dashboard.conftest import ARTIFACTS

RGB = re.compile(r"rgb\((\d+),\s*(\d+),\s*(\d+)\)")


def luminance(rgb: tuple[int, int, int]) -> float:
    def linear(c: int) -> float:
        x = c / 255
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4
    r, g, b = map(linear, rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def rgb(text: str) -> tuple[int, int, int]:
    if text.startswith("#"):
        return (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16))
    match = RGB.match(text)
    assert match, text
    r, g, b = (int(x) for x in match.groups())
    return (r, g, b)


def test_every_point_of_the_ramp_has_a_readable_text_colour(charts_page: Page) -> None:
    cells = charts_page.evaluate(
        "() => Array.from({length: 1001}, (_, i) => Charts.cellColours(i / 1000))")
    ratios = [contrast(rgb(c["fill"]), rgb(c["text"])) for c in cells]
    assert min(ratios) >= 4.5, min(ratios)
    # the script's own ratio agrees with this one, and it picked the better of the two
    for cell, ratio in zip(cells, ratios, strict=True):
        assert cell["ratio"] == pytest.approx(ratio, rel=1e-9)
        other = "#000000" if cell["text"] == "#ffffff" else "#ffffff"
        assert ratio >= contrast(rgb(cell["fill"]), rgb(other))


def test_every_drawn_cell_meets_wcag_aa(charts_page: Page) -> None:
    # kept ranks 0..47 over 12 layers and 4 tasks: the whole ramp, 0.55-0.8 included
    tasks = ["a", "b", "c", "d"]
    tensors = {f"layer.{i}.attention.q.weight": {"kept_rank": {t: i * 4 + k for k, t in
                                                                enumerate(tasks)}}
               for i in range(12)}
    report = {"models": [{"name": t} for t in tasks], "tensors": tensors}
    drawn = charts_page.evaluate("""report => {
        Charts.render(report, document.getElementById('charts'));
        return [...document.querySelectorAll('figure[data-chart=kept-rank] rect.cell')].map(r => {
          const text = r.nextElementSibling;
          return {value: Number(r.dataset.value), fill: r.getAttribute('fill'),
                  text: getComputedStyle(text).fill, label: text.textContent};
        });
    }""", report)
    assert [d["value"] for d in drawn] == list(range(48))
    for d in drawn:
        assert d["label"] == str(d["value"])
        ratio = contrast(rgb(d["fill"]), rgb(d["text"]))
        assert ratio >= 4.5, d
    ARTIFACTS.mkdir(exist_ok=True)
    charts_page.locator("figure[data-chart=kept-rank]").screenshot(
        path=str(ARTIFACTS / "heatmap_contrast.png"))
