// The jobs page: the first page of GET /v1/jobs (with the filters) is polled every 2 s while
// the tab is visible; "Load more" appends older pages (not refreshed: finished jobs rarely
// change). Rows are updated in place, so focus and scroll position survive each refresh.
"use strict";

(() => {
  const { api, el } = MS;
  const POLL_MS = 2000;
  const tbody = document.querySelector("#jobs tbody");
  const status = document.getElementById("jobs-status");
  const more = document.getElementById("more");
  const live = document.getElementById("live");
  const form = document.getElementById("filters");
  let first = [];      // newest page, refreshed
  let older = [];      // pages loaded with "Load more"
  let cursor = null;   // next_cursor after the last loaded page
  let timer = null;
  let inFlight = false;

  function query(extra) {
    const params = new URLSearchParams();
    const s = document.getElementById("filter-status").value;
    const n = document.getElementById("filter-name").value.trim();
    if (s) params.set("status", s);
    if (n) params.set("name", n);
    params.set("limit", "25");
    for (const [k, v] of Object.entries(extra || {})) params.set(k, v);
    return `/v1/jobs?${params}`;
  }

  function inputs(spec) {
    const models = (spec && spec.models) || [];
    const names = models.map((m) => m.name || m.source.split("@")[0].split("/").pop());
    return `${models.length}: ${names.join(", ")}`;
  }

  function cells(job) {
    const spec = job.spec || {};
    const frac = MS.fraction(job);
    const progress = el("progress", { max: "1", value: String(frac),
                                      "aria-label": `progress of job ${job.name || job.id}` });
    const end = MS.parseTime(job.finished_at);
    return [
      el("td", {}, el("a", { href: `/jobs/${job.id}` }, job.name || "(unnamed)"),
         el("div", { class: "sub" }, el("code", {}, job.id))),
      el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)),
      el("td", {}, (spec.method && spec.method.name) || ""),
      el("td", { class: "inputs" }, inputs(spec)),
      el("td", {}, progress, el("div", { class: "sub" }, MS.progressText(job.progress))),
      el("td", { class: "num duration" }, MS.duration(MS.parseTime(job.started_at), end)),
      el("td", {}, MS.when(job.created_at)),
    ];
  }

  function render() {
    const jobs = [...first, ...older.filter((j) => !first.some((f) => f.id === j.id))];
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.id, r]));
    jobs.forEach((job, i) => {
      const key = `${job.status}|${JSON.stringify(job.progress)}|${job.finished_at}`;
      let row = rows.get(job.id);
      if (!row) {
        row = el("tr", { "data-id": job.id });
      }
      if (row.dataset.key !== key || !MS.TERMINAL.has(job.status)) {
        const focused = row.contains(document.activeElement);
        row.replaceChildren(...cells(job));
        row.dataset.key = key;
        row.dataset.status = job.status;
        if (focused) row.querySelector("a").focus();
      }
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
      rows.delete(job.id);
    });
    for (const stale of rows.values()) stale.remove();
    more.hidden = cursor === null;
    const active = jobs.filter((j) => !MS.TERMINAL.has(j.status)).length;
    status.textContent = jobs.length
      ? `${jobs.length} job(s) shown, ${active} active.` : "No jobs match.";
  }

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const page = await api(query());
      first = page.jobs;
      if (!older.length) cursor = page.next_cursor;
      MS.notice("");
      render();
    } catch (e) {
      if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`Cannot list jobs: ${MS.errorText(e)}`);
    } finally {
      inFlight = false;
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (live.checked && !document.hidden) timer = setTimeout(async () => { await refresh(); schedule(); }, POLL_MS);
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    older = [];
    cursor = null;
    tbody.replaceChildren();
    await refresh();
    schedule();
  });
  more.addEventListener("click", async () => {
    if (cursor === null) return;
    try {
      const page = await api(query({ cursor }));
      older = older.concat(page.jobs);
      cursor = page.next_cursor;
      render();
    } catch (e) {
      MS.notice(`Cannot list jobs: ${MS.errorText(e)}`);
    }
  });
  live.addEventListener("change", schedule);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); schedule(); });
  document.addEventListener("ms:key", () => { refresh(); schedule(); });
  document.addEventListener("DOMContentLoaded", () => {
    if (MS.authRequired && !MS.key()) {
      status.textContent = "Enter an API key to see the jobs.";
      return;
    }
    refresh();
    schedule();
  });
})();
