// The console: reads the JSON API every two seconds and renders it. Every value from the API
// is set as text, never parsed as HTML: job URLs and host ids come from whoever sent them.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("access_token") || sessionStorage.getItem("damselfly-token");
if (params.get("access_token")) {
  sessionStorage.setItem("damselfly-token", params.get("access_token"));
  // Out of the address bar and the history.
  params.delete("access_token");
  history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
}

async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.errors || resp.status + " " + resp.statusText);
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? wrapCell(c) : el("td", c));
  return tr;
}

function wrapCell(node) {
  if (node.tagName === "TD") return node;
  const td = document.createElement("td");
  td.appendChild(node);
  return td;
}

function fill(table, rows, empty) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = el("td", empty);
    td.colSpan = document.querySelectorAll(table + " thead th").length;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function bar(parts, total) {
  const b = el("div", null, "bar");
  for (const [value, cls] of parts) {
    const s = el("span", null, cls);
    s.style.width = (total > 0 ? (100 * value) / total : 0) + "%";
    b.appendChild(s);
  }
  return b;
}

// Failed blobs of jobs that have some, read from each job's detail (lists carry sums only).
const failures = new Map();

function jobProgress(job) {
  const td = document.createElement("td");
  const sum = job.summary;
  td.appendChild(bar([[sum.bytes_held, "done"]], sum.bytes));
  td.appendChild(el("div", sum.held + " / " + sum.blobs + " blobs · " + bytes(sum.bytes_held) + " of " + bytes(sum.bytes)));
  const failed = failures.get(job.id) || [];
  if (job.error || failed.length) {
    const list = el("ul", null, "failures");
    if (job.error) list.appendChild(el("li", job.error));
    for (const b of failed) list.appendChild(el("li", (b.platform ? b.platform + " " : "") + b.digest.slice(0, 19) + ": " + b.error));
    td.appendChild(list);
  }
  return td;
}

function ago(secs) {
  if (secs < 60) return secs + " s ago";
  if (secs < 3600) return Math.floor(secs / 60) + " min ago";
  return Math.floor(secs / 3600) + " h ago";
}

function render(cluster, jobs) {
  const seeds = cluster.hosts.filter((h) => h.seed).length;
  const running = jobs.filter((j) => j.state === "RUNNING" || j.state === "PENDING").length;
  document.getElementById("summary").textContent =
    cluster.hosts.length + " nodes (" + seeds + " seeds) · " + cluster.tasks.length + " tasks · " + running + " jobs under way";

  fill("#job-table", jobs.map((j) => {
    const url = el("td", j.url, "wrap");
    return row([String(j.id), el("span", j.state, "state-" + j.state), url, j.scope, jobProgress(j), j.runner.split("#")[0], j.created_at]);
  }), "no preheat jobs yet");

  fill("#scheduler-table", cluster.schedulers.map((s) => row([s.address, s.job_store, s.runs_jobs ? "yes" : "no"])), "");

  fill("#host-table", cluster.hosts.map((h) => {
    const place = [h.idc, h.location].filter(Boolean).join(" / ") || "–";
    const role = h.seed ? (h.seeding ? "seed" : "seed (no stream)") : "node";
    return row([h.id, h.ip + ":" + h.upload_port, place, role, h.load + " / " + h.slots, String(h.tasks), ago(h.last_seen_secs)]);
  }), "no node has announced itself");

  const most = Math.max(1, ...cluster.hosts.map((h) => h.served_origin + h.served_peer + h.served_cache));
  const chart = document.getElementById("chart");
  chart.replaceChildren(...cluster.hosts.map((h) => {
    const line = el("div", null, "chart-row");
    line.appendChild(el("span", h.id));
    const sum = h.served_origin + h.served_peer + h.served_cache;
    const b = bar([[h.served_origin, "origin"], [h.served_peer, "peer"], [h.served_cache, "cache"]], most);
    b.title = "origin " + bytes(h.served_origin) + ", peers " + bytes(h.served_peer) + ", cache " + bytes(h.served_cache);
    line.appendChild(b);
    line.appendChild(el("span", bytes(sum)));
    return line;
  }));

  fill("#task-table", cluster.tasks.map((t) => {
    const digest = el("td", t.digest.slice(0, 19) + "…");
    digest.title = t.digest;
    return row([digest, bytes(t.length), String(t.holders), String(t.peers), String(t.piece_count), String(t.origin_fetches)]);
  }), "no tasks");
}

async function refresh() {
  try {
    const [cluster, jobs] = await Promise.all([api("/api/v1/cluster"), api("/api/v1/jobs?limit=50")]);
    const withFailures = jobs.filter((j) => j.summary.failed > 0 && !failures.has(j.id)).slice(0, 5);
    for (const j of withFailures) {
      const detail = await api("/api/v1/jobs/" + j.id);
      failures.set(j.id, detail.blobs.filter((b) => b.error));
    }
    render(cluster, jobs);
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the API: " + e.message;
  }
}

document.getElementById("preheat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = document.getElementById("form-status");
  const platform = document.getElementById("preheat-platform").value.trim();
  const job = {
    url: document.getElementById("preheat-url").value.trim(),
    scope: document.getElementById("preheat-scope").value,
    platforms: platform && platform !== "all" ? [platform] : [],
  };
  try {
    const created = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(job) });
    status.textContent = "started job " + created.id;
    refresh();
  } catch (e) {
    status.textContent = "not started: " + e.message;
  }
});

refresh();
setInterval(refresh, 2000);
