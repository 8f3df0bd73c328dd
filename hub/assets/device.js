// Device: identity and hardware from its hello, what the hub has stored of it, charts of its
// metrics over a chosen window from the downsampled series endpoint (one bucket per pixel or
// coarser, on whole minutes or hours so the hub answers from its rollups), and the raw newest
// sample. GET /api/v1/devices/{id} and /api/v1/devices/{id}/series only.

import { ago, api, badge, bytesText, drawn, el, every, missing, notice, num, show, subject, when } from "./app.js";

const id = subject();
const base = `/api/v1/devices/${encodeURIComponent(id)}`;
const WINDOWS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
const COLOURS = ["#2f9ec4", "#e07b1a", "#3fa35b", "#9467d8", "#d9534f", "#c9a227", "#6b7c93", "#d35fb7"];
const params = new URLSearchParams(location.search);
let windowName = params.get("from") ? "custom" : Object.hasOwn(WINDOWS, params.get("window") || "") ? params.get("window") : "1h";
let custom = { from: Number(params.get("from")) || Date.now() - 3600e3, to: Number(params.get("to")) || Date.now() };
let charts = [];
let shape = null;

const facts = el("div", { class: "cols" });
const chartBox = el("div", { class: "charts", id: "charts" });
const raw = el("pre", { class: "raw", id: "raw" });
const windowBar = el("div", { class: "bar", role: "group", "aria-label": "Time window" });

/** The charts a sample's sections call for: title, unit, and metrics with their legends. */
function groups(s) {
  const g = [];
  const labelled = (name, label, value) => `${name}{${label}="${value}"}`;
  if (s.cpu) g.push({ title: "CPU", unit: "%", series: [["cpu_percent", "total"]] });
  if (s.load) {
    const l = [["load1", "1 min"]];
    if (s.load.five !== null) l.push(["load5", "5 min"]);
    if (s.load.fifteen !== null) l.push(["load15", "15 min"]);
    g.push({ title: "Load average", unit: "", series: l });
  }
  if (s.memory) g.push({ title: "Memory", unit: "B", series: [["memory_used_bytes", "used"], ["memory_total_bytes", "total"]] });
  if (s.disks?.length) g.push({ title: "Disk used", unit: "B", series: s.disks.map((d) => [labelled("disk_used_bytes", "mount", d.mount_point), d.mount_point]) });
  if (s.networks?.length)
    g.push({
      title: "Network",
      unit: "B/s",
      series: s.networks.flatMap((n) => [
        [labelled("net_rx_bytes_per_second", "iface", n.name), `${n.name} in`],
        [labelled("net_tx_bytes_per_second", "iface", n.name), `${n.name} out`],
      ]),
    });
  const temps = (s.temperatures || []).map((t) => [labelled("temperature_celsius", "sensor", t.sensor), t.sensor]);
  if (s.pi) temps.push(["pi_soc_temperature_celsius", "Pi SoC"]);
  for (const gpu of s.gpus || []) temps.push([labelled("gpu_temperature_celsius", "gpu", gpu.index), `GPU ${gpu.index}`]);
  if (temps.length) g.push({ title: "Temperatures", unit: "°C", series: temps });
  if (s.gpus?.length) {
    const each = (name) => s.gpus.map((x) => [labelled(name, "gpu", x.index), `GPU ${x.index}`]);
    g.push({ title: "GPU utilisation", unit: "%", series: each("gpu_utilization_percent") });
    g.push({ title: "GPU memory used", unit: "B", series: each("gpu_memory_used_bytes") });
    g.push({ title: "GPU power", unit: "W", series: each("gpu_power_watts") });
  }
  if (s.pi)
    g.push({
      title: "Pi throttling (1: happening)",
      unit: "",
      pick: "max",
      series: ["under_voltage", "arm_frequency_capped", "throttled", "soft_temperature_limit"].map((f) => [labelled("pi_throttle", "flag", f), f.replace(/_/g, " ")]),
    });
  return g;
}

function formatter(unit) {
  if (unit === "B") return (v) => (v === null ? "—" : bytesText(v));
  if (unit === "B/s") return (v) => (v === null ? "—" : `${bytesText(v)}/s`);
  const digits = (v) => (v === 0 || Math.abs(v) >= 10 ? 0 : Math.abs(v) >= 1 ? 1 : 2);
  return (v) => (v === null ? "—" : `${Number(v).toFixed(digits(v))}${unit ? ` ${unit}` : ""}`);
}

/** The window as epoch ms. */
function span() {
  if (windowName === "custom") return { from: custom.from, to: custom.to };
  const to = Date.now();
  return { from: to - WINDOWS[windowName], to };
}

/**
 * A bucket width that gives at most one point per pixel, on whole seconds, minutes or hours
 * (from a quarter of an hour up, whole hours: the hub then reads its hour rollups, 60 times
 * fewer rows than minutes, for at most four pixels a point).
 */
function stepFor(ms, px) {
  let s = Math.max(1, Math.ceil(ms / 1000 / Math.max(100, px)));
  if (s >= 900) s = Math.ceil(s / 3600) * 3600;
  else if (s >= 60) s = Math.ceil(s / 60) * 60;
  return s;
}

async function series(metric, from, to, step) {
  const q = new URLSearchParams({ metric, from: String(from), to: String(to), step: `${step}s` });
  return api(`${base}/series?${q}`);
}

async function drawCharts() {
  if (!shape) return;
  const wanted = groups(shape);
  // The figures first, so that their width (one, two or three to a row) sets the resolution.
  const figs = wanted.map((g) => el("figure", { class: "chart", "data-title": g.title }, el("figcaption", {}, g.title)));
  const old = charts;
  charts = [];
  chartBox.replaceChildren(...figs);
  for (const c of old) c.destroy();
  if (!figs.length) {
    chartBox.replaceChildren(el("p", { class: "missing" }, "This device has sent no metrics to chart."));
    return;
  }
  const width = Math.max(200, figs[0].clientWidth - 22);
  const { from: wantFrom, to } = span();
  const step = stepFor(to - wantFrom, width);
  const from = Math.floor(wantFrom / (step * 1000)) * step * 1000;
  chartBox.dataset.step = String(step);
  const answers = await Promise.all(wanted.map((g) => Promise.all(g.series.map(([m]) => series(m, from, to, step)))));
  const style = getComputedStyle(document.documentElement);
  const ink = style.getPropertyValue("--muted").trim();
  const grid = style.getPropertyValue("--grid").trim();
  wanted.forEach((g, i) => {
    const fig = figs[i];
    const pick = g.pick || "avg";
    const times = [...new Set(answers[i].flatMap((a) => a.points.map((p) => p.t)))].sort((a, b) => a - b);
    const at = new Map(times.map((t, k) => [t, k]));
    const ys = answers[i].map((a) => {
      const y = new Array(times.length).fill(null);
      for (const p of a.points) y[at.get(p.t)] = p[pick];
      return y;
    });
    const points = ys.reduce((n, y) => n + y.filter((v) => v !== null).length, 0);
    fig.dataset.points = String(points);
    if (!points) {
      fig.append(el("p", { class: "empty" }, "No samples in this window."));
      return;
    }
    const fmt = formatter(g.unit);
    const opts = {
      width,
      height: 200,
      // The whole window, however little of it has samples.
      scales: { x: { time: true, range: [from / 1000, to / 1000] } },
      legend: { live: true },
      cursor: { points: { show: false } },
      axes: [
        { stroke: ink, grid: { stroke: grid }, ticks: { stroke: grid } },
        { stroke: ink, grid: { stroke: grid }, ticks: { stroke: grid }, size: 86, values: (u, vals) => vals.map(fmt) },
      ],
      series: [{}, ...g.series.map(([, label], k) => ({ label, stroke: COLOURS[k % COLOURS.length], width: 1.5, value: (u, v) => fmt(v) }))],
    };
    charts.push(new uPlot(opts, [times.map((t) => t / 1000), ...ys], fig));
  });
}

function identity(d) {
  const labels = Object.entries(d.labels || {});
  const rows = [
    ["Status", badge(d.status)],
    ["Last seen", el("span", {}, ago(d.last_seen_ms), " · ", when(d.last_seen_ms))],
    ["First seen", when(d.first_seen_ms)],
    ["Host name", d.hostname || missing()],
    ["Board", d.hardware_model || missing()],
    ["Architecture", d.arch || missing()],
    ["OS", d.os || missing()],
    ["Kernel", d.kernel || missing()],
    ["Agent", d.agent_version || missing()],
    ["GPU driver", d.gpu_driver_version || missing()],
    ["CUDA", d.cuda_version || missing()],
    ["Labels", labels.length ? labels.map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`)) : missing()],
    ["Anomaly", d.anomaly ? `${num(d.anomaly.score, 2)} (${d.anomaly.target}, model ${d.anomaly.model} v${d.anomaly.version})` : missing()],
  ];
  return facts_("Identity and hardware", rows);
}

function ingest(d) {
  const s = d.stored;
  const rows = [
    ["Stored up to seq", String(d.stored_up_to_seq)],
    ["Seqs stored", s ? `${s.first_seq}–${s.last_seq} (${s.samples.toLocaleString()} samples)` : missing()],
    ["Gaps", s ? (s.missing === 0 ? "none" : el("span", { class: "flag" }, `${s.missing.toLocaleString()} seqs never arrived`)) : missing()],
    ["Newest sample taken", d.latest_sample ? when(d.latest_sample.timestamp_ms) : missing()],
  ];
  return facts_("Ingest", rows);
}

function facts_(title, rows) {
  return el("section", {}, el("h2", {}, title), el("dl", { class: "facts" }, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
}

function drawWindowBar() {
  const choices = [...Object.keys(WINDOWS), "custom"].map((w) =>
    el("button", {
      type: "button",
      class: w === windowName ? "primary" : "",
      "aria-pressed": String(w === windowName),
      onclick: () => {
        windowName = w;
        remember();
        drawWindowBar();
        if (w !== "custom") drawCharts().catch((e) => notice(e.message, true));
      },
    }, w === "custom" ? "Custom…" : `Last ${w}`),
  );
  const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60e3).toISOString().slice(0, 16);
  const from = el("input", { type: "datetime-local", "aria-label": "From", value: local(custom.from) });
  const to = el("input", { type: "datetime-local", "aria-label": "To", value: local(custom.to) });
  const apply = el("button", {
    type: "button",
    onclick: () => {
      const f = new Date(from.value).getTime();
      const t = new Date(to.value).getTime();
      if (!(f < t)) return notice("The window's start must be before its end.", true);
      custom = { from: f, to: t };
      remember();
      drawCharts().catch((e) => notice(e.message, true));
    },
  }, "Show");
  windowBar.replaceChildren(...choices, ...(windowName === "custom" ? [el("label", {}, "from ", from), el("label", {}, "to ", to), apply] : []));
}

function remember() {
  const p = new URLSearchParams();
  if (windowName === "custom") {
    p.set("from", custom.from);
    p.set("to", custom.to);
  } else if (windowName !== "1h") p.set("window", windowName);
  const q = p.toString();
  history.replaceState(null, "", q ? `?${q}` : location.pathname);
}

let first = true;
let chartsAt = 0;
every(10_000, async () => {
  const d = await api(base);
  const newShape = d.latest_sample;
  facts.replaceChildren(identity(d), ingest(d));
  raw.textContent = d.latest_sample ? JSON.stringify(d.latest_sample, null, 2) : "No sample stored yet.";
  if (first) {
    drawWindowBar();
    show(
      facts,
      el("h2", {}, "Charts"),
      windowBar,
      chartBox,
      el("details", { id: "raw-sample" }, el("summary", {}, "Newest sample, as the API returns it"), raw),
    );
  }
  const grew = JSON.stringify(groups(newShape || {})) !== JSON.stringify(groups(shape || {}));
  shape = newShape;
  // Charts: on the first load, when the device's sections change, and each minute for a
  // window that ends now.
  if (first || grew || (windowName !== "custom" && Date.now() - chartsAt > 60e3)) {
    await drawCharts();
    chartsAt = Date.now();
    if (!shape) chartBox.replaceChildren(el("p", { class: "missing" }, "No sample stored yet."));
  }
  notice(`Updated ${new Date().toLocaleTimeString()}.`);
  if (first) drawn("device");
  first = false;
});

let resizing = null;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => drawCharts().catch((e) => notice(e.message, true)), 200);
});
