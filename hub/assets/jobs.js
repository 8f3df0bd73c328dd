// Jobs and runs: the CronJobs with their schedule, next run and state, with Run now and
// Suspend/Resume for a role allowed to (scientist, admin); the runs with status, attempts and
// duration, each linking to its page (logs, artifacts). Refreshed every 5 s.

import { Table, api, badge, drawn, duration, el, every, may, missing, notice, show, when } from "./app.js";

const params = new URLSearchParams(location.search);
let only = params.get("job") || "";
let canRun = false;
let canSuspend = false;

async function act(path, what) {
  try {
    const r = await api(path, { method: "POST" });
    if (r.run) {
      location.href = `/ui/runs/${encodeURIComponent(r.run)}`;
      return;
    }
    notice(what);
    await refresh();
  } catch (e) {
    notice(e.message, true);
  }
}

const jobs = new Table(
  [
    { key: "name", label: "Job", cell: (j) => el("a", { href: `?job=${encodeURIComponent(j.name)}`, title: "Show only its runs" }, j.name) },
    { key: "schedule", label: "Schedule", cell: (j) => el("code", {}, j.schedule) },
    { key: "time_zone", label: "Time zone" },
    { key: "next_schedule_ms", label: "Next run", sort: (j) => (j.suspend ? null : j.next_schedule_ms), cell: (j) => (j.suspend ? "suspended" : when(j.next_schedule_ms)) },
    { key: "last_schedule_ms", label: "Last scheduled", cell: (j) => when(j.last_schedule_ms) },
    { key: "concurrency_policy", label: "Concurrency" },
    {
      key: "actions",
      label: "Actions",
      sort: null,
      cell: (j) => {
        const enc = encodeURIComponent(j.name);
        return el(
          "span",
          { class: "bar" },
          canRun && el("button", { type: "button", class: "primary", "data-run": j.name, onclick: () => act(`/api/v1/jobs/${enc}/run`) }, "Run now"),
          canSuspend &&
            (j.suspend
              ? el("button", { type: "button", onclick: () => act(`/api/v1/jobs/${enc}/resume`, `${j.name} resumed.`) }, "Resume")
              : el("button", { type: "button", onclick: () => act(`/api/v1/jobs/${enc}/suspend`, `${j.name} suspended.`) }, "Suspend")),
          !canRun && !canSuspend && missing(),
        );
      },
    },
  ],
  { caption: "Jobs" },
);

const took = (r) => (r.started_ms && r.finished_ms ? r.finished_ms - r.started_ms : r.started_ms && r.status === "running" ? Date.now() - r.started_ms : null);

const runs = new Table(
  [
    { key: "id", label: "Run", cell: (r) => el("a", { href: `/ui/runs/${encodeURIComponent(r.id)}` }, r.id) },
    { key: "job", label: "Job" },
    { key: "status", label: "Status", cell: (r) => badge(r.status) },
    { key: "manual", label: "Started by", sort: (r) => (r.manual ? 1 : 0), cell: (r) => (r.manual ? "hand" : "schedule") },
    { key: "attempts", label: "Attempts", num: true, sort: (r) => r.attempts.length, cell: (r) => (r.attempts.length ? `${r.attempts.length} (exit ${r.attempts.map((c) => (c === null ? "killed" : c)).join(", ")})` : "0") },
    { key: "scheduled_ms", label: "For", num: true, cell: (r) => when(r.scheduled_ms) },
    { key: "started_ms", label: "Started", num: true, cell: (r) => when(r.started_ms) },
    { key: "took", label: "Duration", num: true, sort: took, cell: (r) => duration(took(r)) },
    { key: "reason", label: "Why", wrap: true, cell: (r) => r.reason || "" },
  ],
  { sortKey: "scheduled_ms", descending: true, caption: "Runs" },
);

const runsTitle = el("h2", {}, "Runs");
const empty = el("p", { class: "missing" });
let jobList = [];
let runList = [];

async function refresh() {
  const q = only ? `?job=${encodeURIComponent(only)}` : "";
  const [j, r] = await Promise.all([api("/api/v1/jobs"), api(`/api/v1/runs${q}`)]);
  jobList = j.jobs;
  runList = r.runs;
  jobs.draw(jobs.sorted(jobList));
  runs.draw(runs.sorted(runList));
  runsTitle.replaceChildren(only ? `Runs of ${only} ` : "Runs ", only ? el("a", { href: "/ui/jobs" }, "(all jobs)") : "");
  empty.textContent = jobList.length ? "" : "No job yet. Apply a CronJob manifest with `shoal jobs apply FILE`.";
}

jobs.onsort = () => jobs.draw(jobs.sorted(jobList));
runs.onsort = () => runs.draw(runs.sorted(runList));

let first = true;
every(5_000, async () => {
  if (first) {
    [canRun, canSuspend] = await Promise.all([may("post", "/api/v1/jobs/{name}/run"), may("post", "/api/v1/jobs/{name}/suspend")]);
  }
  await refresh();
  if (first) {
    show(el("h2", {}, "Jobs"), empty, el("div", { class: "scroll" }, jobs.table), runsTitle, el("div", { class: "scroll" }, runs.table));
    drawn("jobs");
  }
  first = false;
});
