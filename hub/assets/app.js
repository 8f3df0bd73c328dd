// Shoal's dashboard: what every page shares. A page talks only to the documented REST API
// under /api/v1 (the one the CLI uses) with the signed-in user's bearer token; the hub sets no
// cookies. Text from the API reaches the page as text nodes, never as HTML.

const KEY = "shoal.token";

/** The signed-in user's token, or null. */
export function token() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
}

function keep(t, remember) {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  (remember ? localStorage : sessionStorage).setItem(KEY, t);
}

/** Forgets the token and shows the page signed out. */
export function signOut() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  location.reload();
}

/** An answer from the API that is not a success: its status and the hub's message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function messageOf(r) {
  const text = await r.text();
  try {
    return JSON.parse(text).error || text;
  } catch {
    return text || `${r.status} ${r.statusText}`;
  }
}

/**
 * Calls the API. `body` is sent as JSON; `text` reads the answer as text. A 401 asks the user
 * to sign in and tries again with the new token.
 */
export async function api(path, { method = "GET", body, text = false, blob = false } = {}) {
  for (;;) {
    const headers = { Accept: text ? "text/plain" : "application/json" };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) {
      await signIn(await messageOf(r));
      continue;
    }
    if (!r.ok) throw new ApiError(r.status, await messageOf(r));
    if (blob) return r.blob();
    return text ? r.text() : r.json();
  }
}

let signing = null;

/** Shows the sign-in form until a token the hub accepts is given. */
export function signIn(reason) {
  if (signing) return signing;
  const dialog = document.getElementById("sign-in");
  const form = document.getElementById("sign-in-form");
  const input = document.getElementById("token");
  const error = document.getElementById("sign-in-error");
  error.textContent = token() ? reason || "" : "";
  const sso = document.getElementById("sso");
  if (document.body.dataset.oidcIssuer) {
    sso.hidden = false;
    sso.onclick = () => import("./signed-in.js").then((m) => m.start());
  }
  signing = new Promise((resolve) => {
    dialog.addEventListener("cancel", (e) => e.preventDefault());
    form.onsubmit = async (e) => {
      e.preventDefault();
      const t = input.value.trim();
      if (!t) return;
      const r = await fetch("/api/v1/whoami", { headers: { Authorization: `Bearer ${t}` } });
      if (!r.ok) {
        error.textContent = await messageOf(r);
        input.select();
        return;
      }
      keep(t, document.getElementById("remember").checked);
      input.value = "";
      dialog.close();
      signing = null;
      me = null;
      showWho();
      resolve();
    };
    dialog.showModal();
    input.focus();
  });
  return signing;
}

let me = null;

/** The caller: `{name, role}` (an anonymous admin when the hub runs without authentication). */
export async function whoami() {
  if (!me) me = api("/api/v1/whoami");
  return me;
}

async function showWho() {
  const who = document.getElementById("who");
  const out = document.getElementById("sign-out");
  try {
    const p = await whoami();
    if (p.name === "anonymous") {
      who.textContent = "authentication is off on this hub";
      out.hidden = true;
    } else {
      who.textContent = `${p.name.replace(/^token:/, "")} · ${p.role}`;
      out.hidden = false;
      out.onclick = signOut;
    }
  } catch (e) {
    who.textContent = "";
  }
}

let document_ = null;

/**
 * Whether the caller's role may call `method template` (e.g. `post`, `/api/v1/jobs/{name}/run`),
 * read from the hub's own OpenAPI document: the same rules the hub enforces.
 */
export async function may(method, template) {
  if (!document_) document_ = fetch("/api/v1/openapi.json").then((r) => r.json());
  const [doc, p] = await Promise.all([document_, whoami()]);
  const op = doc.paths?.[template]?.[method.toLowerCase()];
  const needed = op?.security?.[0]?.token?.[0];
  if (!op) return false;
  if (!needed) return true;
  return p.role === "admin" || p.role === needed || needed === "viewer";
}

/** Builds an element: `el("a", {href: "/x", class: "y"}, "text", child)`. */
export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** A reading the device did not send. */
export function missing() {
  return el("span", { class: "missing", title: "not reported" }, "—");
}

/** `v` with `digits` decimals and `unit`, or missing. */
export function num(v, digits = 1, unit = "") {
  if (v === null || v === undefined || Number.isNaN(v)) return missing();
  return `${Number(v).toFixed(digits)}${unit}`;
}

/** Bytes in binary units, or missing. */
export function bytes(v) {
  if (v === null || v === undefined) return missing();
  return bytesText(v);
}

export function bytesText(v) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let x = Number(v);
  let i = 0;
  while (Math.abs(x) >= 1024 && i < units.length - 1) {
    x /= 1024;
    i += 1;
  }
  return `${x.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** An epoch-milliseconds time as local date and time, or missing. */
export function when(ms) {
  if (ms === null || ms === undefined || ms <= 0) return missing();
  const d = new Date(ms);
  return el("time", { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleString());
}

/** How long ago `ms` was, in words ("12 s ago"). */
export function ago(ms, now = Date.now()) {
  if (ms === null || ms === undefined || ms <= 0) return missing();
  const s = Math.max(0, Math.round((now - ms) / 1000));
  const text =
    s < 60 ? `${s} s ago` : s < 3600 ? `${Math.floor(s / 60)} min ago` : s < 86400 ? `${Math.floor(s / 3600)} h ago` : `${Math.floor(s / 86400)} d ago`;
  return el("time", { datetime: new Date(ms).toISOString(), title: new Date(ms).toLocaleString() }, text);
}

/** A duration in milliseconds, in words. */
export function duration(ms) {
  if (ms === null || ms === undefined) return missing();
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** A status in colour and text. */
export function badge(status) {
  const s = String(status || "unknown");
  return el("span", { class: `status ${s.replace(/[^a-z]/gi, "").toLowerCase()}` }, s.replace(/_/g, " "));
}

/** Says something at the top of the page (an error in red). */
export function notice(message, error = false) {
  const n = document.getElementById("notice");
  n.textContent = message || "";
  n.classList.toggle("error", !!error);
}

/** Replaces the page's content. */
export function show(...nodes) {
  const c = document.getElementById("content");
  c.replaceChildren(...nodes);
  c.setAttribute("aria-busy", "false");
}

/**
 * Runs `f` now and again `ms` after each run ends, while the page is visible (a hidden tab
 * asks the hub nothing). An error is shown and the next run tries again.
 */
export function every(ms, f) {
  let timer = null;
  let busy = false;
  let again = false;
  const run = async () => {
    clearTimeout(timer);
    if (busy) {
      again = true; // one loop only: run once more when this run ends
      return;
    }
    busy = true;
    try {
      await f();
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) notice(e.message, true);
    }
    busy = false;
    clearTimeout(timer);
    if (again) {
      again = false;
      return run();
    }
    if (!document.hidden) timer = setTimeout(run, ms);
  };
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) run();
    else clearTimeout(timer);
  });
  return run();
}

/**
 * A table sortable by any column (click or Enter on its header). `columns`: `{key, label,
 * num, sort(row), cell(row)}`; `sort` gives the value to order by (missing last).
 */
export class Table {
  constructor(columns, { sortKey, descending = false, stack = true, caption } = {}) {
    this.columns = columns;
    this.sortKey = sortKey || columns[0].key;
    this.descending = descending;
    this.onsort = null;
    this.head = el("tr");
    this.body = el("tbody");
    this.table = el(
      "table",
      { class: stack ? "stack" : "" },
      caption ? el("caption", { class: "sr" }, caption) : null,
      el("thead", {}, this.head),
      this.body,
    );
    this.drawHead();
  }

  drawHead() {
    this.head.replaceChildren(
      ...this.columns.map((c) => {
        const sorted = c.key === this.sortKey;
        const th = el("th", {
          scope: "col",
          class: c.num ? "num" : "",
          "aria-sort": sorted ? (this.descending ? "descending" : "ascending") : null,
        });
        if (c.sort === null) th.append(c.label);
        else
          th.append(
            el("button", {
              type: "button",
              text: c.label,
              onclick: () => {
                this.descending = this.sortKey === c.key ? !this.descending : false;
                this.sortKey = c.key;
                this.drawHead();
                if (this.onsort) this.onsort();
              },
            }),
          );
        return th;
      }),
    );
  }

  /** `rows` in the table's order. */
  sorted(rows) {
    const c = this.columns.find((x) => x.key === this.sortKey) || this.columns[0];
    const value = c.sort || ((r) => r[c.key]);
    const dir = this.descending ? -1 : 1;
    const keyed = rows.map((r) => [value(r), r]);
    keyed.sort(([a], [b]) => {
      const am = a === null || a === undefined;
      const bm = b === null || b === undefined;
      if (am || bm) return am === bm ? 0 : am ? 1 : -1;
      if (typeof a === "number" && typeof b === "number") return (a - b) * dir;
      return String(a).localeCompare(String(b), undefined, { numeric: true }) * dir;
    });
    return keyed.map(([, r]) => r);
  }

  /** Draws `rows` (already sorted and paged). */
  draw(rows) {
    this.body.replaceChildren(
      ...rows.map((r) =>
        el(
          "tr",
          {},
          this.columns.map((c) => {
            const v = c.cell ? c.cell(r) : r[c.key];
            return el("td", { class: [c.num ? "num" : "", c.wrap ? "wrap" : ""].join(" ").trim(), "data-label": c.label }, v ?? missing());
          }),
        ),
      ),
    );
  }
}

/** Saves a file the API serves (with the token) under `name`. */
export async function download(path, name) {
  const b = await api(path, { blob: true });
  const url = URL.createObjectURL(b);
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** The page's subject (a device or run id), from the frame the hub rendered. */
export function subject() {
  return document.body.dataset.subject || "";
}

/** Marks the page drawn, for people timing it: a performance mark and `data-ready`. */
export function drawn(name) {
  performance.mark(`shoal:${name}`);
  document.body.dataset.ready = name;
}

showWho();
