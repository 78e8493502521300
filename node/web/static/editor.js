// The correction editor: one series, slices fetched on demand (raw int16 image + uint16 label plane),
// windowing and the label overlay drawn in the browser, brush/eraser with undo/redo, and a save that
// sends only the edited slices' label planes (zlib + base64) to POST /api/edit/{series}/save.
// Versions: the engine's version 1 and every correction, any of them shown in place of the current one
// (read-only, T toggles) and made current again (POST .../restore: a new version). Coronal and sagittal
// views (server-rendered PNGs of the saved labels) beside the axial one. Slices are numbered from 1 on
// screen, as in every viewer; the API counts them from 0.
"use strict";
import { api, el, setupDrop, setupLogin, shortUid } from "/static/common.js";

const series = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const $ = (id) => document.getElementById(id);
const IMAGE_CACHE = 96; // image planes kept in memory (label planes are all kept: edits live there)
const PREFETCH = 3; // slices fetched ahead on each side of the one shown
const WHEEL_STEP = 50; // wheel delta (px) per slice
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const S = {
  info: null, k: 0, n: 0, rows: 0, cols: 0,
  images: new Map(), labels: new Map(), original: new Map(), edited: new Set(), labelled: new Set(),
  inflight: new Map(), undo: [], redo: [],
  tool: "brush", size: 5, active: null, classes: new Map(),
  window: { center: 40, width: 400 }, lut: null, opacity: 0.5, showOverlay: true, colorLut: null,
  timings: [], opened: null, stroke: null, user: null, canSave: false, saving: false, shown: -1,
  compare: null, viewing: "current", compareLabels: new Map(), cross: { i: 0, j: 0 },
};
window.segnodeEditor = S; // for tests and the curious

const imageCanvas = $("image");
const overlayCanvas = $("overlay");
const imageCtx = imageCanvas.getContext("2d");
const overlayCtx = overlayCanvas.getContext("2d");
let imageData = null;
let overlayData = null;

// --- messages -----------------------------------------------------------------------------------

function say(text, kind = "error") {
  const box = $("message");
  box.hidden = !text;
  box.textContent = text || "";
  box.className = "message " + kind;
}

function saveStatus(text, kind = "") {
  const box = $("save-status");
  box.textContent = text;
  box.className = "save-status " + kind;
}

// --- fetching slices ----------------------------------------------------------------------------

function request(key, k, url, parse) {
  const running = S.inflight.get(key);
  if (running) return running.promise;
  const controller = new AbortController();
  const promise = api(url, { raw: true, signal: controller.signal })
    .then(async (response) => parse(await response.arrayBuffer(), response.headers))
    .finally(() => S.inflight.delete(key));
  S.inflight.set(key, { promise, controller, k });
  return promise;
}

function getImage(k) {
  const hit = S.images.get(k);
  if (hit) {
    S.images.delete(k); // most recently used last
    S.images.set(k, hit);
    return hit;
  }
  return request("i" + k, k, `/api/edit/${series}/image/${k}?t=${S.info.token}`, (buffer, headers) => {
    const data = headers.get("x-dtype") === "float32" ? new Float32Array(buffer) : new Int16Array(buffer);
    S.images.set(k, data);
    while (S.images.size > IMAGE_CACHE) S.images.delete(S.images.keys().next().value);
    return data;
  });
}

function getLabels(k) {
  const hit = S.labels.get(k);
  if (hit) return hit;
  const version = S.info.version;
  return request("l" + k, k, `/api/edit/${series}/labels/${k}?v=${version}`, (buffer) => {
    if (!S.labels.has(k) && S.info.version === version) S.labels.set(k, new Uint16Array(buffer));
    return S.labels.get(k) || new Uint16Array(buffer);
  });
}

function getCompareLabels(k) {
  const v = S.compare;
  const hit = S.compareLabels.get(k);
  if (hit) return hit;
  return request(`c${v}:${k}`, k, `/api/edit/${series}/versions/${v}/labels/${k}`, (buffer) => {
    const plane = new Uint16Array(buffer);
    if (S.compare === v) S.compareLabels.set(k, plane);
    return plane;
  });
}

// The label plane shown for slice k: the current version's (editable) or the compared one's.
function shownLabels(k) {
  return S.viewing === "compare" ? getCompareLabels(k) : getLabels(k);
}

function shownPlane(k) {
  return S.viewing === "compare" ? S.compareLabels.get(k) : S.labels.get(k);
}

function prefetch(k) {
  for (let d = 1; d <= PREFETCH; d++) {
    for (const kk of [k + d, k - d]) {
      if (kk < 0 || kk >= S.n) continue;
      Promise.resolve(getImage(kk)).catch(() => {});
      Promise.resolve(getLabels(kk)).catch(() => {});
    }
  }
}

// --- drawing ------------------------------------------------------------------------------------

function buildLut() {
  const { center, width } = S.window;
  const low = center - width / 2;
  const scale = 255 / Math.max(width, 1e-6);
  const lut = new Uint32Array(65536);
  for (let v = 0; v < 65536; v++) {
    let g = Math.round((v - 32768 - low) * scale);
    g = g < 0 ? 0 : g > 255 ? 255 : g;
    lut[v] = (0xff000000 | (g << 16) | (g << 8) | g) >>> 0;
  }
  S.lut = lut;
}

function buildColorLut() {
  const alpha = Math.round(S.opacity * 255);
  const lut = new Uint32Array(65536);
  lut.fill(((alpha << 24) | 0x808080) >>> 0);
  lut[0] = 0;
  for (const c of S.classes.values()) {
    const [r, g, b] = c.color;
    lut[c.id] = ((alpha << 24) | (b << 16) | (g << 8) | r) >>> 0;
  }
  S.colorLut = lut;
}

function renderImage(img) {
  const out = new Uint32Array(imageData.data.buffer);
  if (img instanceof Int16Array) {
    const lut = S.lut;
    for (let i = 0; i < img.length; i++) out[i] = lut[img[i] + 32768];
  } else {
    const { center, width } = S.window;
    const low = center - width / 2;
    for (let i = 0; i < img.length; i++) {
      let g = Math.round((img[i] - low) * 255 / width);
      g = g < 0 ? 0 : g > 255 ? 255 : g;
      out[i] = (0xff000000 | (g << 16) | (g << 8) | g) >>> 0;
    }
  }
  imageCtx.putImageData(imageData, 0, 0);
}

function renderOverlay(plane) {
  const out = new Uint32Array(overlayData.data.buffer);
  if (!S.showOverlay || !plane) out.fill(0);
  else {
    const lut = S.colorLut;
    for (let i = 0; i < plane.length; i++) out[i] = lut[plane[i]];
  }
  overlayCtx.putImageData(overlayData, 0, 0);
}

function redraw() {
  const img = S.images.get(S.k);
  if (img) renderImage(img);
  renderOverlay(shownPlane(S.k));
}

function layout() {
  if (!S.info) return;
  const box = $("viewport").getBoundingClientRect();
  const [sx, sy] = S.info.spacing;
  const w = S.cols * sx;
  const h = S.rows * sy;
  const scale = Math.max(0.01, Math.min((box.width - 8) / w, (box.height - 8) / h));
  $("stack").style.width = `${Math.floor(w * scale)}px`;
  $("stack").style.height = `${Math.floor(h * scale)}px`;
  drawStrip();
  fitReformat("coronal");
  fitReformat("sagittal");
}

function drawStrip() {
  const strip = $("strip");
  const width = Math.max(1, Math.round(strip.clientWidth * devicePixelRatio));
  if (strip.width !== width) strip.width = width;
  const ctx = strip.getContext("2d");
  ctx.clearRect(0, 0, strip.width, strip.height);
  if (!S.n) return;
  const step = strip.width / S.n;
  const mark = (k, color, top, height) => {
    ctx.fillStyle = color;
    ctx.fillRect(Math.floor(k * step), top, Math.max(1, Math.ceil(step)), height);
  };
  for (const k of S.labelled) mark(k, "#777", 4, 6);
  for (const k of S.edited) mark(k, "#ff9f1a", 0, 14);
  mark(S.k, "#3fa9ff", 0, 14);
}

function hud(ms) {
  const { center, width } = S.window;
  const viewing = S.viewing === "compare" ? ` · showing version ${S.compare} (read-only, T: back)` : "";
  $("hud").textContent = `slice ${S.k + 1} / ${S.n}${S.edited.has(S.k) ? " · edited" : ""}${viewing} · C ${Math.round(center)} W ${Math.round(width)}` +
    (ms !== undefined ? ` · ${ms.toFixed(1)} ms` : "");
}

// --- navigation ---------------------------------------------------------------------------------

let showSeq = 0;

// Shows slice k. `since`: when the input that asked for it happened (its event.timeStamp, on the
// performance.now() clock); each slice drawn adds {k, ms, cached, input, frame} to S.timings: ms from the
// input to both planes drawn on their canvases, input the part before this call (the browser's dispatch of
// the event), frame to the start of the next animation frame (the one that puts them on screen).
async function show(k, since) {
  if (!S.info) return;
  k = Math.max(0, Math.min(S.n - 1, Math.round(k)));
  if (S.stroke) endStroke();
  const seq = ++showSeq;
  const called = performance.now();
  const t0 = since ?? called;
  S.k = k;
  $("slider").value = String(k);
  $("slice-label").textContent = `${k + 1} / ${S.n}`;
  drawStrip();
  drawReformats();
  for (const entry of S.inflight.values()) {
    if (Math.abs(entry.k - k) > PREFETCH) entry.controller.abort();
  }
  const cached = S.images.has(k) && S.labels.has(k);
  try {
    const [img, plane] = await Promise.all([getImage(k), shownLabels(k)]);
    if (seq !== showSeq) return;
    renderImage(img);
    renderOverlay(plane);
    S.shown = k;
    const ms = performance.now() - t0;
    const timing = { k, ms, cached, input: called - t0, frame: null };
    S.timings.push(timing);
    requestAnimationFrame(() => { timing.frame = performance.now() - t0; });
    hud(ms);
    document.body.dataset.slice = String(k);
  } catch (e) {
    if (e.name === "AbortError" || seq !== showSeq) return;
    say(e.message);
    return;
  }
  prefetch(k);
}

// --- painting -----------------------------------------------------------------------------------

function voxelAt(event) {
  const r = overlayCanvas.getBoundingClientRect();
  return [Math.floor(((event.clientX - r.left) / r.width) * S.cols),
          Math.floor(((event.clientY - r.top) / r.height) * S.rows)];
}

// A disc of diameter `size` voxels centred on voxel (cx, cy).
function dab(plane, cx, cy, value) {
  const r = (S.size - 1) / 2;
  const r2 = r * r + 1e-9;
  const y0 = Math.max(0, Math.ceil(cy - r));
  const y1 = Math.min(S.rows - 1, Math.floor(cy + r));
  const x0 = Math.max(0, Math.ceil(cx - r));
  const x1 = Math.min(S.cols - 1, Math.floor(cx + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      if ((x - cx) ** 2 + (y - cy) ** 2 <= r2) plane[y * S.cols + x] = value;
    }
  }
}

function line(plane, a, b, value) {
  const dx = b[0] - a[0];
  const dy = b[1] - a[1];
  const n = Math.max(Math.abs(dx), Math.abs(dy));
  for (let s = 1; s <= n; s++) dab(plane, Math.round(a[0] + (dx * s) / n), Math.round(a[1] + (dy * s) / n), value);
}

let overlayFrame = 0;
function scheduleOverlay() {
  if (overlayFrame) return;
  overlayFrame = requestAnimationFrame(() => {
    overlayFrame = 0;
    renderOverlay(S.labels.get(S.k));
  });
}

function moveCursor(event) {
  const cursor = $("cursor");
  const r = overlayCanvas.getBoundingClientRect();
  const size = (S.size * r.width) / S.cols;
  const [x, y] = voxelAt(event);
  cursor.hidden = x < 0 || y < 0 || x >= S.cols || y >= S.rows;
  cursor.style.width = cursor.style.height = `${size}px`;
  cursor.style.left = `${((x + 0.5) * r.width) / S.cols - size / 2}px`;
  cursor.style.top = `${((y + 0.5) * r.height) / S.rows - size / 2}px`;
  cursor.classList.toggle("eraser", S.tool === "eraser");
}

overlayCanvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 || !S.info) return;
  if (S.viewing === "compare") {
    say(`Version ${S.compare} is shown read-only: press T (or Compare) to go back to the current version to edit.`, "info");
    return;
  }
  const plane = S.labels.get(S.k);
  if (!plane || S.shown !== S.k) return; // the slice on screen is still the previous one
  if (S.tool === "brush" && !S.active) {
    say("Choose a label (or add one) before painting.", "info");
    return;
  }
  event.preventDefault();
  overlayCanvas.setPointerCapture(event.pointerId);
  const value = S.tool === "eraser" ? 0 : S.active;
  const p = voxelAt(event);
  S.stroke = { k: S.k, before: plane.slice(), last: p, value };
  dab(plane, p[0], p[1], value);
  renderOverlay(plane);
});

let crossTimer = 0;
overlayCanvas.addEventListener("pointermove", (event) => {
  moveCursor(event);
  clearTimeout(crossTimer); // the coronal and sagittal views go through where the pointer rests
  const [x, y] = voxelAt(event);
  crossTimer = setTimeout(() => setCross(x, y), 250);
  const stroke = S.stroke;
  if (!stroke || stroke.k !== S.k) return;
  const plane = S.labels.get(stroke.k);
  const p = voxelAt(event);
  if (p[0] === stroke.last[0] && p[1] === stroke.last[1]) return;
  line(plane, stroke.last, p, stroke.value);
  stroke.last = p;
  scheduleOverlay();
});

overlayCanvas.addEventListener("pointerleave", () => { $("cursor").hidden = true; });
for (const type of ["pointerup", "pointercancel"]) {
  overlayCanvas.addEventListener(type, () => { if (S.stroke) endStroke(); });
}

function samePlane(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function endStroke() {
  const { k, before } = S.stroke;
  S.stroke = null;
  const plane = S.labels.get(k);
  renderOverlay(S.labels.get(S.k));
  if (samePlane(before, plane)) return;
  S.undo.push({ k, before, after: plane.slice() });
  S.redo = [];
  if (!S.original.has(k)) S.original.set(k, before);
  updateEdited(k);
}

function updateEdited(k) {
  const original = S.original.get(k);
  if (original && !samePlane(original, S.labels.get(k))) S.edited.add(k);
  else S.edited.delete(k);
  const list = $("edited");
  const ks = [...S.edited].sort((a, b) => a - b);
  list.replaceChildren(...(ks.length ? ks.map((kk) => el("button", { type: "button", class: "chip", onclick: () => show(kk) }, String(kk + 1))) : ["none"]));
  list.classList.toggle("muted", !ks.length);
  $("undo").disabled = !S.undo.length;
  $("redo").disabled = !S.redo.length;
  $("save").disabled = !ks.length || S.saving || !S.canSave;
  $("save").title = S.canSave ? "" : "saving needs a signed-in user";
  document.body.dataset.edited = ks.join(",");
  drawStrip();
  hud();
}

function applyOp(op, plane) {
  S.labels.get(op.k).set(plane);
  updateEdited(op.k);
  if (op.k !== S.k) show(op.k);
  else renderOverlay(S.labels.get(S.k));
}

function undo() {
  const op = S.undo.pop();
  if (!op) return;
  S.redo.push(op);
  applyOp(op, op.before);
}

function redo() {
  const op = S.redo.pop();
  if (!op) return;
  S.undo.push(op);
  applyOp(op, op.after);
}

// --- labels -------------------------------------------------------------------------------------

function renderLabels() {
  const items = [...S.classes.values()].map((c, index) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.backgroundColor = `rgb(${c.color.join(",")})`;
    return el("li", { class: c.id === S.active ? "active" : "", dataset: { id: c.id }, title: c.category || "",
                      onclick: () => selectLabel(c.id) },
      swatch, el("span", { class: "id", text: c.id }), el("span", { class: "name", text: c.name }),
      c.custom ? el("small", { text: "new" }) : null,
      index < 9 ? el("kbd", { text: index + 1 }) : null);
  });
  $("labels").replaceChildren(...(items.length ? items : [el("li", { class: "muted", text: "no labels yet: add one" })]));
}

function selectLabel(id) {
  S.active = id;
  setTool("brush");
  renderLabels();
}

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

$("add-label").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("new-label").value.trim();
  if (!name) return;
  if ([...S.classes.values()].some((c) => c.name === name)) {
    say(`There is a label called ${name} already.`, "info");
    return;
  }
  const id = Math.max(0, ...S.classes.keys()) + 1;
  S.classes.set(id, { id, name, color: hexToRgb($("new-color").value), category: "Other", custom: true });
  $("new-label").value = "";
  buildColorLut();
  selectLabel(id);
  renderOverlay(S.labels.get(S.k));
});

// --- tools and window ---------------------------------------------------------------------------

function setTool(tool) {
  S.tool = tool;
  for (const input of document.querySelectorAll("input[name=tool]")) input.checked = input.value === tool;
}

function setSize(size) {
  S.size = Math.max(1, Math.min(51, size));
  $("size").value = String(S.size);
  $("size-value").textContent = String(S.size);
}

function setWindow(center, width) {
  S.window = { center: Number(center), width: Math.max(1, Number(width)) };
  $("wc").value = String(Math.round(S.window.center));
  $("ww").value = String(Math.round(S.window.width));
  buildLut();
  const img = S.images.get(S.k);
  if (img) renderImage(img);
  hud();
  loadReformats();
}

for (const input of document.querySelectorAll("input[name=tool]")) input.addEventListener("change", () => setTool(input.value));
$("size").addEventListener("input", () => setSize(Number($("size").value)));
$("preset").addEventListener("change", () => {
  const p = S.info.presets[Number($("preset").value)];
  if (p) setWindow(p.center, p.width);
});
for (const id of ["wc", "ww"]) $(id).addEventListener("change", () => setWindow($("wc").value, $("ww").value));
$("opacity").addEventListener("input", () => {
  S.opacity = Number($("opacity").value) / 100;
  buildColorLut();
  renderOverlay(shownPlane(S.k));
  loadReformats();
});
$("show-overlay").addEventListener("change", () => {
  S.showOverlay = $("show-overlay").checked;
  renderOverlay(shownPlane(S.k));
});
$("slider").addEventListener("input", (event) => show(Number($("slider").value), event.timeStamp));
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);
$("save").addEventListener("click", save);
$("compare-toggle").addEventListener("click", toggleCompare);
$("strip").addEventListener("click", (event) => {
  const r = $("strip").getBoundingClientRect();
  show(Math.floor(((event.clientX - r.left) / r.width) * S.n), event.timeStamp);
});

let wheel = 0;
$("viewport").addEventListener("wheel", (event) => {
  event.preventDefault();
  wheel += event.deltaMode === 1 ? event.deltaY * 40 : event.deltaY;
  if (Math.abs(wheel) >= WHEEL_STEP) {
    show(S.k + Math.sign(wheel), event.timeStamp);
    wheel = 0;
  }
}, { passive: false });

document.addEventListener("keydown", (event) => {
  if (!S.info) return;
  const target = event.target;
  if (target.matches("input:not([type]), input[type=text], input[type=number], input[type=password], select, textarea")) return;
  const key = event.key;
  const mod = event.ctrlKey || event.metaKey;
  if (mod && key.toLowerCase() === "z") { event.preventDefault(); return event.shiftKey ? redo() : undo(); }
  if (mod && key.toLowerCase() === "y") { event.preventDefault(); return redo(); }
  if (mod && key.toLowerCase() === "s") { event.preventDefault(); return save(); }
  if (mod || event.altKey) return;
  if (target === $("slider") && key.startsWith("Arrow") || target === $("slider") && ["PageUp", "PageDown", "Home", "End"].includes(key)) return;
  const steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
  if (key in steps) { event.preventDefault(); show(S.k + steps[key], event.timeStamp); }
  else if (key === "Home") { event.preventDefault(); show(0, event.timeStamp); }
  else if (key === "End") { event.preventDefault(); show(S.n - 1, event.timeStamp); }
  else if (key === "b" || key === "B") setTool("brush");
  else if (key === "e" || key === "E") setTool("eraser");
  else if (key === "[") setSize(S.size - 1);
  else if (key === "]") setSize(S.size + 1);
  else if (key === "o" || key === "O") { $("show-overlay").click(); }
  else if (key === "t" || key === "T") { toggleCompare(); }
  else if (/^[1-9]$/.test(key)) {
    const c = [...S.classes.values()][Number(key) - 1];
    if (c) selectLabel(c.id);
  }
});

// --- saving -------------------------------------------------------------------------------------

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function encodePlane(plane) {
  let bytes = new Uint8Array(plane.buffer, plane.byteOffset, plane.byteLength);
  if (!LITTLE_ENDIAN) {
    bytes = new Uint8Array(bytes); // the API wants little-endian uint16
    for (let i = 0; i < bytes.length; i += 2) [bytes[i], bytes[i + 1]] = [bytes[i + 1], bytes[i]];
  }
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return toBase64(new Uint8Array(await new Response(stream).arrayBuffer()));
}

async function save() {
  if (!S.edited.size || S.saving) return;
  if (!S.canSave) {
    saveStatus("Sign in to save: every version is attributed to a user.", "error");
    return;
  }
  S.saving = true;
  $("save").disabled = true;
  saveStatus("saving…");
  const ks = [...S.edited].sort((a, b) => a - b);
  try {
    const slices = {};
    for (const k of ks) slices[k] = await encodePlane(S.labels.get(k));
    const labels = [...S.classes.values()].filter((c) => c.custom).map((c) => ({ id: c.id, name: c.name, color: c.color }));
    const result = await api(`/api/edit/${series}/save`, {
      method: "POST",
      json: { base_version: S.info.version, token: S.info.token, labels_token: S.info.labels_token, encoding: "zlib",
              slices, labels },
    });
    S.info.version = result.version;
    S.info.labels_token = result.labels_token;
    for (const k of ks) {
      const plane = S.labels.get(k);
      if (plane.some((v) => v !== 0)) S.labelled.add(k);
      else S.labelled.delete(k);
    }
    S.original.clear();
    S.edited.clear();
    S.undo = [];
    S.redo = [];
    const custom = new Map([...S.classes].filter(([, c]) => c.custom));
    for (const c of result.classes) { S.classes.set(c.id, c); custom.delete(c.id); }
    renderLabels();
    addVersion(result);
    $("base").textContent = `${shortUid(series)} · labels: version ${result.version} by ${result.user}`;
    saveStatus(`Saved version ${result.version} (SEG ${shortUid(result.seg_uid)}), ${result.voxels_changed} voxel(s) ` +
               `on slice(s) ${result.slices.join(", ")}; ${result.delivery}.`, "ok");
    document.body.dataset.saved = String(result.version);
  } catch (e) {
    saveStatus(`Not saved: ${e.message}`, "error");
  } finally {
    S.saving = false;
    updateEdited(S.k);
  }
}

// --- versions -----------------------------------------------------------------------------------

function when(time) {
  return String(time || "").replace("T", " ").slice(0, 19);
}

function renderVersions() {
  const details = new Map((S.info.history || []).map((row) => [row.version, row]));
  const items = [...S.info.versions].reverse().map((v) => {
    const row = details.get(v.version);
    const who = v.source === "engine" ? `engine (job ${v.job_id})` : v.user;
    const title = row ? `slices ${row.slices.split(";").map((k) => Number(k) + 1).join(", ")} · ` +
      `${row.labels.replaceAll(";", ", ") || "-"} · ${row.delivery}` : v.base || "";
    return el("li", { class: [v.current ? "current" : "", S.compare === v.version ? "compared" : ""].join(" ").trim(),
                      dataset: { version: v.version }, title },
      el("b", { text: `v${v.version}` }), el("span", { text: `${who} · ${when(v.time)}` }),
      v.current ? el("span", { class: "badge state-done", text: "current" }) : [
        el("button", { type: "button", class: "compare", onclick: () => startCompare(v.version) },
          S.compare === v.version && S.viewing === "compare" ? "Showing" : "Compare"),
        el("button", { type: "button", class: "make-current", onclick: () => makeCurrent(v.version) }, "Make current")]);
  });
  $("versions").replaceChildren(...(items.length ? items : [el("li", { class: "muted", text: "no version yet" })]));
  const toggle = $("compare-toggle");
  toggle.disabled = S.compare === null;
  toggle.textContent = S.compare === null ? "Compare" :
    S.viewing === "compare" ? `Back to v${S.info.version}` : `Show v${S.compare}`;
  $("compare-status").textContent = S.compare === null ? "" :
    S.viewing === "compare" ? `showing v${S.compare}, read-only` : `editing v${S.info.version}`;
  document.body.dataset.viewing = S.viewing === "compare" ? String(S.compare) : String(S.info.version);
}

// A new current version (a save or a version made current again) joins the list.
function addVersion(result) {
  for (const v of S.info.versions) v.current = false;
  S.info.versions.push({ version: result.version, source: "correction", user: result.user, time: result.time,
                         base: result.base || "", current: true });
  S.info.history = [...(S.info.history || []), { version: result.version, slices: result.slices.join(";"),
                                                 labels: result.labels.join(";"), delivery: result.delivery }];
  if (S.compare === result.version) S.compare = null;
  renderVersions();
  loadReformats();
}

function setViewing(viewing) {
  if (S.stroke) endStroke();
  S.viewing = viewing;
  renderVersions();
  loadReformats();
  show(S.k);
}

function startCompare(version) {
  if (S.compare !== version) {
    S.compare = version;
    S.compareLabels = new Map();
  }
  setViewing("compare");
}

function toggleCompare() {
  if (S.compare === null) return;
  setViewing(S.viewing === "compare" ? "current" : "compare");
}

async function makeCurrent(version) {
  if (S.edited.size) {
    saveStatus(`Save or undo your edits first: making version ${version} current would set them aside.`, "error");
    return;
  }
  if (!S.canSave) {
    saveStatus("Sign in to make a version current: every version is attributed to a user.", "error");
    return;
  }
  saveStatus(`making version ${version} current…`);
  try {
    const result = await api(`/api/edit/${series}/restore`, { method: "POST", json: { version, base_version: S.info.version } });
    S.info.version = result.version;
    S.info.labels_token = result.labels_token;
    S.classes = new Map(result.classes.map((c) => [c.id, c]));
    S.labels = new Map();
    S.original.clear();
    S.undo = [];
    S.redo = [];
    S.viewing = "current";
    buildColorLut();
    renderLabels();
    const info = await api(`/api/edit/${series}`); // the versions, their details and the labelled slices now
    S.info.versions = info.versions;
    S.info.history = info.history;
    S.labelled = new Set(info.labelled_slices);
    if (S.compare === result.version) S.compare = null;
    renderVersions();
    loadReformats();
    $("base").textContent = `${shortUid(series)} · labels: version ${result.version} by ${result.user}`;
    saveStatus(`Version ${version} is current again as version ${result.version} (SEG ${shortUid(result.seg_uid)}); ` +
               `${result.delivery}.`, "ok");
    document.body.dataset.saved = String(result.version);
    await show(S.k);
  } catch (e) {
    saveStatus(`Not made current: ${e.message}`, "error");
  }
}

// --- coronal and sagittal views ---------------------------------------------------------------------

const reformats = {
  coronal: { canvas: $("coronal"), image: null, firstAtBottom: false, seq: 0 },
  sagittal: { canvas: $("sagittal"), image: null, firstAtBottom: false, seq: 0 },
};

function setCross(i, j) {
  if (!S.info || i < 0 || j < 0 || i >= S.cols || j >= S.rows) return;
  if (S.cross.i === i && S.cross.j === j) return;
  S.cross = { i, j };
  loadReformats();
}

let reformatTimer = 0;
function loadReformats() {
  if (!S.info) return;
  clearTimeout(reformatTimer);
  reformatTimer = setTimeout(() => {
    for (const [axis, index] of [["coronal", S.cross.j], ["sagittal", S.cross.i]]) loadReformat(axis, index);
  }, 60);
}

async function loadReformat(axis, index) {
  const view = reformats[axis];
  const seq = ++view.seq;
  const version = S.viewing === "compare" ? S.compare : S.info.version;
  const { center, width } = S.window;
  const opacity = S.showOverlay ? S.opacity : 0;
  try {
    const response = await api(`/api/edit/${series}/view/${axis}/${index}?center=${center}&width=${width}` +
                               `&opacity=${opacity}&v=${version}`, { raw: true });
    const bitmap = await createImageBitmap(await response.blob());
    if (seq !== view.seq) return;
    view.image = bitmap;
    view.firstAtBottom = response.headers.get("x-first-slice") === "bottom";
    view.index = index;
    view.canvas.width = bitmap.width;
    view.canvas.height = bitmap.height;
    fitReformat(axis);
    $(`${axis}-caption`).textContent = `${axis} · ${axis === "coronal" ? "row" : "column"} ${index + 1} · v${version}`;
    drawReformat(axis);
    document.body.dataset[axis] = `${index}:${version}`;
  } catch (e) {
    if (seq === view.seq) $(`${axis}-caption`).textContent = `${axis}: ${e.message}`;
  }
}

// The view as large as its box allows, in millimetres' proportions (columns x slice spacing).
function fitReformat(axis) {
  const view = reformats[axis];
  if (!view.image) return;
  const [sx, sy, sz] = S.info.spacing;
  const w = view.canvas.width * (axis === "coronal" ? sx : sy);
  const h = view.canvas.height * sz;
  const box = view.canvas.parentElement.getBoundingClientRect();
  const scale = Math.max(0.01, Math.min((box.width - 8) / w, (box.height - 24) / h));
  view.canvas.style.width = `${Math.floor(w * scale)}px`;
  view.canvas.style.height = `${Math.floor(h * scale)}px`;
}

function drawReformat(axis) {
  const view = reformats[axis];
  if (!view.image) return;
  const ctx = view.canvas.getContext("2d");
  ctx.drawImage(view.image, 0, 0);
  const row = view.firstAtBottom ? S.n - 1 - S.k : S.k;
  ctx.fillStyle = "rgba(63, 169, 255, 0.8)";
  ctx.fillRect(0, row, view.canvas.width, 1);
}

function drawReformats() {
  drawReformat("coronal");
  drawReformat("sagittal");
}

for (const [axis, view] of Object.entries(reformats)) {
  view.canvas.addEventListener("click", (event) => {
    if (!view.image) return;
    const r = view.canvas.getBoundingClientRect();
    const row = Math.floor(((event.clientY - r.top) / r.height) * view.canvas.height);
    show(view.firstAtBottom ? S.n - 1 - row : row, event.timeStamp);
  });
}

window.addEventListener("beforeunload", (event) => {
  if (S.edited.size) event.preventDefault();
});

// --- opening the series -------------------------------------------------------------------------

async function open() {
  const t0 = performance.now();
  let info;
  try {
    info = await api(`/api/edit/${series}`);
  } catch (e) {
    say(e.status === 404 ? `Not found: ${e.message}` : e.message);
    document.body.dataset.error = String(e.status || "");
    return;
  }
  say("");
  S.info = info;
  S.n = info.slices;
  S.rows = info.rows;
  S.cols = info.columns;
  S.cross = { i: Math.floor(S.cols / 2), j: Math.floor(S.rows / 2) };
  S.labelled = new Set(info.labelled_slices);
  S.canSave = info.can_save;
  S.classes = new Map(info.classes.map((c) => [c.id, c]));
  S.active = info.classes.length ? info.classes[0].id : null;
  document.title = `segnode editor · ${info.description || shortUid(series)}`;
  $("title").textContent = `${info.modality} ${info.description || ""} · ${info.columns}×${info.rows}×${info.slices}`;
  const version = info.version && !info.base.startsWith("version") ? ` (version ${info.version})` : "";
  $("base").textContent = `${shortUid(series)} · labels: ${info.base}${version}`;
  $("base").title = series;
  $("preset").replaceChildren(...info.presets.map((p, i) => el("option", { value: i }, `${p.name} (${p.center}/${p.width})`)));
  setWindow(info.presets[0].center, info.presets[0].width);
  buildColorLut();
  renderLabels();
  renderVersions();
  for (const canvas of [imageCanvas, overlayCanvas]) {
    canvas.width = S.cols;
    canvas.height = S.rows;
  }
  imageData = imageCtx.createImageData(S.cols, S.rows);
  overlayData = overlayCtx.createImageData(S.cols, S.rows);
  $("slider").max = String(S.n - 1);
  $("workspace").hidden = false;
  new ResizeObserver(layout).observe($("viewport"));
  layout();
  updateEdited(0);
  const infoMs = performance.now() - t0;
  await show(Math.floor(S.n / 2));
  // The first load: the series' info (the server reads the series and its labels once), then the first slice.
  S.opened = { infoMs, firstSliceMs: performance.now() - t0 };
  $("viewport").focus();
  document.body.dataset.ready = "1";
}

setupDrop($("drop"), $("files"), $("upload-status"));
setupLogin((user, auth, error, rejected) => {
  S.user = user;
  if (S.info) {
    S.canSave = !!user && auth !== false;
    updateEdited(S.k);
    if (user) {
      say(""); // signed in again (e.g. after an expired token): what was refused is fetched again
      if (S.shown !== S.k) show(S.k);
    }
  }
  if (user || auth === false) {
    if (!S.info) open();
  } else if (rejected) {
    say(error.message, "error");
  } else if (error && error.status !== 401) {
    say(error.message, "error");
  } else if (!S.info) {
    say("Sign in with your API token to open this series.", "info");
  }
});
