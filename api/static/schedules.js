// Scheduled merges: the list (GET /v1/schedules, refreshed every 5 s), pause / resume / run
// now / delete per schedule, the run history of one (GET /v1/schedules/{id}/runs), and a form
// for POST /v1/schedules whose problems (422) are listed under it.
"use strict";

(() => {
  const { api, el } = MS;
  const $ = (x) => document.getElementById(x);
  const POLL_MS = 5000;
  let selected = null;  // the schedule whose history is shown
  let timer = null;

  function when(s) {
    return s.cron ? `cron ${s.cron}` : `every ${s.every_seconds} s`;
  }

  function collection(c) {
    if (c.directory) return ["directory", c.directory];
    if (c.hub_collection) return ["Hub collection", c.hub_collection];
    return ["sources", (c.sources || []).join(", ")];
  }

  function jobLink(id, status) {
    if (!id) return "";
    return el("span", {}, el("a", { href: `/jobs/${id}` }, el("code", {}, id)),
              status ? " " : "", status ? el("span", { class: `badge ${status}` }, status) : "");
  }

  function outcome(run) {
    const text = [el("span", { class: `badge ${run.status === "submitted" ? "running" : run.status === "failed" ? "failed" : "cancelled"}` }, run.status)];
    if (run.reason) text.push(" ", run.reason);
    for (const p of run.problems || []) text.push(el("div", { class: "sub" }, [p.field, p.model].filter(Boolean).join(" / "), p.field || p.model ? ": " : "", p.message));
    return text;
  }

  async function action(s, verb, label, opts) {
    let answer;
    try {
      answer = await api(`/v1/schedules/${s.id}${verb}`, opts || { method: "POST" });
    } catch (e) {
      MS.notice(`${label} failed: ${MS.errorText(e)}`);
      return;
    }
    if (verb === "" && selected === s.id) { selected = null; $("history").hidden = true; }
    await refresh();
    if (verb !== "" && selected !== s.id) await showHistory(s);
    $("schedules-status").textContent = verb === "/run"
      ? `${s.name}: run ${answer.status}${answer.reason ? ` (${answer.reason})` : ""}${answer.job_id ? `, job ${answer.job_id}` : ""}.`
      : `${s.name}: ${label}.`;
  }

  function row(s) {
    const [kind, value] = collection(s.collection);
    const last = s.last_run;
    const buttons = el("div", { class: "row-actions" });
    const add = (label, fn, extra) => {
      const b = el("button", Object.assign({ type: "button", class: "secondary", "aria-label": `${label} ${s.name}` }, extra || {}), label);
      b.addEventListener("click", fn);
      buttons.append(b);
    };
    if (s.paused) add("Resume", () => action(s, "/resume", "resumed"));
    else add("Pause", () => action(s, "/pause", "paused"));
    add("Run now", () => action(s, "/run", "run now"));
    add("History", () => showHistory(s));
    add("Delete", () => {
      if (window.confirm(`Delete schedule ${s.name} and its run history?`)) action(s, "", "deleted", { method: "DELETE" });
    });
    const tr = el("tr", { "data-id": s.id, "data-paused": s.paused ? "true" : "false", class: selected === s.id ? "selected" : null },
      el("td", {}, el("strong", {}, s.name), el("div", { class: "sub" }, el("code", {}, s.id)),
         s.paused ? el("span", { class: "badge cancelled" }, "paused") : el("span", { class: "badge succeeded" }, "active")),
      el("td", {}, when(s)),
      el("td", {}, el("div", { class: "sub" }, kind), el("code", {}, value)),
      el("td", {}, s.template.method.name, el("div", { class: "sub" }, `→ ${s.destination}`)),
      el("td", { class: "last-run" }, ...(last ? [el("div", {}, ...outcome(last)), el("div", { class: "sub" }, MS.when(last.started_at)),
                                                  jobLink(last.job_id, last.job_status)] : ["never run"])),
      el("td", {}, buttons));
    return tr;
  }

  let generation = 0;  // only the latest refresh renders (a slow poll must not undo an action)

  async function refresh() {
    const mine = ++generation;
    try {
      const list = await api("/v1/schedules");
      if (mine !== generation) return;
      const focused = document.activeElement && document.activeElement.getAttribute("aria-label");
      $("schedules").tBodies[0].replaceChildren(...list.schedules.map(row));
      if (focused) {
        const again = [...document.querySelectorAll("#schedules button")].find((b) => b.getAttribute("aria-label") === focused);
        if (again) again.focus();
      }
      if (!list.schedules.length) $("schedules-status").textContent = "No schedules yet.";
      if (selected) {
        const s = list.schedules.find((x) => x.id === selected);
        if (s) await loadRuns(s); else { selected = null; $("history").hidden = true; }
      }
    } catch (e) {
      if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`Cannot list schedules: ${MS.errorText(e)}`);
    }
  }

  async function loadRuns(s) {
    const answer = await api(`/v1/schedules/${s.id}/runs?limit=50`);
    $("history-name").textContent = s.name;
    $("runs").tBodies[0].replaceChildren(...answer.runs.map((r) => el("tr", { "data-id": r.id, "data-status": r.status },
      el("td", {}, MS.when(r.started_at)),
      el("td", {}, r.trigger),
      el("td", {}, ...outcome(r)),
      el("td", {}, r.merged.length ? r.merged.join(", ") : "",
         r.base && r.base !== s.base ? el("div", { class: "sub" }, `base: ${r.base}`) : "",
         r.left_out.length ? el("div", { class: "sub" }, `left out: ${r.left_out.map((l) => `${l.name || l.origin} (${l.reason})`).join("; ")}`) : ""),
      el("td", {}, jobLink(r.job_id, r.job_status) || "—"))));
    if (!answer.runs.length) $("runs").tBodies[0].append(el("tr", {}, el("td", { colspan: "5" }, "No runs yet.")));
  }

  async function showHistory(s) {
    selected = s.id;
    $("history").hidden = false;
    for (const tr of $("schedules").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === s.id);
    try { await loadRuns(s); } catch (e) { MS.notice(`Cannot load the runs: ${MS.errorText(e)}`); }
  }

  function body() {
    const kind = $("s-collection-kind").value;
    const value = $("s-collection").value.trim();
    const coll = {};
    coll[kind] = kind === "sources" ? value.split(/\s*\n\s*|\s*,\s*/).filter(Boolean) : value;
    let params;
    try { params = JSON.parse($("s-params").value || "{}"); } catch (e) { throw new Error(`Method parameters are not JSON: ${e.message}`); }
    const b = {
      name: $("s-name").value.trim(), base: $("s-base").value.trim(), collection: coll,
      template: { method: { name: $("s-method").value, params },
                  output: { format: $("s-format").value }, options: { device: $("s-device").value } },
      destination: $("s-destination").value.trim(), paused: $("s-paused").checked,
    };
    if ($("s-when-kind").value === "cron") b.cron = $("s-when").value.trim();
    else b.every_seconds = Number($("s-when").value);
    return b;
  }

  async function create(ev) {
    ev.preventDefault();
    const out = $("create-result");
    let payload;
    try { payload = body(); } catch (e) { out.replaceChildren(el("p", { class: "problems" }, e.message)); return; }
    try {
      const s = await api("/v1/schedules", { method: "POST", json: payload });
      out.replaceChildren(el("p", { class: "ok" }, `Schedule ${s.name} created (${s.id}).`));
      await refresh();
    } catch (e) {
      const list = el("ul", { class: "problems", id: "create-problems" },
        ...(e.problems || []).map((p) => el("li", {}, p.field ? el("code", {}, p.field) : "", p.field ? ": " : "", p.message)));
      out.replaceChildren(el("p", {}, `Not created: ${MS.errorText(e)}`), list);
    }
  }

  function labels() {
    const cron = $("s-when-kind").value === "cron";
    $("s-when-label").textContent = cron ? "Cron ([second] minute hour day month weekday)" : "Every (seconds)";
    $("s-when").type = cron ? "text" : "number";
    if (!cron && !/^\d+$/.test($("s-when").value)) $("s-when").value = "86400";
    if (cron && /^\d+$/.test($("s-when").value)) $("s-when").value = "0 2 * * *";
    $("s-collection-label").textContent = {
      directory: "Directory (absolute)", hub_collection: "Hub collection slug (namespace/title-<24 hex>)",
      sources: "Sources (one per line: org/name[@revision] or absolute directory)" }[$("s-collection-kind").value];
  }

  async function load() {
    try {
      const methods = await api("/v1/methods");
      $("s-method").replaceChildren(...methods.map((m) => el("option", { value: m.name }, m.name)));
      $("s-method").value = "task_arithmetic";
    } catch (e) { return; }
    await refresh();
    clearTimeout(timer);
    const tick = async () => { if (!document.hidden) await refresh(); timer = setTimeout(tick, POLL_MS); };
    timer = setTimeout(tick, POLL_MS);
  }

  $("create").addEventListener("submit", create);
  $("s-when-kind").addEventListener("change", labels);
  $("s-collection-kind").addEventListener("change", labels);
  document.addEventListener("ms:key", load);
  document.addEventListener("DOMContentLoaded", () => {
    if (MS.authRequired && !MS.key()) { $("schedules-status").textContent = "Enter an API key to see the schedules."; return; }
    load();
  });
})();
