// Operator dashboard: asks for a token once (kept in sessionStorage), polls /v1/line/status.
// "connected" says the page reaches the API; the line pill says whether the line itself
// is updating its status (a killed line shows as stopped, whatever the API answers).
"use strict";

const KEY = "station-token";
const POLL_MS = 1500;
let timer = null;

const STEP_WORDS = {
  waiting: "waiting for a board",
  hello: "saying hello",
  key: "making the key",
  issue: "issuing the certificate",
  chain: "installing the chain",
  prove: "proving it holds the key",
  verified: "verified",
  failed: "failed",
  skipped: "skipped (already done)",
};
const DONE = new Set(["waiting", "verified", "failed", "skipped"]);

const $ = (sel) => document.querySelector(sel);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function cell(row, text, cls) {
  const td = el("td", cls, text === null || text === undefined ? "" : text);
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
  }
  return body;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function pct(v) {
  return v === null || v === undefined ? "—" : `${v.toFixed(1)} %`;
}

function problemWords(lastError) {
  if (!lastError) return "";
  const i = lastError.indexOf(": ");
  return i < 0 ? lastError : `${lastError.slice(i + 2)} (${lastError.slice(0, i)})`;
}

function renderLine(line) {
  const pill = $("#line-state");
  const note = $("#line-note");
  if (line.state === "running") {
    pill.textContent = "line running";
    pill.className = "pill ok";
    note.textContent = line.batch ? `batch ${line.batch}` : "";
  } else if (line.state === "stopped") {
    pill.textContent = "line stopped";
    pill.className = "pill bad";
    note.textContent = `the line stopped updating ${duration(line.age_s)} ago; ports show their last state`;
  } else {
    pill.textContent = "line not started";
    pill.className = "pill";
    note.textContent = "";
  }
}

function renderPorts(ports, stale) {
  const box = $("#ports");
  box.replaceChildren();
  if (!ports.length) {
    box.appendChild(el("p", "empty", "no ports reported by the line"));
    return;
  }
  for (const p of ports) {
    const tile = el("div", "tile");
    tile.dataset.port = p.port;
    tile.classList.add(DONE.has(p.step) ? p.step : "busy");
    if (stale) tile.classList.add("stale");
    tile.appendChild(el("div", "port", p.port));
    tile.appendChild(el("div", "board", p.device_id || "no board"));
    tile.appendChild(el("div", "step", STEP_WORDS[p.step] || p.step));
    tile.appendChild(el("div", "time", stale ? "last known state" : `for ${duration(p.on_step_s)}`));
    if (p.last_error) tile.appendChild(el("div", "problem", problemWords(p.last_error)));
    if (p.bad_frames || p.corrected) {
      // A noisy cable: frames lost (each cost a resend) and frames their parity repaired.
      const words = [];
      if (p.bad_frames) words.push(`${p.bad_frames} frames lost, ${p.resends || 0} resent`);
      if (p.corrected) words.push(`${p.corrected} repaired`);
      tile.appendChild(el("div", "noise", `noisy cable: ${words.join(", ")}`));
    }
    box.appendChild(tile);
  }
}

function renderThroughput(perMinute, total) {
  const box = $("#throughput");
  box.replaceChildren();
  const most = Math.max(1, ...perMinute);
  perMinute.forEach((n, i) => {
    const bar = el("span");
    bar.style.height = `${(100 * n) / most}%`;
    bar.title = `${60 - i} min ago: ${n}`;
    box.appendChild(bar);
  });
  $("#hour-total").textContent = `${total} boards in the last hour`;
}

function renderHealth(health) {
  const list = $("#health");
  list.replaceChildren();
  for (const [part, status] of Object.entries(health)) {
    const li = el("li", status, `${part}: ${status}`);
    li.dataset.part = part;
    list.appendChild(li);
  }
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
  renderLine(data.line);
  renderPorts(data.ports, data.line.state !== "running");
  renderThroughput(data.verified_per_minute, data.boards_last_hour);
  renderHealth(data.health);
  renderSync(data.whitelist_sync);
  const batches = fill("batches", data.batches, 9, "no batches yet");
  for (const b of data.batches) {
    const tr = document.createElement("tr");
    tr.dataset.batch = b.name;
    cell(tr, b.name, "mono");
    cell(tr, b.state);
    cell(tr, b.planned_count, "num");
    cell(tr, b.device_count, "num devices");
    cell(tr, b.verified, "num verified");
    cell(tr, b.failed, "num failed");
    cell(tr, pct(b.yield_pct), "num yield");
    cell(tr, pct(b.first_pass_yield_pct), "num first-pass");
    const reasons = Object.entries(b.failures_by_reason).map(([code, n]) => `${code} ${n}`);
    cell(tr, reasons.join(", ") || "—", "reasons");
    batches.appendChild(tr);
  }
  const fbody = fill("failures", data.failures, 5, "no failures");
  for (const f of data.failures) {
    const tr = document.createElement("tr");
    cell(tr, when(f.at));
    cell(tr, f.device_id, "mono");
    cell(tr, f.batch);
    cell(tr, f.code, "error");
    cell(tr, f.detail);
    fbody.appendChild(tr);
  }
  $("#updated").textContent = `page updated ${new Date().toLocaleTimeString()}`;
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
    $("#conn").textContent = "connected";
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
