// One job: the record (GET /v1/jobs/{id}), then live through its event stream; the timeline
// is built from the state events (a stream id starts with the event's time in ms); the report
// is fetched and charted once the job has succeeded. The stream starts at the job's first
// event: those the record already holds only fill the timeline (no render, no announcement);
// the page renders at most once per animation frame, however fast events come.
"use strict";

(() => {
  const { api, el } = MS;
  const root = document.getElementById("job");
  const id = root.dataset.jobId;
  let job = null;
  let stream = null;
  let reportShown = false;

  const $ = (x) => document.getElementById(x);

  function facts(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v] of pairs) {
      if (v === null || v === undefined || v === "") continue;
      dl.append(el("dt", {}, k), el("dd", {}, v));
    }
  }

  function render() {
    const spec = job.spec || {};
    $("job-name").textContent = job.name || "(unnamed)";
    const badge = $("job-status");
    badge.textContent = job.status;
    badge.className = `badge ${job.status}`;
    const p = job.progress || {};
    $("job-progress").value = MS.fraction(job);
    $("job-progress").setAttribute("aria-valuetext",
      `${job.status}${p.total ? `, ${p.done} of ${p.total}` : ""}`);
    $("progress-text").textContent = [job.status, MS.progressText(p)].filter(Boolean).join(" · ");
    announce();
    const terminal = MS.TERMINAL.has(job.status);
    // a disabled button drops the keyboard focus to the page: the one who pressed Cancel
    // lands on Retry, the action the ended job now has
    const cancelFocused = document.activeElement === $("cancel");
    $("cancel").disabled = terminal;
    $("retry").disabled = !terminal;
    if (terminal && cancelFocused) $("retry").focus();
    $("edit").href = `/new?from=${job.id}`;
    facts($("job-facts"), [
      ["Method", spec.method && spec.method.name],
      ["Inputs", (spec.models || []).map((m) => m.source).join(", ")],
      ["Base", spec.base],
      ["Created", MS.when(job.created_at)],
      ["Started", MS.when(job.started_at)],
      ["Finished", MS.when(job.finished_at)],
      ["Duration", job.started_at ? el("span", { id: "job-duration" }, duration()) : null],
      ["Worker", job.worker],
      ["Schedule", job.schedule_id],
    ]);
    $("spec").textContent = JSON.stringify(spec, null, 2);

    $("error-section").hidden = !job.error;
    if (job.error) {
      $("error-type").textContent = job.error.type;
      const problems = (job.error.details && job.error.details.problems) || [];
      const where = (pr) => [pr.field, pr.model, pr.tensor].filter(Boolean).join(" / ");
      const text = (pr) => (where(pr) ? `${where(pr)}: ` : "") + pr.message;
      // the message of several problems lists them ("2 problems:" then a line each), and the
      // message of one is that problem: the list below says it once, as a list
      const listed = problems.length === 1 && job.error.message === text(problems[0]) ? [] : problems;
      $("error-message").textContent = listed.length > 1 ? job.error.message.split("\n")[0] : job.error.message;
      $("error-problems").replaceChildren(...listed.map((pr) => el("li", {}, text(pr))));
      $("error-details").textContent = JSON.stringify(job.error.details || {}, null, 2);
    }

    $("result-section").hidden = !job.result;
    if (job.result) {
      const r = job.result;
      const where = r.url ? el("a", { href: r.url, rel: "noopener" }, r.url) : el("code", {}, r.destination);
      facts($("result-facts"), [
        [r.url ? "Hub commit" : "Local path", where],
        r.url ? ["Destination", el("code", {}, r.destination)] : ["", null],
        ["Revision", r.revision && el("code", {}, r.revision)],
      ]);
      $("result-files").replaceChildren(...(r.files || []).map((f) => el("li", {}, el("code", {}, f))));
    }
    if (job.status === "succeeded" && !reportShown) {
      reportShown = true;
      showReport();
    }
  }

  function duration() {
    return MS.duration(MS.parseTime(job.started_at), MS.parseTime(job.finished_at));
  }

  // a job under way: its duration moves on between events (a long tensor, a Hub upload, a
  // quiet stream), as on the jobs page
  setInterval(() => {
    const shown = $("job-duration");
    if (!shown || !job || job.finished_at || document.hidden) return;
    shown.textContent = duration();
  }, 1000);

  // screen readers hear state changes and every tenth of the progress, not every tensor
  let announced = "";
  function announce() {
    const tenth = Math.floor(MS.fraction(job) * 10);
    const key = `${job.status}|${tenth}`;
    if (key === announced) return;
    announced = key;
    $("announce").textContent = MS.TERMINAL.has(job.status) || tenth === 0
      ? `Job ${job.status}.` : `Job ${job.status}, ${tenth * 10}% done.`;
  }

  function addTimeline(eventId, data) {
    const ms = Number(String(eventId).split("-")[0]);
    const item = el("li", { "data-status": data.status },
                    el("span", { class: `badge ${data.status}` }, data.status),
                    el("time", { datetime: new Date(ms).toISOString() }, MS.when(new Date(ms))));
    if (data.reason) item.append(` — ${data.reason}`);
    if (data.worker && data.status === "validating") item.append(` — worker ${data.worker}`);
    $("timeline").append(item);
  }

  async function showReport() {
    try {
      const report = await api(`/v1/jobs/${id}/report`);
      $("report-section").hidden = false;
      const t = report.timings_s || {};
      const mem = report.peak_memory || {};
      facts($("report-facts"), [
        ["Method", `${report.method.name} ${JSON.stringify(report.method.params)}`],
        ["Space", report.space],
        ["Device / precision", `${report.device} / ${report.compute_dtype}`],
        ["Tensors", `${report.summary.merged} merged, ${report.summary.unchanged} unchanged, ${report.summary.copied} copied`],
        ["Output", `${report.output.format}, ${report.output.dtype}, ${(report.output.bytes / 1e6).toFixed(1)} MB`],
        ["Time", t.total_s !== undefined ? `${t.total_s.toFixed(2)} s (merge ${(t.merge_s || 0).toFixed(2)} s)` : ""],
        ["Peak memory", mem.process_peak_rss_bytes ? `${(mem.process_peak_rss_bytes / 2 ** 20).toFixed(0)} MiB RSS` : ""],
      ]);
      Charts.render(report, $("charts"));
      const blob = new Blob([JSON.stringify(report, null, 2)], { type: "application/json" });
      $("report-json").href = URL.createObjectURL(blob);
      $("report-json").download = `merge_report-${id}.json`;
    } catch (e) {
      MS.notice(`Cannot load the report: ${MS.errorText(e)}`);
    }
  }

  // one render per animation frame; a hidden tab gets no frames, so a timer stands in
  let frame = null;
  function renderSoon() {
    if (frame) return;
    const run = () => { cancelAnimationFrame(frame.raf); clearTimeout(frame.timer); frame = null; render(); };
    frame = { raf: requestAnimationFrame(run), timer: setTimeout(run, 250) };
  }

  // what the loaded record shows: replayed events up to it are history, not news
  function progressKey(p) {
    return p && p.stage ? `${p.stage}|${p.done}|${p.total}` : "";
  }

  async function load() {
    try {
      job = await api(`/v1/jobs/${id}`);
    } catch (e) {
      if (!(e instanceof MS.ApiError && e.status === 401)) MS.notice(`Cannot load job ${id}: ${MS.errorText(e)}`);
      return;
    }
    render();
    if (stream) stream.abort();
    stream = new AbortController();
    $("timeline").replaceChildren();
    // Replay ends at the event that brings the stream to the record's status and progress, or,
    // should that never match (a record changed without an event), at the first event that
    // comes later than the backlog (which the server sends at once).
    const loaded = { status: job.status, progress: progressKey(job.progress) };
    const seen = { status: null, progress: "" };
    let replaying = true;
    let firstAt = null;
    try {
      await MS.events(`/v1/jobs/${id}/events`, (ev) => {
        const now = performance.now();
        if (firstAt === null) firstAt = now;
        if (replaying && now - firstAt > 1000) replaying = false;
        if (ev.type === "state") addTimeline(ev.id, ev.data);
        if (replaying) {
          // a worker starting the job sets the record's progress to "resolving" without a
          // progress event (workers/runner.py)
          if (ev.type === "state") {
            seen.status = ev.data.status;
            if (seen.status === "validating") seen.progress = "resolving|0|0";
          } else if (ev.type === "progress") seen.progress = progressKey(ev.data);
          if (seen.status === loaded.status && seen.progress === loaded.progress) replaying = false;
          return;
        }
        if (ev.type === "state") Object.assign(job, ev.data);
        else if (ev.type === "progress") job.progress = ev.data;
        renderSoon();
      }, stream.signal);
    } catch (e) {
      MS.notice(`The event stream failed: ${MS.errorText(e)}`);
    }
  }

  $("cancel").addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${job.name || id}? Running work stops at the next tensor.`)) return;
    try {
      const answer = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
      // the stream brings every change in order; the answer was read when the cancel came in
      // and may be older than events already shown (a progress step): it only ends a job the
      // events have not ended yet (a queued job is cancelled at once)
      if (MS.TERMINAL.has(answer.status) && !MS.TERMINAL.has(job.status)) {
        job = answer;
        render();
      }
    } catch (e) {
      MS.notice(`Cannot cancel: ${MS.errorText(e)}`);
    }
  });
  $("retry").addEventListener("click", async () => {
    try {
      const created = await api(`/v1/jobs/${id}/retry`, { method: "POST" });
      window.location.assign(`/jobs/${created.id}`);
    } catch (e) {
      MS.notice(`Cannot retry: ${MS.errorText(e)}${e.problems && e.problems.length ? ` (${e.problems.map((p) => p.message).join("; ")})` : ""}`);
    }
  });
  document.addEventListener("ms:key", load);
  document.addEventListener("DOMContentLoaded", () => {
    if (MS.authRequired && !MS.key()) {
      // not "loading": nothing is, until a key is entered
      $("job-name").textContent = "Enter an API key to see this job.";
      $("job-status").textContent = "unknown";
      return;
    }
    load();
  });
})();
