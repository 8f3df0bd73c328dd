// Fleet: every device with its status and newest readings (GET /api/v1/devices), counts by
// status, filters by status and label, search by id, sort by any column, one page of rows at a
// time, refreshed every 10 s without reloading. The filters live in the address, so a view can
// be bookmarked or shared.

import { Table, ago, badge, bytesText, drawn, el, every, missing, notice, num, show, api } from "./app.js";

const STATUSES = ["online", "stale", "offline"];
const params = new URLSearchParams(location.search);
const state = {
  q: params.get("q") || "",
  status: params.get("status") || "",
  label: params.get("label") || "",
  page: Math.max(0, Number(params.get("page") || 1) - 1),
  size: Number(params.get("size")) || 100,
};
let devices = [];
let now = Date.now();

function memory(d) {
  const l = d.latest;
  if (!l || l.memory_used_bytes === null || l.memory_total_bytes === null) return missing();
  const pct = l.memory_total_bytes > 0 ? (100 * l.memory_used_bytes) / l.memory_total_bytes : null;
  return el("span", { title: `${bytesText(l.memory_used_bytes)} of ${bytesText(l.memory_total_bytes)}` }, pct === null ? bytesText(l.memory_used_bytes) : `${pct.toFixed(0)}%`);
}

function memoryShare(d) {
  const l = d.latest;
  if (!l || !l.memory_total_bytes || l.memory_used_bytes === null) return null;
  return l.memory_used_bytes / l.memory_total_bytes;
}

function throttling(d) {
  const t = d.latest?.throttling;
  if (t === null || t === undefined) return missing();
  if (t.length === 0) return "none";
  return el("span", { class: "flag" }, t.join(", "));
}

const latest = (key) => (d) => d.latest?.[key] ?? null;

const table = new Table(
  [
    { key: "device_id", label: "Device", cell: (d) => el("a", { href: `/ui/devices/${encodeURIComponent(d.device_id)}` }, d.device_id) },
    { key: "status", label: "Status", sort: (d) => STATUSES.indexOf(d.status), cell: (d) => badge(d.status) },
    { key: "last_seen_ms", label: "Last seen", num: true, sort: (d) => -d.last_seen_ms, cell: (d) => ago(d.last_seen_ms, now) },
    { key: "arch", label: "Arch", cell: (d) => d.arch || missing() },
    { key: "hardware_model", label: "Board", cell: (d) => d.hardware_model || missing() },
    { key: "agent_version", label: "Agent", cell: (d) => d.agent_version || missing() },
    {
      key: "labels",
      label: "Labels",
      wrap: true,
      sort: (d) => Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(","),
      cell: (d) => Object.entries(d.labels || {}).map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`)),
    },
    { key: "cpu", label: "CPU", num: true, sort: latest("cpu_percent"), cell: (d) => num(d.latest?.cpu_percent, 0, "%") },
    { key: "memory", label: "Memory", num: true, sort: memoryShare, cell: memory },
    { key: "soc", label: "SoC °C", num: true, sort: latest("soc_temperature_celsius"), cell: (d) => num(d.latest?.soc_temperature_celsius, 1) },
    { key: "gpu", label: "GPU °C", num: true, sort: latest("gpu_temperature_celsius"), cell: (d) => num(d.latest?.gpu_temperature_celsius, 0) },
    { key: "throttling", label: "Throttling", sort: (d) => d.latest?.throttling?.join(",") ?? null, cell: throttling },
    { key: "anomaly", label: "Anomaly", num: true, sort: (d) => (d.anomaly ? -d.anomaly.score : null), cell: (d) => (d.anomaly ? num(d.anomaly.score, 2) : missing()) },
  ],
  { sortKey: params.get("sort") || "device_id", descending: params.get("desc") === "1", caption: "Devices" },
);

const search = el("input", { type: "search", id: "q", placeholder: "device id or host", value: state.q, "aria-label": "Search by device id or host name", autocomplete: "off" });
const statusSelect = el("select", { id: "status", "aria-label": "Status" }, el("option", { value: "" }, "any status"), STATUSES.map((s) => el("option", { value: s }, s)));
const labelSelect = el("select", { id: "label", "aria-label": "Label" }, el("option", { value: "" }, "any label"));
const sizeSelect = el("select", { id: "size", "aria-label": "Rows per page" }, [50, 100, 500].map((n) => el("option", { value: n }, `${n} per page`)));
statusSelect.value = state.status;
sizeSelect.value = String(state.size);
const counts = el("ul", { class: "counts", "aria-label": "Devices by status" });
const shown = el("p", { id: "shown", class: "missing", "aria-live": "polite" });
const pager = el("div", { class: "pager" });

function remember() {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.status) p.set("status", state.status);
  if (state.label) p.set("label", state.label);
  if (state.page) p.set("page", state.page + 1);
  if (state.size !== 100) p.set("size", state.size);
  if (table.sortKey !== "device_id") p.set("sort", table.sortKey);
  if (table.descending) p.set("desc", "1");
  const q = p.toString();
  history.replaceState(null, "", q ? `?${q}` : location.pathname);
}

function matches(d) {
  if (state.status && d.status !== state.status) return false;
  if (state.label) {
    const at = state.label.indexOf("=");
    const [k, v] = [state.label.slice(0, at), state.label.slice(at + 1)];
    if ((d.labels || {})[k] !== v) return false;
  }
  if (state.q) {
    const q = state.q.toLowerCase();
    if (!d.device_id.toLowerCase().includes(q) && !(d.hostname || "").toLowerCase().includes(q)) return false;
  }
  return true;
}

function drawCounts() {
  const by = { online: 0, stale: 0, offline: 0 };
  for (const d of devices) by[d.status] = (by[d.status] || 0) + 1;
  counts.replaceChildren(
    el("li", {}, el("strong", {}, devices.length.toLocaleString()), "devices"),
    ...STATUSES.map((s) => el("li", { "data-status": s }, el("strong", {}, by[s].toLocaleString()), badge(s))),
  );
}

function drawLabels() {
  const all = new Set();
  for (const d of devices) for (const [k, v] of Object.entries(d.labels || {})) all.add(`${k}=${v}`);
  const want = [...all].sort();
  const have = [...labelSelect.options].slice(1).map((o) => o.value);
  if (want.join("\n") !== have.join("\n")) {
    labelSelect.replaceChildren(el("option", { value: "" }, "any label"), want.map((l) => el("option", { value: l }, l)));
  }
  labelSelect.value = state.label;
}

function draw() {
  const rows = table.sorted(devices.filter(matches));
  const pages = Math.max(1, Math.ceil(rows.length / state.size));
  state.page = Math.min(state.page, pages - 1);
  const start = state.page * state.size;
  table.draw(rows.slice(start, start + state.size));
  shown.textContent = rows.length
    ? `Showing ${(start + 1).toLocaleString()}–${Math.min(start + state.size, rows.length).toLocaleString()} of ${rows.length.toLocaleString()}${rows.length < devices.length ? ` (filtered from ${devices.length.toLocaleString()})` : ""}`
    : devices.length
      ? "No device matches these filters."
      : "No device has reported to this hub yet. Start one with `shoal-agent --hub URL`.";
  const go = (p) => () => {
    state.page = p;
    draw();
  };
  pager.replaceChildren(
    el("button", { type: "button", disabled: state.page === 0, onclick: go(state.page - 1) }, "← Previous"),
    el("span", {}, `Page ${state.page + 1} of ${pages}`),
    el("button", { type: "button", disabled: state.page >= pages - 1, onclick: go(state.page + 1) }, "Next →"),
  );
  remember();
}

table.onsort = () => {
  state.page = 0;
  draw();
};
search.addEventListener("input", () => {
  state.q = search.value.trim();
  state.page = 0;
  draw();
});
statusSelect.addEventListener("change", () => {
  state.status = statusSelect.value;
  state.page = 0;
  draw();
});
labelSelect.addEventListener("change", () => {
  state.label = labelSelect.value;
  state.page = 0;
  draw();
});
sizeSelect.addEventListener("change", () => {
  state.size = Number(sizeSelect.value);
  state.page = 0;
  draw();
});
// "/" jumps to the search box, as on many sites.
document.addEventListener("keydown", (e) => {
  if (e.key === "/" && document.activeElement?.tagName !== "INPUT") {
    e.preventDefault();
    search.focus();
  }
});

let first = true;
every(10_000, async () => {
  const list = await api("/api/v1/devices");
  devices = list.devices;
  now = Date.now();
  if (first) {
    show(
      counts,
      el("div", { class: "bar", role: "search" }, search, statusSelect, labelSelect, sizeSelect),
      shown,
      el("div", { class: "scroll" }, table.table),
      pager,
    );
  }
  drawCounts();
  drawLabels();
  draw();
  notice(`Updated ${new Date(now).toLocaleTimeString()}; refreshes every 10 s.`);
  if (first) drawn("fleet");
  first = false;
});
