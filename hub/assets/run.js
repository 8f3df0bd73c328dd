// A run: its status and attempts, the chosen attempt's log (followed live, once a second,
// while the run is running), and its artifacts to download.

import { api, badge, download, drawn, duration, el, every, missing, notice, show, subject, when, bytesText } from "./app.js";

const id = subject();
const base = `/api/v1/runs/${encodeURIComponent(id)}`;
let attempt = null; // null: the last
let follow = true;

const facts = el("dl", { class: "facts" });
const log = el("pre", { class: "log", id: "log", tabindex: "0", "aria-label": "Log", "aria-live": "off" });
const attemptSelect = el("select", { id: "attempt", "aria-label": "Attempt" });
const followBox = el("input", { type: "checkbox", id: "follow", checked: true });
const artifacts = el("ul", { id: "artifacts" });

attemptSelect.addEventListener("change", () => {
  attempt = attemptSelect.value ? Number(attemptSelect.value) : null;
  tick().catch((e) => notice(e.message, true));
});
followBox.addEventListener("change", () => {
  follow = followBox.checked;
});

function drawFacts(r) {
  const took = r.started_ms && r.finished_ms ? r.finished_ms - r.started_ms : r.started_ms ? Date.now() - r.started_ms : null;
  const rows = [
    ["Job", el("a", { href: `/ui/jobs?job=${encodeURIComponent(r.job)}` }, r.job)],
    ["Status", badge(r.status)],
    ["Started by", r.manual ? "hand" : "schedule"],
    ["For", when(r.scheduled_ms)],
    ["Started", when(r.started_ms)],
    ["Finished", r.finished_ms ? when(r.finished_ms) : r.status === "running" ? "still running" : missing()],
    ["Duration", duration(took)],
    ["Attempts", r.attempts.length ? r.attempts.map((c, i) => `#${i + 1}: ${c === null ? "killed" : `exit ${c}`}`).join(" · ") : "none yet"],
    ["Why", r.reason || missing()],
  ];
  facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function drawAttempts(n) {
  const have = attemptSelect.options.length;
  if (have === n + 1) return;
  attemptSelect.replaceChildren(el("option", { value: "" }, "the last attempt"), ...Array.from({ length: n }, (_, i) => el("option", { value: i + 1 }, `attempt ${i + 1}`)));
  attemptSelect.value = attempt ? String(attempt) : "";
}

async function drawArtifacts() {
  const a = await api(`${base}/artifacts`);
  artifacts.replaceChildren(
    ...(a.artifacts.length
      ? a.artifacts.map((f) =>
          el(
            "li",
            {},
            el("button", { type: "button", onclick: () => download(`${base}/artifacts/${f.path.split("/").map(encodeURIComponent).join("/")}`, f.path.split("/").pop()).catch((e) => notice(e.message, true)) }, f.path),
            ` ${bytesText(f.bytes)}`,
          ),
        )
      : [el("li", { class: "missing" }, "none")]),
  );
}

let running = true;
let last = "";

async function tick() {
  const r = await api(base);
  drawFacts(r);
  drawAttempts(r.attempts.length + (r.status === "running" ? 1 : 0));
  running = r.status === "running";
  const q = attempt ? `?attempt=${attempt}` : "";
  let text = "";
  try {
    text = await api(`${base}/logs${q}`, { text: true });
  } catch (e) {
    if (e.status !== 400) throw e; // an attempt that has not started yet has no log
  }
  if (text !== last) {
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = text || "(nothing written yet)";
    last = text;
    if (follow && atEnd) log.scrollTop = log.scrollHeight;
  }
  log.dataset.state = running ? "following" : "done";
  if (!running) await drawArtifacts();
}

let first = true;
every(1_000, async () => {
  if (!first && !running) return;
  await tick();
  if (first) {
    show(
      facts,
      el("h2", {}, "Log"),
      el("div", { class: "bar" }, attemptSelect, el("label", {}, followBox, " follow the end")),
      log,
      el("h2", {}, "Artifacts"),
      artifacts,
    );
    if (running) artifacts.replaceChildren(el("li", { class: "missing" }, "listed when the run ends"));
    drawn("run");
  }
  notice(running ? "Running: the log follows live." : "");
  first = false;
});
