// Models: MLflow's registry as the hub sees it, each version with its run's metrics and the
// dataset it trained on (GET /api/v1/models/registry); what the hub serves and where
// (GET /api/v1/models/deployments), whether each model
// file is in the provenance ledger and anchored on chain (GET /api/v1/provenance), the ledger's
// entries with what they name (models, dataset manifests), and the anomaly alerts, which a
// role allowed to (operator, admin) can acknowledge.

import { Table, api, badge, drawn, el, every, may, missing, notice, num, show, when } from "./app.js";

let ledger = { entries: [], chain: { intact: true } };
let canAck = false;

function provenanceOf(sha) {
  const hit = ledger.entries.find((e) => e.subjects.some((s) => s.sha256 === sha));
  if (!hit) return el("span", { class: "flag" }, "not in the ledger");
  const a = hit.anchor;
  const anchored = !a ? "not anchored" : a.state === "anchored" ? `anchored${a.anchor?.block_number ? ` in block ${a.anchor.block_number}` : ""}` : a.state;
  return `entry #${hit.index} · ${anchored}`;
}

const deployments = new Table(
  [
    { key: "name", label: "Model" },
    { key: "version", label: "Version" },
    { key: "to", label: "Served", cell: (d) => (d.to === "embedded" ? el("code", {}, `/v2/models/${d.name}`) : d.endpoint || d.to) },
    { key: "provenance", label: "Provenance", sort: null, cell: (d) => provenanceOf(d.sha256) },
    { key: "target", label: "Predicts", cell: (d) => d.target || missing() },
    { key: "features", label: "Reads", wrap: true, sort: (d) => d.features.length, cell: (d) => (d.features.length ? d.features.join(", ") : missing()) },
    { key: "threshold", label: "Alert above", num: true, cell: (d) => num(d.threshold, 2) },
    { key: "deployed_ms", label: "Deployed", cell: (d) => when(d.deployed_ms) },
    { key: "deployed_by", label: "By" },
    { key: "sha256", label: "File SHA-256", cell: (d) => el("code", { title: d.sha256 }, d.sha256.slice(0, 12)) },
  ],
  { caption: "Deployed models" },
);

const entries = new Table(
  [
    { key: "index", label: "#", num: true, cell: (e) => String(e.index) },
    { key: "time_ms", label: "Recorded", cell: (e) => when(e.time_ms) },
    { key: "subjects", label: "Subjects", wrap: true, sort: (e) => e.subjects.map((s) => s.name).join(","), cell: (e) => e.subjects.map((s) => el("div", {}, s.name, " ", el("code", { title: s.sha256 }, s.sha256.slice(0, 12)))) },
    { key: "key_id", label: "Signed by key", cell: (e) => el("code", {}, e.key_id) },
    { key: "by", label: "Recorded by" },
    { key: "anchor", label: "On chain", sort: (e) => e.anchor?.state ?? null, cell: (e) => (e.anchor ? `${e.anchor.state}${e.anchor.anchor?.block_number ? ` (block ${e.anchor.anchor.block_number})` : ""}` : missing()) },
  ],
  { sortKey: "index", descending: true, caption: "Provenance ledger" },
);

async function ack(id) {
  try {
    await api(`/api/v1/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" });
    await refresh();
  } catch (e) {
    notice(e.message, true);
  }
}

const alerts = new Table(
  [
    { key: "device_id", label: "Device", cell: (a) => el("a", { href: `/ui/devices/${encodeURIComponent(a.device_id)}` }, a.device_id) },
    { key: "state", label: "State", cell: (a) => badge(a.state) },
    { key: "peak_score", label: "Peak score", num: true, cell: (a) => num(a.peak_score, 2) },
    { key: "last_score", label: "Last score", num: true, cell: (a) => num(a.last_score, 2) },
    { key: "threshold", label: "Threshold", num: true, cell: (a) => num(a.threshold, 2) },
    { key: "model", label: "Model", cell: (a) => `${a.model} v${a.version}` },
    { key: "opened_ms", label: "Opened", cell: (a) => when(a.opened_ms) },
    { key: "acknowledged_by", label: "Acknowledged", cell: (a) => (a.acknowledged_by ? `${a.acknowledged_by}` : canAck && !a.resolved_ms ? el("button", { type: "button", onclick: () => ack(a.id) }, "Acknowledge") : missing()) },
  ],
  { sortKey: "opened_ms", descending: true, caption: "Alerts" },
);

const registryNote = el("p", { class: "missing" });
const registryBox = el("div", { id: "registry" });
let deployedList = [];

function metricsOf(v) {
  const m = Object.entries(v.metrics);
  if (!m.length) return missing();
  return m.map(([k, x]) => el("div", {}, `${k} `, el("strong", {}, Number(x).toPrecision(4))));
}

function datasetOf(v) {
  const uri = v.tags["shoal.dataset_uri"];
  const sha = v.tags["shoal.dataset_sha256"];
  if (!uri && !sha) return missing();
  const rows = v.params.dataset_rows;
  const files = v.params.dataset_files;
  return el(
    "div",
    {},
    uri ? el("div", {}, el("code", {}, uri)) : null,
    sha ? el("div", {}, "manifest ", el("code", { title: sha }, sha.slice(0, 12))) : null,
    rows ? el("div", {}, `${Number(rows).toLocaleString()} rows${files ? ` in ${files} files` : ""}`) : null,
  );
}

function drawRegistry(r) {
  if (!r.tracking_uri) {
    registryNote.textContent = "This hub has no MLflow tracking server (--mlflow-tracking-uri), so no registry to show.";
    registryBox.replaceChildren();
    return;
  }
  registryNote.textContent = r.models.length ? `From ${r.tracking_uri}.` : `No model is registered in ${r.tracking_uri} yet.`;
  registryBox.replaceChildren(
    ...r.models.map((m) => {
      const t = new Table(
        [
          { key: "version", label: "Version", num: true, sort: (v) => Number(v.version) },
          { key: "status", label: "Status", cell: (v) => v.status.toLowerCase().replace(/_/g, " ") },
          { key: "created_ms", label: "Registered", cell: (v) => when(v.created_ms) },
          { key: "metrics", label: "Metrics", wrap: true, sort: null, cell: metricsOf },
          { key: "dataset", label: "Trained on", wrap: true, sort: (v) => v.tags["shoal.dataset_uri"] ?? null, cell: datasetOf },
          {
            key: "deployed",
            label: "Deployed",
            sort: null,
            cell: (v) => {
              const d = deployedList.find((x) => x.name === m.name && x.version === v.version);
              return d ? (d.to === "embedded" ? el("code", {}, `/v2/models/${d.name}`) : d.endpoint || d.to) : "no";
            },
          },
        ],
        { sortKey: "version", descending: true, caption: `Versions of ${m.name}` },
      );
      t.draw(t.sorted(m.versions));
      t.onsort = () => t.draw(t.sorted(m.versions));
      return el("section", { "data-model": m.name }, el("h3", {}, m.name), m.description ? el("p", {}, m.description) : null, el("div", { class: "scroll" }, t.table));
    }),
  );
}

const scoring = el("p", { class: "missing" });
const chain = el("p");
let lists = { deployments: [], entries: [], alerts: [] };

async function refresh() {
  const [d, l, a, r] = await Promise.all([
    api("/api/v1/models/deployments"),
    api("/api/v1/provenance").catch((e) => ({ entries: [], chain: { intact: true }, unavailable: e.message })),
    api("/api/v1/alerts"),
    api("/api/v1/models/registry").catch((e) => ({ tracking_uri: "the registry", models: [], error: e.message })),
  ]);
  ledger = l;
  deployedList = d.deployments;
  drawRegistry(r);
  if (r.error) registryNote.replaceChildren(el("span", { class: "flag" }, r.error));
  lists = { deployments: d.deployments, entries: l.entries, alerts: a.alerts };
  deployments.draw(deployments.sorted(lists.deployments));
  entries.draw(entries.sorted(lists.entries));
  alerts.draw(alerts.sorted(lists.alerts));
  scoring.textContent = d.deployments.length
    ? d.scoring_model ? `The fleet is scored with ${d.scoring_model}.` : "Scoring is off on this hub."
    : "No model is deployed. Deploy one with `shoal models deploy NAME`.";
  chain.replaceChildren(
    l.unavailable
      ? el("span", { class: "missing" }, l.unavailable)
      : l.chain.intact
        ? `The ledger holds ${l.entries.length} ${l.entries.length === 1 ? "entry" : "entries"}, each following from the one before (checked now).`
        : el("span", { class: "flag" }, `The ledger is broken at entry ${l.chain.broken_at}: ${l.chain.reason}`),
  );
}

deployments.onsort = () => deployments.draw(deployments.sorted(lists.deployments));
entries.onsort = () => entries.draw(entries.sorted(lists.entries));
alerts.onsort = () => alerts.draw(alerts.sorted(lists.alerts));

let first = true;
every(10_000, async () => {
  if (first) canAck = await may("post", "/api/v1/alerts/{id}/ack");
  await refresh();
  if (first) {
    show(
      el("h2", {}, "Registered"),
      registryNote,
      registryBox,
      el("h2", {}, "Deployed"),
      scoring,
      el("div", { class: "scroll" }, deployments.table),
      el("h2", {}, "Alerts"),
      el("div", { class: "scroll" }, alerts.table),
      el("h2", {}, "Provenance"),
      chain,
      el("div", { class: "scroll" }, entries.table),
    );
    drawn("models");
  }
  first = false;
});
