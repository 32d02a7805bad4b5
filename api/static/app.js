// Operator dashboard: asks for a token once (kept in sessionStorage), polls /v1/line/status.
"use strict";

const KEY = "station-token";
const POLL_MS = 1500;
let timer = null;

const $ = (sel) => document.querySelector(sel);

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, columns, emptyText) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren();
  if (!items.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, emptyText, "empty");
    td.colSpan = columns;
    body.appendChild(tr);
    return body;
  }
  return body;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

// The whitelist sync's lag (and its last error, if any) as one pill; hidden when no loop runs.
function renderSync(sync) {
  const pill = $("#sync");
  pill.hidden = !sync;
  if (!sync) return;
  const lag = sync.lag_seconds === null ? "never synced" : `synced ${sync.lag_seconds.toFixed(0)} s ago`;
  pill.textContent = sync.last_error ? `AWS: ${lag}, [${sync.last_error.code}]` : `AWS: ${lag}`;
  pill.title = sync.last_error ? sync.last_error.detail : "whitelist sync lag";
  pill.className = sync.last_error ? "pill bad" : "pill ok";
}

function render(data) {
  const batches = fill("batches", data.batches, 8, "no batches yet");
  for (const b of data.batches) {
    const tr = document.createElement("tr");
    tr.dataset.batch = b.name;
    cell(tr, b.name);
    cell(tr, b.product);
    cell(tr, b.state);
    cell(tr, b.planned);
    cell(tr, b.devices, "devices");
    cell(tr, b.verified, "verified");
    cell(tr, b.failed, "failed");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fillEl = document.createElement("span");
    fillEl.style.width = `${Math.min(100, (100 * b.verified) / Math.max(1, b.planned))}%`;
    bar.appendChild(fillEl);
    cell(tr, "").appendChild(bar);
    batches.appendChild(tr);
  }
  const ports = fill("ports", data.ports, 6, "no ports reported by the line driver");
  for (const p of data.ports) {
    const tr = document.createElement("tr");
    cell(tr, p.port);
    cell(tr, p.device_id);
    cell(tr, p.batch);
    cell(tr, p.step, `step-${p.step}`);
    cell(tr, when(p.since));
    cell(tr, p.last_error);
    ports.appendChild(tr);
  }
  const failures = [
    ...data.recent_refusals,
    ...data.line_failures,
    ...data.failed_devices,
  ]
    .sort((a, b) => String(b.at).localeCompare(String(a.at)))
    .slice(0, 10);
  const fbody = fill("failures", failures, 5, "no failures");
  for (const f of failures) {
    const tr = document.createElement("tr");
    cell(tr, when(f.at));
    cell(tr, f.device_id);
    cell(tr, f.batch);
    cell(tr, f.code, "error");
    cell(tr, f.detail);
    fbody.appendChild(tr);
  }
  $("#rate").textContent = `${data.issue_rate_per_min.toFixed(1)} certs/min`;
  renderSync(data.whitelist_sync);
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function showLogin(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  $("#board").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#conn").textContent = "not connected";
  $("#conn").className = "pill";
  $("#token").focus();
}

async function poll() {
  const token = sessionStorage.getItem(KEY);
  if (!token) return showLogin();
  try {
    const res = await fetch("/v1/line/status", {
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (res.status === 401 || res.status === 403) {
      const problem = await res.json().catch(() => ({}));
      return showLogin(problem.detail || `refused (${res.status})`);
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
    $("#login").hidden = true;
    $("#board").hidden = false;
    $("#logout").hidden = false;
    $("#conn").textContent = "live";
    $("#conn").className = "pill ok";
  } catch (err) {
    $("#conn").textContent = `offline: ${err.message}`;
    $("#conn").className = "pill bad";
  }
  timer = setTimeout(poll, POLL_MS);
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#token").value.trim());
  $("#token").value = "";
  poll();
});
$("#logout").addEventListener("click", () => showLogin());

poll();
