// The dashboard: polls /api/dashboard every 2 s while the page is visible.
"use strict";
import { api, download, el, fmtTime, setupDrop, setupLogin, shortUid } from "/static/common.js";

const POLL_MS = 2000;
const message = document.getElementById("message");
const expanded = new Set(); // job ids whose artifacts are shown
const artifactCache = new Map();
let timer = null;
let signedIn = false;

function say(text, kind = "error") {
  message.hidden = !text;
  message.textContent = text || "";
  message.className = "message " + kind;
}

function badge(state) {
  return el("span", { class: `badge state-${state}`, text: state });
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  return s < 10 ? s.toFixed(2) + " s" : s < 600 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function timings(job) {
  const entries = Object.entries(job.timings || {});
  if (!entries.length) return "";
  const total = entries.reduce((a, [, v]) => a + v, 0);
  return el("span", { class: "timings", title: `total ${seconds(total)}` },
    entries.map(([stage, s]) => el("span", { text: `${stage} ${seconds(s)}` })));
}

function deliveries(job) {
  const names = Object.entries(job.destinations || {});
  if (!names.length) return el("span", { class: "muted", text: "none" });
  return names.map(([name, d]) => el("div", { class: "delivery" },
    el("span", { text: name + " " }), badge(d.state || "pending"),
    d.instances ? el("span", { class: "muted", text: ` ${d.delivered || 0}/${d.instances}` }) : null,
    d.last_error ? el("div", { class: "reason", text: d.last_error }) : null,
    d.next_attempt ? el("div", { class: "muted", text: `next try ${fmtTime(d.next_attempt)}` }) : null));
}

async function retry(job) {
  try {
    await api(`/api/jobs/${job.id}/retry`, { method: "POST" });
    say(`job ${job.id} queued again`, "ok");
    poll();
  } catch (e) {
    say(`retry of job ${job.id}: ${e.message}`);
  }
}

async function toggleArtifacts(job) {
  if (expanded.has(job.id)) expanded.delete(job.id);
  else {
    expanded.add(job.id);
    try {
      artifactCache.set(job.id, await api(`/api/jobs/${job.id}/artifacts`));
    } catch (e) {
      say(`artifacts of job ${job.id}: ${e.message}`);
    }
  }
  poll();
}

function artifactRow(job, columns) {
  const files = artifactCache.get(job.id) || [];
  return el("tr", { class: "artifacts" }, el("td", { colspan: columns },
    files.length ? files.map((f) => el("button", {
      type: "button", class: "link", title: `${f.kind}, ${(f.size / 1024).toFixed(1)} KiB`,
      onclick: () => download(`/api/jobs/${job.id}/artifacts/${f.path}`, f.path.split("/").pop())
        .catch((e) => say(e.message)),
    }, `${f.path} `, el("small", { text: f.kind })))
      : el("span", { class: "muted", text: "no files" })));
}

// The patient and study of a job, for a signed-in reader (the API sends them to nobody else).
function patient(job) {
  const p = job.patient;
  if (!p) return el("span", { class: "muted", text: job.patient === undefined ? "" : "unknown" });
  const date = /^\d{8}$/.test(p.study_date) ? `${p.study_date.slice(0, 4)}-${p.study_date.slice(4, 6)}-${p.study_date.slice(6)}` : p.study_date;
  return el("div", { class: "patient" },
    el("b", { class: "patient-name", text: (p.name || "(no name)").replaceAll("^", " ").trim() }),
    el("div", { class: "muted" }, el("span", { class: "patient-id", text: `ID ${p.id || "-"}` }),
      el("span", { class: "accession", text: ` · acc. ${p.accession || "-"}` }),
      el("span", { class: "study-date", text: ` · ${date || "no date"}` })),
    el("div", { class: "series-description", text: p.series_description || "" }));
}

async function showReview(job, img) {
  if (img.src) { img.hidden = !img.hidden; return; }
  try {
    img.src = URL.createObjectURL(await (await api(`/api/jobs/${job.id}/artifacts/${job.review}`, { raw: true })).blob());
    img.hidden = false;
  } catch (e) {
    say(`review sheet of job ${job.id}: ${e.message}`);
  }
}

const reviews = new Map(); // job id -> its review sheet <img>, kept across polls

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  const rows = [];
  for (const job of jobs) {
    const failedOutputs = Object.entries(job.failed_outputs || {});
    const error = job.error ? el("div", { class: "reason" }, el("b", { text: job.error.code + ": " }), job.error.message)
      : failedOutputs.length ? el("div", { class: "reason failed-outputs" },
        el("b", { text: `${failedOutputs.length} output${failedOutputs.length > 1 ? "s" : ""} failed` }),
        ...failedOutputs.map(([name, e]) => el("div", { text: `${name} [${e.code}]: ${e.message}` }))) : "";
    if (job.review && !reviews.has(job.id)) reviews.set(job.id, el("img", { class: "review", alt: "review sheet", hidden: true }));
    const review = reviews.get(job.id);
    rows.push(el("tr", { dataset: { job: job.id, state: job.state } },
      el("td", { text: fmtTime(job.created) }),
      el("td", {}, patient(job)),
      el("td", { class: "uid", title: job.series_uid }, shortUid(job.series_uid),
        el("div", { class: "muted", text: `gen ${job.generation}, ${job.instance_count} inst.` })),
      el("td", { text: [job.sender.via, job.sender.calling_aet].filter(Boolean).join(" ") }),
      el("td", {}, job.rule, el("div", { class: "muted", text: job.engine })),
      el("td", {}, badge(job.state), job.attempts > 1 ? el("div", { class: "muted", text: `attempt ${job.attempts}` }) : null,
        job.waiting ? el("div", { class: "reason waiting", text: job.waiting }) : null),
      el("td", { text: job.stage }),
      el("td", {}, el("progress", { max: 1, value: job.progress }),
        el("span", { class: "muted", text: ` ${Math.round(job.progress * 100)}%` })),
      el("td", {}, timings(job)),
      el("td", {}, error),
      el("td", {}, deliveries(job)),
      el("td", { class: "actions" },
        job.state === "failed" ? el("button", { type: "button", class: "retry", onclick: () => retry(job) }, "Retry") : null,
        job.state === "done" ? el("button", { type: "button", class: "files", onclick: () => toggleArtifacts(job) },
          expanded.has(job.id) ? "Hide files" : `Files (${job.artifacts})`) : null,
        el("a", { href: `/edit/${job.series_uid}`, class: "edit" }, "Edit"),
        job.viewer ? el("a", { href: job.viewer, class: "viewer", target: "_blank", rel: "noopener" }, "Viewer") : null,
        job.review ? el("button", { type: "button", class: "review-sheet", onclick: () => showReview(job, review) }, "Review sheet") : null),
    ));
    if (review && job.review) rows.push(el("tr", { class: "review-row" }, el("td", { colspan: 12 }, review)));
    if (expanded.has(job.id)) rows.push(artifactRow(job, 12));
  }
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 12, class: "muted", text: "no jobs yet" }))]));
}

function renderSeries(series, jobs) {
  const byId = new Map(jobs.map((j) => [j.id, j]));
  const body = document.querySelector("#series tbody");
  body.replaceChildren(...(series.length ? series.map((s) => {
    const job = s.job_id ? byId.get(s.job_id) : null;
    const source = [s.via, job && job.sender.calling_aet].filter(Boolean).join(" ");
    return el("tr", { dataset: { series: s.series_uid } },
      el("td", { text: fmtTime(s.updated) }),
      el("td", { class: "uid", title: s.series_uid, text: shortUid(s.series_uid) }),
      el("td", { text: s.modality || "" }),
      el("td", { text: s.instances ?? "" }),
      el("td", { text: source }),
      el("td", { class: s.rule ? "" : "reason", text: s.rule ? `rule ${s.rule}` : s.decision || "" }),
      el("td", {}, job ? badge(job.state) : s.job_id ? el("span", { class: "muted", text: "job " + s.job_id }) : el("span", { class: "muted", text: "not routed" })),
      el("td", {}, el("a", { href: `/edit/${s.series_uid}`, class: "edit" }, "Edit")));
  }) : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no series yet: send one (C-STORE, STOW-RS) or drop files above" }))]));
}

function renderOutbox(data) {
  const body = document.querySelector("#outbox tbody");
  const rows = data.outbox || data.destinations.map((d) => ({ destination: d.name, kind: d.kind, none: true }));
  body.replaceChildren(...(rows.length ? rows.map((r) => el("tr", {},
    el("td", { text: r.destination }), el("td", { text: r.kind || "" }),
    ...(r.none ? [el("td", { colspan: 6, class: "muted", text: "no outbox running in this process" })]
      : [el("td", { text: r.pending ?? "" }), el("td", { text: r.delivering ?? "" }), el("td", { text: r.delivered ?? "" }),
        el("td", { class: r.failed ? "bad" : "", text: r.failed ?? "" }), el("td", { text: fmtTime(r.next_attempt) }),
        el("td", { class: "reason", text: r.last_error || "" })])))
    : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no destinations configured: corrections stay in the node's corrections folder" }))]));
}

function renderWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  const now = Date.now() / 1000;
  body.replaceChildren(...(workers.length ? workers.map((w) => el("tr", { dataset: { worker: w.id } },
    el("td", { text: w.id }), el("td", { text: w.name }), el("td", { text: w.host }), el("td", { text: w.device }),
    el("td", { text: seconds(Math.max(0, now - w.last_seen)) + " ago" }),
    el("td", { class: "uid", text: w.job || "" }),
    el("td", { text: Object.entries(w.jobs).map(([state, n]) => `${n} ${state}`).join(", ") }),
    el("td", { text: `${seconds(w.fetch_seconds)} / ${seconds(w.upload_seconds)}` })))
    : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no worker seen yet" }))]));
}

async function renderAnnotations() {
  const rows = (await api("/api/annotations")).slice(-20).reverse();
  document.querySelector("#annotations tbody").replaceChildren(...(rows.length ? rows.map((r) => el("tr", {},
    el("td", { text: r.time.replace("T", " ").slice(0, 19) }), el("td", { text: r.user }),
    el("td", { class: "uid", title: r.series_uid }, el("a", { href: `/edit/${r.series_uid}` }, shortUid(r.series_uid))),
    el("td", { text: r.version }), el("td", { text: r.slices.split(";").length + " slice(s)", title: r.slices }),
    el("td", { text: r.labels.replaceAll(";", ", ") }), el("td", { class: "reason", text: r.delivery }))) :
    [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "no corrections saved yet" }))]));
}

let tick = 0;
async function poll() {
  clearTimeout(timer);
  try {
    const data = await api("/api/dashboard");
    document.getElementById("node-name").textContent = data.node;
    document.getElementById("node-version").textContent = data.version;
    const q = data.queue;
    document.getElementById("queue").replaceChildren(
      el("span", { class: "stat", id: "queue-depth" }, el("b", { text: q.depth }), " queued"),
      el("span", { class: "stat" }, el("b", { text: q.running }), " running"),
      el("span", { class: "stat" }, el("b", { text: q.workers }), ` worker${q.workers === 1 ? "" : "s"} (${q.backend})`),
      el("span", { class: "stat" }, el("b", { text: data.counts.failed }), " failed"));
    renderJobs(data.jobs);
    renderSeries(data.series, data.jobs);
    renderOutbox(data);
    renderWorkers(data.workers || []);
    if (tick++ % 5 === 0) await renderAnnotations();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
    if (message.classList.contains("error") && message.dataset.source === "poll") say("");
  } catch (e) {
    say(e.message);
    message.dataset.source = "poll";
    if (e.status === 401) return; // wait for a sign-in
  }
  if (!document.hidden) timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
document.getElementById("csv").addEventListener("click", () => download("/api/annotations.csv", "annotations.csv").catch((e) => say(e.message)));
setupDrop(document.getElementById("drop"), document.getElementById("files"), document.getElementById("upload-status"));
setupLogin((user, auth, error, rejected) => {
  signedIn = !!user || auth === false;
  if (!user) { // what a signed-in reader saw (patient names among it) leaves the page with them
    clearTimeout(timer);
    for (const id of ["jobs", "series", "outbox", "annotations"]) document.querySelector(`#${id} tbody`).replaceChildren();
    for (const img of reviews.values()) if (img.src) URL.revokeObjectURL(img.src);
    reviews.clear();
  }
  if (signedIn) { say(""); poll(); }
  else if (rejected) say(error.message, "error");
  else say(error && error.status !== 401 ? error.message : "Sign in with your API token.", error && error.status !== 401 ? "error" : "info");
});
