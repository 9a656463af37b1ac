"""The report charts' axes are readable as drawn in a real Chromium: a log axis over less than
a decade still has numbers, and the names under the bars do not run into each other."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Page

from tests.dashboard.conftest import ARTIFACTS

MATRICES = [f"encoder.layer.0.{m}.weight" for m in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]
# the text boxes of a chart's labels, as laid out on screen: a label's own box, turned with it
# (a slanted name's corners, not the upright rectangle around them)
BOXES = """(figure, cls) => [...figure.querySelectorAll(`svg text.${cls}`)].map(t => {
  const b = t.getBBox(), m = t.getScreenCTM();
  const corners = [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height],
                   [b.x, b.y + b.height]].map(([x, y]) => new DOMPoint(x, y).matrixTransform(m));
  return {text: t.textContent, corners: corners.map(c => [c.x, c.y])};
})"""
Point = tuple[float, float]


def render(page: Page, report: dict[str, Any]) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    page.evaluate("report => Charts.render(report, document.getElementById('charts'))", report)


def overlap(a: list[Point], b: list[Point]) -> bool:
    """Two convex quadrilaterals overlap unless an edge of one separates them."""
    for quad in (a, b):
        for (x1, y1), (x2, y2) in zip(quad, quad[1:] + quad[:1], strict=True):
            axis = (y1 - y2, x2 - x1)
            pa = [axis[0] * x + axis[1] * y for x, y in a]
            pb = [axis[0] * x + axis[1] * y for x, y in b]
            if max(pa) <= min(pb) or max(pb) <= min(pa):
                return False
    return True


def test_a_spectrum_within_one_decade_has_numbers_on_its_axis(charts_page: Page) -> None:
    # what a TSV merge of MiniLM fine-tunes reports: 64 singular values from 0.0168 to 0.0123,
    # where no 1, 2 or 5 times a power of ten falls
    spectrum = [0.0168 * (0.0123 / 0.0168) ** (i / 63) for i in range(64)]
    render(charts_page, {"models": [{"name": "a"}, {"name": "b"}],
                         "tensors": {MATRICES[0]: {"singular_values": [spectrum, spectrum[::-1]]}}})
    figure = charts_page.locator("figure[data-chart=spectra]")
    ticks = figure.evaluate(BOXES, "y-tick")
    values = [float(t["text"]) for t in ticks]
    assert len(values) >= 3, values
    assert all(0.0123 <= v <= 0.0168 for v in values), values
    # larger numbers higher up
    tops = [t["corners"][0][1] for t in sorted(ticks, key=lambda t: float(t["text"]))]
    assert tops == sorted(tops, reverse=True)
    ARTIFACTS.mkdir(exist_ok=True)
    figure.screenshot(path=str(ARTIFACTS / "chart_axes-spectrum.png"))


def test_names_under_the_bars_do_not_overlap(charts_page: Page) -> None:
    for n in (2, 6, 12, 24):
        names = [f"encoder.layer.{i // 6}.{m.split('.', 3)[3]}" for i, m in
                 enumerate(MATRICES * 4)][:n]
        render(charts_page, {"tensors": {name: {"interference": 10.0 + i}
                                         for i, name in enumerate(names)}})
        figure = charts_page.locator("figure[data-chart=interference]")
        labels = figure.evaluate(BOXES, "x-label")
        assert len(labels) == n
        # each keeps its layer and its module's name whole (these are 26 characters or less)
        for name, label in zip(names, labels, strict=True):
            assert label["text"] == name.removeprefix("encoder.layer.").removesuffix(".weight")
        svg = figure.locator("svg").bounding_box()
        assert svg is not None
        for i, a in enumerate(labels):
            # inside the picture (not cut at its edges), clear of every other name
            for x, y in a["corners"]:
                assert svg["x"] <= x <= svg["x"] + svg["width"], (n, a)
                assert y <= svg["y"] + svg["height"], (n, a)
            for b in labels[i + 1:]:
                assert not overlap(a["corners"], b["corners"]), (n, a, b)
        ARTIFACTS.mkdir(exist_ok=True)
        figure.screenshot(path=str(ARTIFACTS / f"chart_axes-bars-{n}.png"))


def test_a_long_name_under_a_bar_keeps_its_layer(charts_page: Page) -> None:
    names = ["encoder.layer.11.crossattention.output.dense.weight",
             "encoder.layer.11.attention.output.dense.weight"]
    render(charts_page, {"tensors": {name: {"interference": 1.0} for name in names}})
    labels = charts_page.locator("figure[data-chart=interference] svg text.x-label")
    assert labels.all_text_contents() == ["11.….output.dense", "11.attention.output.dense"]
