// Charts of merge_report.json as inline SVG, each with a data table for screen readers.
// A chart is drawn only when the report holds its data:
//   interference     tensors[name].interference (number)                          tsv
//   spectra          tensors[name].singular_values (per task, descending)         tsv
//   kept-rank        tensors[name].kept_rank (list per task, or {task: rank})   tsv, adarank
//   recovery         recovery.relative_error ({task: error})                      rmm
//   loss             loss_curve, or <top-level object>.loss_curve (adarank.loss_curve)
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  // Okabe-Ito: distinguishable with colour-blindness, each dark enough on white
  const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8a5a00", "#3d7fb8", "#000000"];
  const W = 640, H = 300, M = { l: 64, r: 16, t: 12, b: 56 };
  let uid = 0;

  function s(tag, attrs, ...children) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    return String(Number(v.toPrecision(3)));
  }

  // "encoder.layer.3.attention.self.query.weight" -> "3.attention.self.query"
  function shortName(name) {
    return name.replace(/\.weight$/, "").replace(/^(model\.)?(encoder\.|decoder\.)?(layers?\.)/, "");
  }

  // at most 26 characters (BERT's "11.attention.output.dense" whole), keeping the layer:
  // "11.crossattention.output.dense" -> "11.….output.dense"
  function barLabel(name) {
    const parts = name.split(".");
    const kept = name.length > 26 && parts.length > 3
      ? `${parts[0]}.….${parts.slice(-2).join(".")}` : name;
    return kept.length > 26 ? `…${kept.slice(-25)}` : kept;
  }

  function figure(kind, title, description, svg, table, extra) {
    const id = `chart-${++uid}`;
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-labelledby", `${id}-t ${id}-d`);
    svg.prepend(s("title", { id: `${id}-t` }, title), s("desc", { id: `${id}-d` }, description));
    const fig = MS.el("figure", { class: "chart", "data-chart": kind },
                      MS.el("figcaption", {}, title));
    if (extra) fig.append(extra);
    fig.append(svg, MS.el("details", {}, MS.el("summary", {}, "Data"), table));
    return fig;
  }

  function dataTable(head, rows) {
    return MS.el("table", {},
      MS.el("thead", {}, MS.el("tr", {}, ...head.map((h) => MS.el("th", { scope: "col" }, h)))),
      MS.el("tbody", {}, ...rows.map((r) => MS.el("tr", {}, ...r.map((c, i) =>
        i === 0 ? MS.el("th", { scope: "row" }, c) : MS.el("td", { class: "num" }, c))))));
  }

  function scale(lo, hi, a, b, log) {
    if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    const span = hi - lo || 1;
    return (v) => a + ((log ? Math.log10(v) : v) - lo) / span * (b - a);
  }

  function ticks(lo, hi, log) {
    if (log) {
      const out = [];
      const decades = [];
      for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) decades.push(e);
      // within less than two decades, label 1, 2 and 5 of each as well
      const steps = decades.length > 3 ? [1] : [1, 2, 5];
      for (const e of decades) for (const m of steps) out.push(Number((m * 10 ** e).toPrecision(3)));
      const inside = out.filter((v) => v >= lo / 1.0001 && v <= hi * 1.0001);
      // a narrow range (a spectrum from 0.0123 to 0.0170) holds no 1, 2 or 5: an axis without
      // numbers; the linear ticks of the range read as well on a log axis that short
      return inside.length >= 2 ? inside : ticks(lo, hi, false);
    }
    const step = 10 ** Math.floor(Math.log10((hi - lo) / 4 || 1));
    const nice = [1, 2, 5, 10].map((m) => m * step).find((st) => (hi - lo) / st <= 6) || step * 10;
    const out = [];
    for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(Number(v.toPrecision(6)));
    return out;
  }

  function axes(svg, y, yTicks, yLabel, xLabel, height = H) {
    for (const v of yTicks) {
      svg.append(s("line", { class: "grid", x1: M.l, x2: W - M.r, y1: y(v), y2: y(v) }),
                 s("text", { class: "y-tick", x: M.l - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
    }
    svg.append(s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }),
               s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }),
               s("text", { x: 12, y: (H - M.b + M.t) / 2, transform: `rotate(-90 12 ${(H - M.b + M.t) / 2})`,
                           "text-anchor": "middle" }, yLabel),
               s("text", { x: (M.l + W - M.r) / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  }

  function barChart(kind, title, labels, values, yLabel, xLabel) {
    const named = values.length <= 24;  // room for (short) names under the bars
    const band = (W - M.l - M.r) / values.length;
    const texts = labels.map((l, i) => (named ? barLabel(shortName(l)) : String(i)));
    // names wider than their bar are slanted, or they overlap their neighbours' (an 11 px
    // system sans averages under 6.5 px a character)
    const slant = named && Math.max(...texts.map((t) => t.length)) * 6.5 > band * 0.95;
    const height = slant ? H + 100 : H;
    const svg = s("svg", { viewBox: `0 0 ${W} ${height}` });
    const hi = Math.max(...values, 0) || 1;
    const y = scale(0, hi * 1.05, H - M.b, M.t);
    axes(svg, y, ticks(0, hi * 1.05), yLabel, xLabel, height);
    const every = Math.ceil(values.length / 12);  // at most a dozen x labels
    values.forEach((v, i) => {
      const x = M.l + i * band;
      svg.append(s("rect", { class: "bar", x: x + band * 0.1, y: y(v), width: Math.max(1, band * 0.8),
                             height: Math.max(0, y(0) - y(v)), "data-value": v },
                   s("title", {}, `${labels[i]}: ${fmt(v)}`)));
      if (named || i % every === 0) {
        const lx = x + band / 2, ly = H - M.b + 12;
        svg.append(s("text", { class: "x-label", x: lx, y: ly, "text-anchor": slant ? "end" : "middle",
                               transform: slant ? `rotate(-60 ${lx} ${ly})` : "" }, texts[i]));
      }
    });
    return figure(kind, title, `${title}: ${values.length} bars, largest ${fmt(hi)}.`, svg,
                  dataTable(["", yLabel], labels.map((l, i) => [l, fmt(values[i])])));
  }

  function lineChart(kind, title, series, yLabel, xLabel, log, extra) {
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}` });
    const all = series.flatMap((se) => se.values).filter((v) => Number.isFinite(v) && (!log || v > 0));
    const n = Math.max(...series.map((se) => se.values.length));
    let lo = Math.min(...all), hi = Math.max(...all);
    if (!log) { lo = Math.min(lo, 0); }
    if (lo === hi) { hi = lo + 1; }
    const y = scale(lo, hi, H - M.b, M.t, log);
    const x = scale(0, Math.max(1, n - 1), M.l, W - M.r);
    axes(svg, y, ticks(lo, hi, log), yLabel, xLabel);
    for (const v of ticks(0, Math.max(1, n - 1))) {
      if (Number.isInteger(v)) svg.append(s("text", { x: x(v), y: H - M.b + 14, "text-anchor": "middle" }, v));
    }
    const legend = MS.el("div", { class: "legend" });
    series.forEach((se, k) => {
      const colour = COLOURS[k % COLOURS.length];
      const pts = se.values.map((v, i) => [i, v]).filter(([, v]) => Number.isFinite(v) && (!log || v > 0));
      if (!pts.length) return;
      const d = pts.map(([i, v], j) => `${j ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
      svg.append(s("path", { class: "series", d, stroke: colour, "data-points": pts.length },
                   s("title", {}, se.name)));
      const item = MS.el("span", {}, se.name);
      item.style.setProperty("--c", colour);
      legend.append(item);
    });
    const rows = [];
    for (let i = 0; i < n; i++) rows.push([String(i), ...series.map((se) => (i < se.values.length ? fmt(se.values[i]) : ""))]);
    const wrap = MS.el("div", {});
    if (extra) wrap.append(extra);
    if (series.length > 1) wrap.append(legend);
    return figure(kind, title, `${title}: ${series.length} series of up to ${n} points.`, svg,
                  dataTable([xLabel, ...series.map((se) => se.name)], rows), wrap);
  }

  // WCAG 2 relative luminance of an [r, g, b] in 0-255, and the contrast ratio of two colours
  function luminance(rgb) {
    const [r, g, b] = rgb.map((c) => {
      const x = c / 255;
      return x <= 0.04045 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  function contrast(a, b) {
    const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  }

  // a heatmap cell at t in [0, 1] (white -> dark blue) and the text colour that reads best on
  // it. White or black text: any colour reaches at least sqrt(21) = 4.58:1 against one of
  // them, so every cell passes WCAG AA (4.5:1) whatever the ramp; a grey text would not.
  const TEXT = { "#ffffff": [255, 255, 255], "#000000": [0, 0, 0] };
  function cellColours(t) {
    const rgb = [255 - 244 * t, 255 - 168 * t, 255 - 47 * t].map(Math.round);
    const ratios = Object.entries(TEXT).map(([name, c]) => [name, contrast(rgb, c)]);
    const [text, ratio] = ratios.reduce((best, x) => (x[1] > best[1] ? x : best));
    return { fill: `rgb(${rgb.join(",")})`, text, ratio };
  }

  function heatmap(kind, title, rowLabels, colLabels, values) {
    const cell = 16, left = 200, top = 20;
    const cw = Math.max(40, Math.min(90, 420 / colLabels.length));
    const width = left + cw * colLabels.length + 10, height = top + cell * rowLabels.length + 4;
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}` });
    const hi = Math.max(1, ...values.flat());
    colLabels.forEach((c, j) => svg.append(s("text", { x: left + cw * j + cw / 2, y: 14, "text-anchor": "middle" }, c)));
    rowLabels.forEach((r, i) => {
      svg.append(s("text", { x: left - 6, y: top + cell * i + 12, "text-anchor": "end" }, r));
      values[i].forEach((v, j) => {
        const { fill, text } = cellColours(v / hi);
        svg.append(s("rect", { class: "cell", x: left + cw * j, y: top + cell * i, width: cw - 1, height: cell - 1,
                               fill, "data-value": v }, s("title", {}, `${r}, ${colLabels[j]}: ${v}`)),
                   s("text", { x: left + cw * j + cw / 2, y: top + cell * i + 12, "text-anchor": "middle",
                               class: text === "#ffffff" ? "on-dark" : "on-light" }, v));
      });
    });
    return figure(kind, title, `${title}: ${rowLabels.length} layers by ${colLabels.length} tasks, largest ${hi}.`,
                  svg, dataTable(["layer", ...colLabels], rowLabels.map((r, i) => [r, ...values[i]])));
  }

  function taskNames(report) {
    return (report.models || []).map((m) => m.name);
  }

  function lossCurve(report) {
    if (Array.isArray(report.loss_curve)) return report.loss_curve;
    for (const v of Object.values(report)) {
      if (v && typeof v === "object" && Array.isArray(v.loss_curve)) return v.loss_curve;
    }
    return null;
  }

  // every chart the report has data for, in a fixed order
  function render(report, container) {
    const tensors = Object.entries(report.tensors || {});
    const tasks = taskNames(report);
    const out = [];

    const interference = tensors.filter(([, t]) => typeof t.interference === "number");
    if (interference.length) {
      out.push(barChart("interference", "TSV interference per layer",
                        interference.map(([n]) => n), interference.map(([, t]) => t.interference),
                        "interference (L1)", "matrix (report order)"));
    }

    const spectra = tensors.filter(([, t]) => Array.isArray(t.singular_values) &&
                                               t.singular_values.some((sv) => sv.length));
    if (spectra.length) {
      const id = `layer-${++uid}`;
      const select = MS.el("select", { id });
      spectra.forEach(([n], i) => select.append(MS.el("option", { value: String(i) }, n)));
      const picker = MS.el("div", { class: "field" }, MS.el("label", { for: id }, "Layer"), select);
      const draw = () => {
        const [name, info] = spectra[Number(select.value)];
        const series = info.singular_values.map((values, k) => ({ name: tasks[k] || `task ${k}`, values }));
        return lineChart("spectra", `Singular values of ${shortName(name)}`, series,
                         "singular value (log)", "index", true, picker);
      };
      let fig = draw();
      select.addEventListener("change", () => {
        const next = draw();
        fig.replaceWith(next);
        fig = next;
        select.focus();
      });
      out.push(fig);
    }

    const recovery = report.recovery && report.recovery.relative_error;
    if (recovery && Object.keys(recovery).length) {
      out.push(barChart("recovery", "RMM recovery error per task", Object.keys(recovery),
                        Object.values(recovery), "relative error", "task"));
    }

    // a list in task order (tsv, tsv_compress) or {task: rank} (adarank)
    const ranks = tensors.filter(([, t]) => t.kept_rank && typeof t.kept_rank === "object");
    if (ranks.length) {
      const first = ranks[0][1].kept_rank;
      const columns = Array.isArray(first) ? first.map((_, k) => tasks[k] || `task ${k}`) : Object.keys(first);
      const row = (kr) => (Array.isArray(kr) ? kr : columns.map((c) => kr[c] ?? 0));
      out.push(heatmap("kept-rank", "Kept rank per layer and task", ranks.map(([n]) => shortName(n)),
                       columns, ranks.map(([, t]) => row(t.kept_rank))));
    }

    const loss = lossCurve(report);
    if (loss && loss.length) {
      out.push(lineChart("loss", "Loss curve", [{ name: "loss", values: loss }], "loss", "step", false));
    }

    container.replaceChildren(...out);
    if (!out.length) container.append(MS.el("p", { class: "muted" }, "This method's report has no per-layer data to chart."));
    return out.length;
  }

  return { render, shortName, cellColours, contrast };
})();
