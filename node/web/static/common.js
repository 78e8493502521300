// Shared by the dashboard and the editor: sign-in (token in sessionStorage, sent as a bearer token),
// API calls with readable errors, and DICOM uploads through the node's own STOW-RS route.
"use strict";

const TOKEN_KEY = "segnode.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// fetch with the bearer token. credentials: "omit" keeps the browser from answering the server's
// Basic challenge with its own login dialog: a 401 reaches the page, which shows it.
export async function authFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const t = token();
  if (t) headers.set("Authorization", "Bearer " + t);
  return fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
}

async function errorOf(response) {
  let message = "";
  try {
    message = (await response.json()).error || "";
  } catch (e) {
    message = "";
  }
  if (response.status === 401) {
    message = token()
      ? "Your token was not accepted (expired or invalid): sign in again."
      : "Sign in with your API token.";
    document.dispatchEvent(new CustomEvent("segnode:unauthorized", { detail: message }));
  }
  return new ApiError(response.status, message || `HTTP ${response.status} ${response.statusText}`);
}

// JSON API call; throws ApiError with the server's message. raw: the Response itself.
export async function api(path, { method = "GET", json, body, headers = {}, raw = false, signal } = {}) {
  const init = { method, headers: { ...headers }, signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await authFetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return raw ? response : response.json();
}

// Downloads an authenticated file (links cannot carry the bearer token).
export async function download(path, filename) {
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename || path.split("/").pop();
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- sign-in ----------------------------------------------------------------------------------

// Wires the login form (#login: input#token, #signout, #who). After each change:
// onChange(user|null, auth (false: the node has no tokens), error (why not signed in), rejected (a token
// was tried and refused)). A refused token is forgotten.
export function setupLogin(onChange) {
  const form = document.getElementById("login");
  const input = document.getElementById("token");
  const who = document.getElementById("who");
  const signout = document.getElementById("signout");
  const show = (user, auth) => {
    form.dataset.signedIn = user ? "1" : "";
    who.textContent = user ? `signed in as ${user}` : auth === false ? "open node (no tokens)" : "";
    input.hidden = !!user;
    form.querySelector("button[type=submit]").hidden = !!user;
    signout.hidden = !user;
  };
  const check = async () => {
    const tried = !!token();
    try {
      const me = await api("/api/whoami");
      show(me.user, me.auth);
      onChange(me.user, me.auth, null, false);
    } catch (e) {
      if (e.status === 401) setToken("");
      show(null);
      onChange(null, true, e, tried && e.status === 401);
    }
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    await check();
  });
  signout.addEventListener("click", () => {
    setToken("");
    show(null);
    onChange(null, true, null, false);
  });
  document.addEventListener("segnode:unauthorized", () => show(null));
  return check();
}

// --- DICOM upload through STOW-RS ---------------------------------------------------------------

const BATCH_FILES = 64;
const BATCH_BYTES = 64 * 1024 * 1024;

async function isDicom(file) {
  if (file.size < 132) return false;
  const magic = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...magic) === "DICM";
}

// Files of a drop, folders walked (webkitGetAsEntry), in a stable order.
export async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files];
  const files = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      files.push(await new Promise((ok, fail) => entry.file(ok, fail)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  return files;
}

function stowSummary(json) {
  const stored = (json["00081199"] && json["00081199"].Value) || [];
  const failed = (json["00081198"] && json["00081198"].Value) || [];
  const reasons = failed.map((f) => {
    const code = f["00081197"] && f["00081197"].Value ? f["00081197"].Value[0] : 0;
    return "0x" + code.toString(16).toUpperCase().padStart(4, "0");
  });
  return { stored: stored.length, failed: failed.length, reasons };
}

// Sends DICOM files to POST /dicomweb/studies in batches; progress({sent, total, stored, failed,
// skipped, reasons}) after each. Non-DICOM files are skipped (counted).
export async function stowUpload(files, progress) {
  const dicom = [];
  let skipped = 0;
  for (const file of files) {
    if (await isDicom(file)) dicom.push(file);
    else skipped += 1;
  }
  const result = { sent: 0, total: dicom.length, stored: 0, failed: 0, skipped, reasons: [] };
  progress && progress({ ...result });
  let i = 0;
  while (i < dicom.length) {
    const batch = [];
    let bytes = 0;
    while (i < dicom.length && batch.length < BATCH_FILES && (bytes + dicom[i].size <= BATCH_BYTES || !batch.length)) {
      bytes += dicom[i].size;
      batch.push(dicom[i++]);
    }
    const boundary = "segnode-" + crypto.getRandomValues(new Uint32Array(4)).join("-");
    const parts = [];
    for (const file of batch) {
      parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, file, "\r\n");
    }
    parts.push(`--${boundary}--\r\n`);
    const response = await authFetch("/dicomweb/studies", {
      method: "POST",
      body: new Blob(parts),
      headers: { "Content-Type": `multipart/related; type="application/dicom"; boundary=${boundary}`,
                 Accept: "application/dicom+json" },
    });
    if (![200, 202, 409].includes(response.status)) throw await errorOf(response);
    const summary = stowSummary(await response.json());
    result.sent += batch.length;
    result.stored += summary.stored;
    result.failed += summary.failed;
    result.reasons.push(...summary.reasons);
    progress && progress({ ...result });
  }
  return result;
}

// Makes `zone` (and the whole page while dragging) accept dropped files; `input` is a file chooser.
export function setupDrop(zone, input, status) {
  const say = (text, kind = "") => {
    status.textContent = text;
    status.className = "upload-status " + kind;
  };
  const send = async (files) => {
    if (!files.length) return;
    say(`checking ${files.length} file(s)…`);
    try {
      const r = await stowUpload(files, (p) => say(`sending ${p.sent}/${p.total} DICOM file(s)…`));
      const reasons = [...new Set(r.reasons)].join(", ");
      say(`stored ${r.stored} of ${r.total} DICOM file(s)` + (r.failed ? `, ${r.failed} refused (${reasons})` : "") +
          (r.skipped ? `, ${r.skipped} non-DICOM file(s) skipped` : ""), r.failed ? "warn" : "ok");
    } catch (e) {
      say(`upload failed: ${e.message}`, "error");
    }
  };
  const over = (event) => {
    if (![...event.dataTransfer.types].includes("Files")) return;
    event.preventDefault();
    zone.classList.add("dragging");
  };
  document.addEventListener("dragover", over);
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", async (event) => {
    if (![...event.dataTransfer.types].includes("Files")) return;
    event.preventDefault();
    zone.classList.remove("dragging");
    await send(await droppedFiles(event.dataTransfer));
  });
  if (input) {
    input.addEventListener("change", async () => {
      await send([...input.files]);
      input.value = "";
    });
  }
}

export function fmtTime(seconds) {
  if (!seconds) return "";
  const d = new Date(seconds * 1000);
  return d.toLocaleString(undefined, { month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit",
                                       second: "2-digit" });
}

export function shortUid(uid) {
  return uid && uid.length > 18 ? "…" + uid.slice(-14) : uid || "";
}
