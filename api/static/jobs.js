// The jobs page, a live list. The first page of GET /v1/jobs (with the filters) is read once;
// from then on GET /v1/events (Server-Sent Events of every job) updates the rows in place
// (status, progress bar, duration) and brings in new jobs that match the filters. After a
// drop the stream resumes with Last-Event-ID (the page says "Reconnecting…" meanwhile) and the
// list is read again once; a full read every REFRESH_MS is only a fallback. "Load more" appends
// older pages; every loaded row is kept and rows are merged by job id, so a new job never
// pushes a loaded one off the page. Only status changes are announced, not progress.
"use strict";

(() => {
  const { api, el } = MS;
  const PAGE = "25";
  const REFRESH_MS = 60000;
  const tbody = document.querySelector("#jobs tbody");
  const summary = document.getElementById("jobs-status");
  const announcer = document.getElementById("jobs-announce");
  const streamState = document.getElementById("stream-state");
  const more = document.getElementById("more");
  const live = document.getElementById("live");
  const form = document.getElementById("filters");
  const jobs = new Map();      // every loaded job by id, as GET /v1/jobs returns it
  const reads = new Set();     // one set per list read under way: ids the stream changed since
  const adopting = new Map();  // ids of new jobs being read -> a state event came meanwhile
  let filters = { status: "", name: "" };  // as applied
  let cursor = null;    // next_cursor after the oldest loaded page (null: every job is loaded)
  let loaded = false;   // the first page for these filters has been read
  let generation = 0;   // bumped by Apply: answers for other filters are dropped
  let stream = null;    // AbortController of the stream
  let lastEventId = null;
  let loadingMore = false;

  function query(extra) {
    const params = new URLSearchParams();
    if (filters.status) params.set("status", filters.status);
    if (filters.name) params.set("name", filters.name);
    params.set("limit", PAGE);
    for (const [k, v] of Object.entries(extra || {})) params.set(k, v);
    return `/v1/jobs?${params}`;
  }

  function matches(job) {
    return (!filters.status || job.status === filters.status)
      && (!filters.name || job.name === filters.name);
  }

  // ids sort by creation time: an id below the cursor belongs to a page not loaded yet
  function inRange(id) { return cursor === null || id >= cursor; }

  function inputs(spec) {
    const models = (spec && spec.models) || [];
    const names = models.map((m) => m.name || m.source.split("@")[0].split("/").pop());
    return `${models.length}: ${names.join(", ")}`;
  }

  function row(job) {
    const spec = job.spec || {};
    return el("tr", { "data-id": job.id },
      el("td", {}, el("a", { href: `/jobs/${job.id}` }, job.name || "(unnamed)"),
         el("div", { class: "sub" }, el("code", {}, job.id))),
      el("td", {}, el("span", { class: "badge" })),
      el("td", {}, (spec.method && spec.method.name) || ""),
      el("td", { class: "inputs" }, inputs(spec)),
      el("td", { class: "progress" },
         el("progress", { max: "1", value: "0",
                          "aria-label": `progress of job ${job.name || job.id}` }),
         el("div", { class: "sub" })),
      el("td", { class: "num duration" }),
      el("td", {}, MS.when(job.created_at)));
  }

  // in place, text by text: focus, selection and scroll position stay where they are
  function update(tr, job) {
    if (tr.dataset.status !== job.status) {
      const badge = tr.querySelector(".badge");
      badge.className = `badge ${job.status}`;
      badge.textContent = job.status;
      tr.dataset.status = job.status;
    }
    const bar = tr.querySelector("progress");
    const frac = MS.fraction(job);
    if (bar.value !== frac) bar.value = frac;
    setText(tr.querySelector("td.progress .sub"), MS.progressText(job.progress));
    tick(tr, job);
  }

  function tick(tr, job) {
    setText(tr.querySelector("td.duration"),
            MS.duration(MS.parseTime(job.started_at), MS.parseTime(job.finished_at)));
  }

  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

  function shown() {
    return [...jobs.values()].filter(matches).sort((a, b) => (a.id < b.id ? 1 : -1));
  }

  function render() {
    const list = shown();
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.id, r]));
    list.forEach((job, i) => {
      const tr = rows.get(job.id) || row(job);
      update(tr, job);
      // rows only ever come and go: the ones there keep their order and are not moved
      if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
      rows.delete(job.id);
    });
    for (const stale of rows.values()) stale.remove();
    more.hidden = cursor === null;
    count(list);
  }

  function count(list) {
    const active = list.filter((j) => !MS.TERMINAL.has(j.status)).length;
    setText(summary, list.length ? `${list.length} job(s) shown, ${active} active.`
                                 : "No jobs match.");
  }

  // one job changed: its row alone, unless it comes into or goes out of the list
  function show(job) {
    const tr = tbody.querySelector(`tr[data-id="${job.id}"]`);
    if (tr && matches(job)) {
      update(tr, job);
      count(shown());
    } else if (tr || matches(job)) {
      render();
    }
  }

  function announce(text) { announcer.textContent = text; }

  function failed(e) {
    if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`Cannot list jobs: ${MS.errorText(e)}`);
  }

  // the first page again: rows the stream changed meanwhile keep what it said
  async function refresh() {
    const gen = generation;
    const changed = new Set();
    reads.add(changed);
    try {
      const page = await api(query());
      if (gen !== generation) return;
      const ids = new Set(page.jobs.map((j) => j.id));
      const boundary = page.next_cursor;  // the page covers the ids from it up (all if null)
      for (const id of [...jobs.keys()]) {
        if (!ids.has(id) && !changed.has(id) && (boundary === null || id >= boundary)) jobs.delete(id);
      }
      for (const job of page.jobs) if (!changed.has(job.id) || !jobs.has(job.id)) jobs.set(job.id, job);
      if (!loaded || boundary === null) cursor = boundary;
      loaded = true;
      MS.notice("");
      render();
    } catch (e) {
      failed(e);
    } finally {
      reads.delete(changed);
    }
  }

  // a job the stream names that this page does not have: read it; insert it if it belongs
  async function adopt(id) {
    const gen = generation;
    adopting.set(id, false);
    try {
      let job;
      do {
        adopting.set(id, false);
        job = await api(`/v1/jobs/${id}`);
        if (gen !== generation) return;
      } while (adopting.get(id));  // its state changed while it was read: read it again
      if (jobs.has(id)) return;  // a list read brought it meanwhile
      jobs.set(id, job);
      if (matches(job)) {
        announce(`New job ${job.name || job.id}: ${job.status}.`);
        render();
      }
    } catch (e) {
      // gone or refused: the next list read settles it
    } finally {
      if (gen === generation) adopting.delete(id);
    }
  }

  function onEvent(type, data) {
    if (type === "reset") { refresh(); return; }  // events were missed: the list afresh
    const id = data.job_id;
    for (const changed of reads) changed.add(id);
    const job = jobs.get(id);
    if (!job) {
      if (adopting.has(id)) {
        if (type === "state") adopting.set(id, true);
      } else if (type === "state" && inRange(id)
                 && (!filters.status || data.status === filters.status)) {
        adopt(id);
      }
      return;
    }
    if (type === "progress") {
      const { job_id: _, ...progress } = data;
      job.progress = progress;
    } else if (type === "state") {
      const before = job.status;
      for (const k of ["status", "started_at", "finished_at", "worker", "result", "error"]) {
        if (k in data) job[k] = data[k];
      }
      if (job.status === "queued") job.progress = { stage: null, done: 0, total: 0, current: null };
      if (before !== job.status && (matches(job) || filters.status === before)) {
        announce(`Job ${job.name || job.id}: ${job.status}.`);
      }
    }
    show(job);
  }

  // --- the stream: Server-Sent Events over fetch (EventSource cannot send Authorization) ---

  function setStreamState(state) {
    const looks = { live: ["Live", "succeeded"], reconnecting: ["Reconnecting…", "queued"],
                    off: ["Paused", "cancelled"] }[state];
    if (streamState.dataset.state === state) return;
    streamState.dataset.state = state;
    streamState.className = `badge ${looks[1]}`;
    streamState.textContent = looks[0];
  }

  function startStream() {
    stopStream();
    if (!live.checked) { setStreamState("off"); return; }
    stream = new AbortController();
    follow(stream.signal);
  }

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  function wait(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  async function follow(signal) {
    let delay = 500;
    while (!signal.aborted) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (MS.key()) headers.Authorization = `Bearer ${MS.key()}`;
        if (lastEventId) headers["Last-Event-ID"] = lastEventId;
        const response = await fetch("/v1/events", { headers, signal });
        if (response.status === 401 || response.status === 403) {
          setStreamState("off");
          await refresh();  // asks for a key; `ms:key` starts the stream again
          return;
        }
        if (!response.ok) throw new MS.ApiError(response.status, null);
        setStreamState("live");
        delay = 500;
        // the stream's start was fixed before its headers came: a list read now misses nothing
        refresh();
        await read(response);
      } catch (e) {
        if (signal.aborted) return;
      }
      if (signal.aborted) return;
      setStreamState("reconnecting");
      if (!loaded) refresh();  // no stream yet: the list at least
      await wait(delay, signal);
      delay = Math.min(delay * 2, 8000);
    }
  }

  function read(response) {
    return MS.readEventStream(response, (ev) => {
      if (ev.id) lastEventId = ev.id;
      onEvent(ev.type, ev.data);
    });
  }

  // --- controls ---

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    generation++;
    filters = { status: document.getElementById("filter-status").value,
                name: document.getElementById("filter-name").value.trim() };
    jobs.clear();
    adopting.clear();
    cursor = null;
    loaded = false;
    tbody.replaceChildren();
    await refresh();
  });
  more.addEventListener("click", async () => {
    if (cursor === null || loadingMore) return;
    const gen = generation;
    loadingMore = true;
    try {
      const page = await api(query({ cursor }));
      if (gen !== generation) return;
      for (const job of page.jobs) if (!jobs.has(job.id)) jobs.set(job.id, job);
      cursor = page.next_cursor;
      const focused = document.activeElement === more;
      render();
      // the last page hid the button that had the focus: the first job it brought takes it
      const first = page.jobs.find((j) => matches(j));
      if (focused && more.hidden && first) {
        tbody.querySelector(`tr[data-id="${first.id}"] a`).focus();
      }
    } catch (e) {
      failed(e);
    } finally {
      loadingMore = false;
    }
  });
  live.addEventListener("change", () => { if (live.checked) startStream(); else { stopStream(); setStreamState("off"); } });
  document.addEventListener("ms:key", startStream);
  document.addEventListener("ms:key-refused", () => { stopStream(); setStreamState("off"); });
  // the fallback: a full read now and then, in case the stream missed something
  setInterval(() => { if (stream && !document.hidden) refresh(); }, REFRESH_MS);
  // durations of running jobs move on between events
  setInterval(() => {
    if (document.hidden) return;
    for (const tr of tbody.rows) {
      const job = jobs.get(tr.dataset.id);
      if (job && job.started_at && !job.finished_at) tick(tr, job);
    }
  }, 1000);
  document.addEventListener("DOMContentLoaded", () => {
    setStreamState("off");
    if (MS.authRequired && !MS.key()) {
      summary.textContent = "Enter an API key to see the jobs.";
      return;
    }
    startStream();
  });
})();
