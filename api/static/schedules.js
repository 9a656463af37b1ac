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

  // the latest record of each schedule; the buttons act on it, not on the one they were made for
  const schedules = new Map();

  async function action(id, verb, label, opts) {
    const s = schedules.get(id);
    if (!s) return;
    let answer;
    try {
      answer = await api(`/v1/schedules/${s.id}${verb}`, opts || { method: "POST" });
    } catch (e) {
      if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`${label} failed: ${MS.errorText(e)}`);
      return;
    }
    if (verb === "" && selected === s.id) { selected = null; $("history").hidden = true; }
    if (verb === "") focusAfterDelete(s.id);
    await refresh();
    if (verb !== "" && selected !== s.id) await showHistory(schedules.get(s.id) || s);
    $("schedules-status").textContent = verb === "/run"
      ? `${s.name}: run ${answer.status}${answer.reason ? ` (${answer.reason})` : ""}${answer.job_id ? `, job ${answer.job_id}` : ""}.`
      : `${s.name}: ${label}.`;
  }

  // the row of a deleted schedule goes; its Delete button had the focus: the next row's (or
  // the previous row's) Delete button takes it, else the list's heading
  function focusAfterDelete(id) {
    const tr = rowOf($("schedules"), id);
    if (!tr || !tr.contains(document.activeElement)) return;
    const near = tr.nextElementSibling || tr.previousElementSibling;
    tr.remove();
    const next = near && near.querySelector("[data-role=delete]");
    (next || $("list-h")).focus();
  }

  function rowOf(table, id) {
    return [...table.tBodies[0].rows].find((tr) => tr.dataset.id === id) || null;
  }

  function buttonsFor(id) {
    const buttons = el("div", { class: "row-actions" });
    const add = (role, fn) => {
      const b = el("button", { type: "button", class: "secondary", "data-role": role });
      b.addEventListener("click", fn);
      buttons.append(b);
    };
    add("toggle", () => {
      const s = schedules.get(id);
      if (s) action(id, s.paused ? "/resume" : "/pause", s.paused ? "resumed" : "paused");
    });
    add("run", () => action(id, "/run", "run now"));
    add("history", () => { if (schedules.get(id)) showHistory(schedules.get(id)); });
    add("delete", () => {
      const s = schedules.get(id);
      if (s && window.confirm(`Delete schedule ${s.name} and its run history?`)) action(id, "", "deleted", { method: "DELETE" });
    });
    return buttons;
  }

  // a cell's content is replaced only when what it shows changed, so that a refresh keeps
  // the elements (and the focus on one of them: a job link, a button) as they are
  function fill(td, signature, ...content) {
    if (td.dataset.shows === signature) return;
    td.dataset.shows = signature;
    td.replaceChildren(...content);
  }

  function row(s) {
    let tr = rowOf($("schedules"), s.id);
    if (!tr) {
      tr = el("tr", { "data-id": s.id }, el("td", {}), el("td", {}), el("td", {}), el("td", {}),
              el("td", { class: "last-run" }), el("td", {}, buttonsFor(s.id)));
    }
    const [kind, value] = collection(s.collection);
    const last = s.last_run;
    tr.dataset.paused = s.paused ? "true" : "false";
    tr.classList.toggle("selected", selected === s.id);
    const cells = tr.cells;
    fill(cells[0], JSON.stringify([s.name, s.paused]), el("strong", {}, s.name), el("div", { class: "sub" }, el("code", {}, s.id)),
         s.paused ? el("span", { class: "badge cancelled" }, "paused") : el("span", { class: "badge succeeded" }, "active"));
    fill(cells[1], when(s), when(s));
    fill(cells[2], JSON.stringify([kind, value]), el("div", { class: "sub" }, kind), el("code", {}, value));
    fill(cells[3], JSON.stringify([s.template.method.name, s.destination]), s.template.method.name,
         el("div", { class: "sub" }, `→ ${s.destination}`));
    fill(cells[4], JSON.stringify(last || null), ...(last ? [el("div", {}, ...outcome(last)), el("div", { class: "sub" }, MS.when(last.started_at)),
                                                            jobLink(last.job_id, last.job_status)] : ["never run"]));
    const labels = { toggle: s.paused ? "Resume" : "Pause", run: "Run now", history: "History", delete: "Delete" };
    for (const b of cells[5].querySelectorAll("button")) {
      const label = labels[b.dataset.role];
      if (b.textContent !== label) b.textContent = label;
      if (b.getAttribute("aria-label") !== `${label} ${s.name}`) b.setAttribute("aria-label", `${label} ${s.name}`);
    }
    return tr;
  }

  // put `rows` into `tbody` in this order, moving only what is out of place
  function arrange(tbody, rows) {
    rows.forEach((tr, i) => { if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null); });
    while (tbody.rows.length > rows.length) tbody.rows[rows.length].remove();
  }

  // Taken just before a table is updated (never before an await: focus moved meanwhile is
  // someone's own doing). A focused element that the update moved, or replaced (a job link
  // whose status changed), gets the focus back: itself, or the same control (data-role) or
  // link (href) in the row of the same id.
  function focusMark() {
    const was = document.activeElement;
    const tr = was && was.closest ? was.closest("tr[data-id]") : null;
    if (!tr) return null;
    const href = was.getAttribute("href");
    const selector = was.dataset.role ? `[data-role="${was.dataset.role}"]` : href ? `a[href="${CSS.escape(href)}"]` : null;
    return { was, table: tr.closest("table"), id: tr.dataset.id, selector };
  }

  function restoreFocus(mark) {
    if (!mark || document.activeElement === mark.was) return;
    if (document.activeElement && document.activeElement !== document.body) return;
    let target = mark.was.isConnected ? mark.was : null;
    if (!target && mark.selector) {
      const tr = rowOf(mark.table, mark.id);
      target = tr && tr.querySelector(mark.selector);
    }
    if (target) target.focus({ preventScroll: true });
  }

  let generation = 0;  // only the latest refresh renders (a slow poll must not undo an action)

  async function refresh() {
    const mine = ++generation;
    try {
      const list = await api("/v1/schedules");
      if (mine !== generation) return;
      schedules.clear();
      for (const s of list.schedules) schedules.set(s.id, s);
      const mark = focusMark();
      arrange($("schedules").tBodies[0], list.schedules.map(row));
      restoreFocus(mark);
      if (!list.schedules.length) $("schedules-status").textContent = "No schedules yet.";
      if (selected) {
        const s = schedules.get(selected);
        if (s) await loadRuns(s); else { selected = null; $("history").hidden = true; }
      }
    } catch (e) {
      if (e instanceof MS.ApiError && e.status === 401) stop();
      else MS.notice(`Cannot list schedules: ${MS.errorText(e)}`);
    }
  }

  // collection items a run did not merge, each with why: "left out: qv (fails preflight)"
  function items(label, list) {
    if (!list || !list.length) return "";
    return el("div", { class: "sub" }, `${label}: ${list.map((l) => `${l.name || l.origin} (${l.reason})`).join("; ")}`);
  }

  function runRow(s, r) {
    const signature = JSON.stringify([r, s.base]);
    const old = rowOf($("runs"), r.id);
    if (old && old.dataset.shows === signature) return old;
    return el("tr", { "data-id": r.id, "data-status": r.status, "data-shows": signature },
      el("td", {}, MS.when(r.started_at)),
      el("td", {}, r.trigger),
      el("td", {}, ...outcome(r)),
      el("td", {}, r.merged.length ? r.merged.join(", ") : "",
         r.base && r.base !== s.base ? el("div", { class: "sub" }, `base: ${r.base}`) : "",
         items("left out", r.left_out), items("ignored", r.ignored)),
      el("td", {}, jobLink(r.job_id, r.job_status) || "—"));
  }

  async function loadRuns(s) {
    const answer = await api(`/v1/schedules/${s.id}/runs?limit=50`);
    const mark = focusMark();
    if ($("history-name").textContent !== s.name) $("history-name").textContent = s.name;
    const tbody = $("runs").tBodies[0];
    if (tbody.dataset.schedule !== s.id) { tbody.replaceChildren(); tbody.dataset.schedule = s.id; }
    const rows = answer.runs.map((r) => runRow(s, r));
    if (!rows.length) rows.push(rowOf($("runs"), "none") || el("tr", { "data-id": "none" }, el("td", { colspan: "5" }, "No runs yet.")));
    arrange(tbody, rows);
    restoreFocus(mark);
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
    const secret = $("s-secret").value.trim();
    if (secret) b.hf_token_secret = secret;
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
    // a number field refuses a cron text (a console warning, the value emptied): the value
    // changes while the field's type still accepts it
    if (cron) {
      $("s-when").type = "text";
      if (/^\d+$/.test($("s-when").value)) $("s-when").value = "0 2 * * *";
    } else {
      if (!/^\d+$/.test($("s-when").value)) $("s-when").value = "86400";
      $("s-when").type = "number";
    }
    $("s-collection-label").textContent = {
      directory: "Directory (absolute)", hub_collection: "Hub collection slug (namespace/title-<24 hex>)",
      sources: "Sources (one per line: org/name[@revision] or absolute directory)" }[$("s-collection-kind").value];
  }

  // polling stops when the key is refused (each poll would only be refused again) and starts
  // again with the next key
  let polling = false;
  let chains = 0;
  function stop() {
    polling = false;
    clearTimeout(timer);
    $("schedules-status").textContent = "Enter an API key to see the schedules.";
  }

  async function load() {
    try {
      const methods = await api("/v1/methods");
      $("s-method").replaceChildren(...methods.map((m) => el("option", { value: m.name }, m.name)));
      $("s-method").value = "task_arithmetic";
    } catch (e) {
      if (e instanceof MS.ApiError && e.status === 401) stop();
      return;
    }
    $("schedules-status").textContent = "";
    polling = true;
    clearTimeout(timer);
    await refresh();
    const chain = ++chains;  // a tick still waiting on its refresh belongs to an older chain
    const tick = async () => {
      if (!polling || chain !== chains) return;
      if (!document.hidden) await refresh();
      if (polling && chain === chains) timer = setTimeout(tick, POLL_MS);
    };
    if (polling) timer = setTimeout(tick, POLL_MS);
  }

  $("create").addEventListener("submit", create);
  $("s-when-kind").addEventListener("change", labels);
  $("s-collection-kind").addEventListener("change", labels);
  document.addEventListener("ms:key", load);
  document.addEventListener("ms:key-refused", stop);
  document.addEventListener("DOMContentLoaded", () => {
    if (MS.authRequired && !MS.key()) { $("schedules-status").textContent = "Enter an API key to see the schedules."; return; }
    load();
  });
})();
