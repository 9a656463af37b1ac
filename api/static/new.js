// The spec editor: "Check" sends the text to POST /v1/jobs:validate (the server parses the
// YAML and runs the preflight of POST /v1/jobs, queueing nothing) and lists every problem
// with its line; "Submit" checks, then posts the parsed spec (JSON) to POST /v1/jobs.
"use strict";

(() => {
  const { api, el } = MS;
  const $ = (x) => document.getElementById(x);
  const text = $("spec-text");
  const result = $("check-result");
  let methods = [];

  const EXAMPLE = `name: my-merge
base: ./models/base                  # Hub id[@revision] or a directory on the workers
models:
  - source: ./models/task-a
  - source: ./models/task-b
    weight: 1.0
method:
  name: tsv
  params:
    alpha: 1.0
output:
  destination: ./out/my-merge        # or hub://org/name
  dtype: float32
options:
  device: auto
  seed: 0
`;

  // the text the shown check is about: an edit since makes its verdict (valid, or these
  // problems) stale, and the panel says so until the next check
  let checked = null;
  function markStale() {
    const stale = checked !== null && text.value !== checked;
    const note = $("check-stale");
    if (stale && !note) result.prepend(el("p", { class: "muted", id: "check-stale" }, "The spec has changed since this check."));
    else if (!stale && note) note.remove();
  }

  async function check() {
    result.replaceChildren(el("p", { class: "muted" }, "Checking…"));
    checked = null;
    const sent = text.value;
    let answer;
    try {
      answer = await api("/v1/jobs:validate", {
        method: "POST", body: sent, headers: { "Content-Type": "application/yaml" } });
    } catch (e) {
      showProblems(`The check failed: ${MS.errorText(e)}`, e.problems || []);
      return null;
    }
    checked = sent;
    if (answer.valid) {
      text.removeAttribute("aria-invalid");
      const r = answer.resolved;
      result.replaceChildren(
        el("p", { class: "ok", id: "check-ok" }, "The spec is valid."),
        el("dl", { class: "facts" },
           el("dt", {}, "Base"), el("dd", {}, el("code", {}, r.base)),
           el("dt", {}, "Models"), el("dd", {}, ...r.models.map((m) => el("div", {}, el("code", {}, m.source)))),
           el("dt", {}, "Method"), el("dd", {}, r.method.name),
           el("dt", {}, "Destination"), el("dd", {}, el("code", {}, r.output.destination || "")),
        ));
    } else {
      showProblems(`${answer.problems.length} problem(s):`, answer.problems);
    }
    markStale();  // edited while the check was under way
    return answer;
  }

  // the spec is invalid when problems are listed; a refused key or a server error says
  // nothing about it
  function showProblems(title, problems) {
    if (problems.length) text.setAttribute("aria-invalid", "true");
    else text.removeAttribute("aria-invalid");
    const list = el("ul", { class: "problems", id: "problems" });
    for (const p of problems) {
      const where = [p.field, p.model, p.tensor].filter(Boolean).join(" / ");
      const item = el("li", {});
      if (p.line) {
        const go = el("button", { type: "button", class: "line", "aria-label": `go to line ${p.line}` }, `line ${p.line}`);
        go.addEventListener("click", () => goToLine(p.line));
        item.append(go);
      }
      if (where) item.append(el("code", {}, where), ": ");
      item.append(p.message);
      list.append(item);
    }
    result.replaceChildren(el("p", { class: "problems-title" }, title), list);
  }

  function goToLine(line) {
    const lines = text.value.split("\n");
    const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    text.focus();
    text.setSelectionRange(start, start + (lines[line - 1] || "").length);
    const lineHeight = text.scrollHeight / Math.max(1, lines.length);
    text.scrollTop = Math.max(0, (line - 3) * lineHeight);
  }

  // One submission at a time: a double click (or Enter pressed twice) while the first is
  // being checked and posted would queue the merge twice. The button stays focusable
  // (aria-disabled, not disabled) so that the keyboard focus is not lost meanwhile; after a
  // submission it stays so until the job's page has replaced this one.
  let submitting = false;
  async function submit(ev) {
    ev.preventDefault();
    if (submitting) return;
    submitting = true;
    $("submit").setAttribute("aria-disabled", "true");
    const answer = await check();
    if (answer && answer.valid) {
      const headers = {};
      const key = $("idempotency").value.trim();
      if (key) headers["Idempotency-Key"] = key;
      try {
        const job = await api("/v1/jobs", { method: "POST", json: answer.spec, headers });
        window.location.assign(`/jobs/${job.id}`);
        return;
      } catch (e) {
        showProblems(`Not submitted: ${MS.errorText(e)}`, e.problems || []);
      }
    } else {
      $("check-h").scrollIntoView();
    }
    submitting = false;
    $("submit").removeAttribute("aria-disabled");
  }
  // back to this page from the job's, out of the browser's page cache: ready to submit again
  window.addEventListener("pageshow", (ev) => {
    if (ev.persisted) { submitting = false; $("submit").removeAttribute("aria-disabled"); }
  });

  function describeMethod() {
    const m = methods.find((x) => x.name === $("method-select").value);
    const box = $("method-info");
    if (!m) { box.replaceChildren(); return; }
    const params = el("dl", { class: "params" });
    for (const [name, p] of Object.entries(m.params)) {
      const bounds = ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"]
        .filter((b) => p[b] !== undefined).map((b) => `${b} ${p[b]}`);
      const type = typeof p.type === "string" ? p.type : JSON.stringify(p.type);
      params.append(el("dt", {}, name),
                    el("dd", {}, p.default === undefined ? `${type}, required (no default)` : `${type}, default ${JSON.stringify(p.default)}`,
                       bounds.length ? ` (${bounds.join(", ")})` : "",
                       p.enum ? `; one of ${p.enum.join(", ")}` : "",
                       p.description ? el("div", { class: "muted" }, p.description) : null));
    }
    box.replaceChildren(el("p", {}, m.summary),
                        el("p", {}, "Output formats: ", m.output_formats.join(", ")),
                        el("p", {}, "Spaces for LoRA inputs: ", m.spaces.join(", "),
                           m.weights ? "" : "; takes no per-model weights"),
                        Object.keys(m.params).length ? params : el("p", { class: "muted" }, "No parameters."));
  }

  // A spec as block YAML, for "Edit as new merge" (a job's spec is JSON; the editor, its
  // line numbers and "Use this method" work on YAML). Plain scalars only where YAML 1.1 (the
  // server's PyYAML) reads them back as the same string; everything else JSON-quoted, which is
  // valid YAML.
  const YAML_WORDS = /^(?:y|n|yes|no|on|off|true|false|null|~)$/i;
  function yamlString(v) {
    return /^(?:[A-Za-z_/]|\.{1,2}\/)[\w./@+-]*$/.test(v) && !YAML_WORDS.test(v) ? v : JSON.stringify(v);
  }
  function yamlScalar(v) {
    if (typeof v === "string") return yamlString(v);
    if (typeof v === "number") {
      const t = String(v);  // YAML 1.1 wants a point in a float with an exponent: 1e-7 -> 1.0e-7
      return /e/.test(t) && !/\./.test(t) ? t.replace("e", ".0e") : t;
    }
    if (Array.isArray(v)) return "[]";
    if (v && typeof v === "object") return "{}";
    return JSON.stringify(v);  // true, false, null
  }
  const nested = (v) => v !== null && typeof v === "object" && Object.keys(v).length > 0;
  function yamlLines(value, indent) {
    const pad = " ".repeat(indent);
    const out = [];
    if (Array.isArray(value)) {
      for (const item of value) {
        if (!nested(item)) { out.push(`${pad}- ${yamlScalar(item)}`); continue; }
        const inner = yamlLines(item, indent + 2);
        out.push(`${pad}- ${inner[0].slice(indent + 2)}`, ...inner.slice(1));
      }
      return out;
    }
    for (const [k, v] of Object.entries(value)) {
      const key = /^[A-Za-z_][\w.-]*$/.test(k) && !YAML_WORDS.test(k) ? k : JSON.stringify(k);
      if (nested(v)) out.push(`${pad}${key}:`, ...yamlLines(v, indent + 2));
      else out.push(`${pad}${key}: ${yamlScalar(v)}`);
    }
    return out;
  }
  function toYaml(value) { return `${yamlLines(value, 0).join("\n")}\n`; }

  // the spec text as a JSON object, when it is one (null for YAML)
  function asJson(value) {
    if (!/^\s*\{/.test(value)) return null;
    try {
      const parsed = JSON.parse(value);
      return parsed && typeof parsed === "object" && !Array.isArray(parsed) ? parsed : null;
    } catch (e) { return null; }
  }

  // Put the chosen method and its defaults into the spec: in a JSON spec, its `method`
  // object; in YAML, the top-level `method:` block (up to the next top-level key). A parameter
  // without a default is left for the author: a comment in YAML, a note under the editor.
  function useMethod() {
    const m = methods.find((x) => x.name === $("method-select").value);
    if (!m) return;
    const params = Object.entries(m.params);
    const given = params.filter(([, p]) => p.default !== undefined);
    const required = params.filter(([, p]) => p.default === undefined).map(([k]) => k);
    const json = asJson(text.value);
    if (json) {
      json.method = { name: m.name, params: Object.fromEntries(given.map(([k, p]) => [k, p.default])) };
      text.value = `${JSON.stringify(json, null, 2)}\n`;
      done(m, required);
      return;
    }
    const typeOf = (p) => (typeof p.type === "string" ? p.type : JSON.stringify(p.type || "a value"));
    const block = [`method:`, `  name: ${m.name}`, given.length ? `  params:` : `  params: {}`,
                   ...given.map(([k, p]) => `    ${k}: ${typeof p.default === "number" ? yamlScalar(p.default) : JSON.stringify(p.default)}`),
                   ...params.filter(([, p]) => p.default === undefined)
                     .map(([k, p]) => `    # ${k}: <${typeOf(p)}>  (no default: required)`)].join("\n");
    const lines = text.value.split("\n");
    const start = lines.findIndex((l) => /^method\s*:/.test(l));
    if (start < 0) {
      text.value = `${text.value.replace(/\s*$/, "\n")}${block}\n`;
    } else {
      let end = start + 1;
      while (end < lines.length && (/^\s/.test(lines[end]) || lines[end] === "")) end++;
      lines.splice(start, end - start, block);
      text.value = lines.join("\n");
    }
    done(m, required);
  }

  function done(m, required) {
    const note = required.length
      ? ` ${required.join(", ")} ${required.length > 1 ? "have" : "has"} no default: add ${required.length > 1 ? "them" : "it"} under method.params.`
      : "";
    checked = null;
    result.replaceChildren(el("p", { class: "muted", id: "method-note" }, `Method set to ${m.name}. Not checked yet.${note}`));
    text.focus();
  }

  async function load() {
    try {
      methods = await api("/v1/methods");
    } catch (e) {
      if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`Cannot load the method catalog: ${MS.errorText(e)}`);
      return;
    }
    $("method-select").replaceChildren(...methods.map((m) => el("option", { value: m.name }, m.name)));
    const from = new URLSearchParams(window.location.search).get("from");
    if (from && /^[0-9a-f]{20}$/.test(from)) {
      try {
        const job = await api(`/v1/jobs/${from}`);
        text.value = toYaml(job.spec);
      } catch (e) {
        MS.notice(`Cannot load job ${from}: ${MS.errorText(e)}`);
      }
    }
    // the catalog opens on the spec's method (block `method:\n  name: x`, flow or JSON forms)
    const named = /(?:^|\n)\s*"?method"?\s*:\s*\{?\s*\n?\s*"?name"?\s*:\s*"?([\w-]+)/.exec(text.value);
    if (named && methods.some((m) => m.name === named[1])) $("method-select").value = named[1];
    describeMethod();
  }

  $("check").addEventListener("click", check);
  text.addEventListener("input", markStale);
  $("spec-form").addEventListener("submit", submit);
  $("method-select").addEventListener("change", describeMethod);
  $("use-method").addEventListener("click", useMethod);
  document.addEventListener("ms:key", load);
  document.addEventListener("DOMContentLoaded", () => {
    if (!text.value.trim()) text.value = EXAMPLE;
    if (MS.authRequired && !MS.key()) return;
    load();
  });
})();
