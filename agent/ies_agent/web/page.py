"""The installer's page: one HTML document with its CSS and script inline.

No external assets and no build step: the page works on a phone on a site without
internet. The script polls ``/api/state`` every two seconds and ``/api/history``
every ten, draws the charts as inline SVG, and sends every action with the
session's CSRF token.
"""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>IES agent · @GATEWAY@</title>
<style>
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#667085;--ok:#12805c;
--bad:#c4320a;--warn:#b54708;--line:#e4e7ec;--acc:#2160c4}
*{box-sizing:border-box}
body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
background:var(--bg);color:var(--ink)}
header{background:#1d2330;color:#fff;padding:10px 14px;display:flex;flex-wrap:wrap;
gap:8px;align-items:center;justify-content:space-between}
header h1{font-size:17px;margin:0}
nav a{color:#cfd6e4;margin-right:12px;text-decoration:none;cursor:pointer}
nav a.on{color:#fff;border-bottom:2px solid #fff}
main{padding:12px;max-width:1200px;margin:auto}
section{margin-bottom:16px}
h2{font-size:16px;margin:6px 0 8px}
.grid{display:grid;gap:10px;grid-template-columns:repeat(auto-fill,minmax(300px,1fr))}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:10px}
.row{display:flex;justify-content:space-between;gap:8px;flex-wrap:wrap}
.mute{color:var(--mute);font-size:13px}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.pill{border-radius:10px;padding:1px 8px;font-size:12px;color:#fff;
background:var(--mute)}
.pill.ok{background:var(--ok);color:#fff}.pill.bad{background:var(--bad);color:#fff}
.big{font-size:20px;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:3px 4px;border-bottom:1px solid var(--line);text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
button{background:var(--acc);color:#fff;border:0;border-radius:6px;padding:7px 12px;
font-size:14px;cursor:pointer}
button:disabled{opacity:.5}
input,select{font-size:14px;padding:6px;border:1px solid var(--line);border-radius:6px}
svg{width:100%;height:90px;display:block}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f8f9fb;
padding:8px;border-radius:6px;margin:6px 0}
.hidden{display:none}
details summary{cursor:pointer;color:var(--acc);font-size:13px}
#login{display:flex;gap:6px;align-items:center;flex-wrap:wrap}
@media (max-width:520px){.grid{grid-template-columns:1fr}main{padding:8px}
header h1{font-size:15px}}
</style></head><body>
<header><h1>IES edge agent · <span id="gw">@GATEWAY@</span></h1>
<nav><a data-tab="overview" class="on">Overview</a><a data-tab="scan">Scan</a>
<a data-tab="config">Configuration</a></nav>
<div id="login"><span id="who" class="mute"></span>
<form id="loginForm" class="hidden"><input id="secret" type="password"
autocomplete="current-password" placeholder="password or token" aria-label="password">
<button type="submit">Log in</button></form>
<button id="logout" class="hidden" type="button">Log out</button></div></header>
<main>
<div id="msg" class="mute" role="status"></div>
<div id="tab-overview">
<section><h2>Devices</h2><div id="devices" class="grid"></div></section>
<section><h2>Buses</h2>
<div class="card scroll"><table id="buses"></table></div></section>
<section class="grid">
<div class="card" id="evidence"><h2>Evidence</h2><div id="evBody"></div>
<button id="verify" type="button">Verify now</button>
<div id="verifyResult" class="mute"></div></div>
<div class="card"><h2>Upstreams</h2><div id="upstreams"></div></div>
<div class="card"><h2>Chargers</h2><div id="chargers"></div></div>
<div class="card"><h2>Dispatch</h2><div id="dispatch"></div></div>
</section></div>
<div id="tab-scan" class="hidden"><section class="card"><h2>Scan a bus</h2>
<p class="mute">Asks each unit id for one register and walks the SunSpec models of
those that answer, then proposes device entries for the site file. The scan queues
behind the agent's own reads on that bus.</p>
<form id="scanForm" class="row"><select id="scanBus" aria-label="bus"></select>
<input id="scanTcp" placeholder="or host:port" aria-label="TCP address">
<input id="scanUnits" value="1-10" size="8" aria-label="unit ids">
<button type="submit">Scan</button></form>
<div id="scanResult"></div></section></div>
<div id="tab-config" class="hidden"><section class="card"><h2>Configuration</h2>
<p class="mute">Read-only; secrets are masked. Change the site file and restart.</p>
<pre id="config"></pre></section></div>
</main>
<script nonce="@NONCE@">
"use strict";
const $ = (id) => document.getElementById(id);
let csrf = null, loginCsrf = null, history = {}, buses = [];
function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}
function ago(ms) {
  if (ms == null) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 90 ? s.toFixed(0) + " s ago" : s < 5400 ? (s / 60).toFixed(0) +
    " min ago" : (s / 3600).toFixed(1) + " h ago";
}
function say(text, cls) { const m = $("msg"); m.textContent = text || "";
  m.className = cls || "mute"; }
async function api(path, body) {
  const opts = {credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    opts.method = "POST"; opts.headers["Content-Type"] = "application/json";
    const token = path === "/api/login" ? loginCsrf : csrf;
    if (token) opts.headers["X-CSRF-Token"] = token;
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = {error: r.statusText}; }
  return {status: r.status, data};
}
async function session() {
  const {status, data} = await api("/api/session");
  if (status !== 200) return;
  loginCsrf = data.login_csrf; csrf = data.csrf;
  $("loginForm").classList.toggle("hidden", data.logged_in || !data.secret_configured);
  $("logout").classList.toggle("hidden", !data.logged_in);
  $("who").textContent = data.logged_in ? "logged in" :
    data.secret_configured ? "" : "read-only (no password set)";
}
function chart(points, step) {
  const W = 300, H = 90;
  const pw = points.filter((p) => p[1] != null);
  if (pw.length < 2) return '<p class="mute">chart: collecting samples…</p>';
  const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * W;
  // interval energy: the rise of the cumulative register between samples, as bars
  const bars = [];
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1][2], b = points[i][2];
    if (a != null && b != null && b >= a) bars.push([points[i][0], b - a]);
  }
  const emax = Math.max(1e-9, ...bars.map((b) => b[1]));
  const pmin = Math.min(0, ...pw.map((p) => p[1]));
  const pmax = Math.max(1, ...pw.map((p) => p[1]));
  const y = (v) => H - 4 - ((v - pmin) / (pmax - pmin)) * (H - 8);
  const bw = Math.max(1, W / Math.max(1, points.length) - 1);
  let s = '<svg viewBox="0 0 ' + W + " " + H + '" preserveAspectRatio="none" ' +
    'role="img" aria-label="power and interval energy">';
  for (const [t, e] of bars) {
    const h = (e / emax) * (H * 0.45);
    s += '<rect x="' + (x(t) - bw).toFixed(1) + '" y="' + (H - h).toFixed(1) +
      '" width="' + bw.toFixed(1) + '" height="' + h.toFixed(1) +
      '" fill="#c7d7f5"></rect>';
  }
  s += '<polyline fill="none" stroke="#2160c4" stroke-width="1.5" points="' +
    pw.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ") +
    '"></polyline></svg>';
  const span = ((t1 - t0) / 60000).toFixed(0);
  return s + '<div class="mute">power (line, ' + pmin.toFixed(0) + "–" +
    pmax.toFixed(0) + " W) and energy per " + step + " s (bars), last " + span +
    " min</div>";
}
const HEADLINE = ["power_active_total", "active_power", "103.W",
  "energy_active_import", "energy_import", "103.WH", "voltage_l1",
  "frequency"];
function deviceCard(d) {
  const vals = Object.entries(d.values || {});
  const good = vals.filter(([, v]) => v.value != null);
  const head = HEADLINE.filter((n) => d.values && d.values[n]);
  const shown = head.length ? head.map((n) => [n, d.values[n]]) : good.slice(0, 3);
  const faults = Object.entries(d.faults || {});
  const state = d.online === true ? '<span class="pill ok">online</span>' :
    d.online === false ? '<span class="pill bad">no answer</span>' :
    '<span class="pill">starting</span>';
  let h = '<div class="card device" data-device="' + esc(d.id) + '">' +
    '<div class="row"><b>' + esc(d.id) + "</b>" + state + "</div>" +
    '<div class="mute">' + esc(d.kind) + " · " + esc(d.protocol) + " · last read " +
    ago(d.last_read_ms) + " · latency " + (d.last_latency_s == null ? "–" :
    (d.last_latency_s * 1000).toFixed(0) + " ms") + " · reads " + d.reads +
    " · errors " + faults.reduce((a, [, c]) => a + c, 0) + "</div><table>";
  for (const [name, v] of shown) {
    h += "<tr><td>" + esc(name) + '</td><td class="n value">' +
      esc(v.value ?? "–") + "</td><td>" + esc(v.unit) + "</td><td>" +
      (v.state === "G" ? "" : '<span class="warn">' + esc(v.state) + "</span>") +
      "</td></tr>";
  }
  h += "</table>";
  if (d.last_error && d.online === false)
    h += '<div class="bad">' + esc(d.last_error) + "</div>";
  if (faults.length) h += '<div class="mute">' + faults.map(([k, c]) =>
    esc(k) + " " + c).join(", ") + "</div>";
  h += '<div class="chart">' + chart(history[d.id] || [], histStep) + "</div>";
  h += "<details><summary>all " + vals.length + " values</summary><table>" +
    vals.map(([n, v]) => "<tr><td>" + esc(n) + '</td><td class="n">' +
      esc(v.value ?? "–") + "</td><td>" + esc(v.unit) + "</td><td>" +
      esc(v.state) + "</td></tr>").join("") + "</table></details></div>";
  return h;
}
let histStep = 0, openDetails = new Set();
function renderState(s) {
  document.querySelectorAll(".device details[open]").forEach((el) =>
    openDetails.add(el.closest(".device").dataset.device));
  document.querySelectorAll(".device details:not([open])").forEach((el) =>
    openDetails.delete(el.closest(".device").dataset.device));
  $("devices").innerHTML = s.devices.length ? s.devices.map(deviceCard).join("") :
    '<p class="mute">no devices yet</p>';
  document.querySelectorAll(".device").forEach((el) => {
    if (openDetails.has(el.dataset.device)) el.querySelector("details").open = true;
  });
  buses = s.buses;
  let b = "<tr><th>bus</th><th>link</th><th>unit</th><th>requests</th>" +
    "<th>errors</th><th>latency</th><th>queue</th></tr>";
  for (const bus of s.buses) {
    const link = bus.connected ? '<span class="ok">up</span>' :
      '<span class="bad">down</span>' +
      (bus.last_error ? " " + esc(bus.last_error) : "");
    const units = bus.units.length ? bus.units : [{unit: "–", requests: 0, errors: {}}];
    for (const u of units) {
      const errs = Object.entries(u.errors || {}).map(([k, c]) => esc(k) + " " + c);
      b += "<tr><td>" + esc(bus.id) + '<div class="mute">' + esc(bus.endpoint) +
        "</div></td><td>" + link + "</td><td>" + esc(u.unit) + '</td><td class="n">' +
        u.requests + "</td><td>" + (errs.join(", ") || "0") + '</td><td class="n">' +
        (u.latency_s == null ? "–" : (u.latency_s * 1000).toFixed(0) + " ms") +
        '</td><td class="n">' + bus.queue_depth + "</td></tr>";
    }
  }
  $("buses").innerHTML = s.buses.length ? b :
    '<tr><td class="mute">no Modbus buses</td></tr>';
  const e = s.evidence;
  const age = e.checkpoint_age_s;
  $("evBody").innerHTML = "<table>" +
    "<tr><td>entries</td><td class=\\"n\\" id=\\"evEntries\\">" + e.entries +
    "</td></tr><tr><td>log size</td><td class=\\"n\\">" +
    (e.bytes == null ? "–" : (e.bytes / 1024).toFixed(1) + " KiB") + "</td></tr>" +
    "<tr><td>last checkpoint</td><td class=\\"n\\">" + (e.last_checkpoint_size == null ?
      (e.has_checkpoint ? "before this start" : "none yet") : "size " +
      e.last_checkpoint_size + ", " + ago(e.last_checkpoint_ms)) + "</td></tr>" +
    "<tr><td>checkpoint age</td><td class=\\"n " + (age != null && age > 3 *
      e.interval_s ? "bad" : "") + "\\">" +
    (age == null ? "–" : age.toFixed(0) + " s") +
    "</td></tr><tr><td>key</td><td class=\\"n\\"><code>" +
    esc((e.key_fingerprint || "").slice(0, 16)) + "…</code></td></tr></table>";
  $("upstreams").innerHTML = s.upstreams.length ? s.upstreams.map((u) =>
    '<div class="row"><b>' + esc(u.name) + "</b>" + (u.connected ?
      '<span class="pill ok">connected</span>' : '<span class="pill bad">down</span>') +
    '</div><div class="mute">' + esc(u.kind) + " " + esc(u.target) + " · backlog " +
    u.backlog_entries + " entries · acked " + u.acked + "</div>" + (u.last_error ?
      '<div class="bad">' + esc(u.last_error) + "</div>" : "")).join("") :
    '<p class="mute">no upstream configured: evidence stays in the local log</p>';
  $("chargers").innerHTML = s.chargers.length ? s.chargers.map((c) =>
    '<div class="row"><b>' + esc(c.id) + "</b>" + (c.connected ?
      '<span class="pill ok">connected</span>' :
      '<span class="pill bad">offline</span>') +
    '</div><div class="mute">OCPP ' + esc(c.version) + " · " +
    Object.entries(c.connectors).map(([k, v]) => esc(k) + ": " + esc(v)).join(", ") +
    " · open sessions " + c.open_transactions + "</div>").join("") :
    '<p class="mute">no chargers</p>';
  const d = s.dispatch;
  $("dispatch").innerHTML = d.events.length ? "<table>" + d.events.map((ev) =>
    "<tr><td>" + esc(JSON.stringify(ev)) + "</td></tr>").join("") + "</table>" :
    '<p class="mute">' + esc(d.note || "no dispatch events") + "</p>";
}
async function poll() {
  try {
    const {status, data} = await api("/api/state");
    if (status === 200) { renderState(data); say(""); }
    else if (status === 401) say("log in to see this gateway", "warn");
    else say("the agent answered " + status, "bad");
  } catch (e) { say("the agent does not answer; retrying", "bad"); }
}
async function pollHistory() {
  try {
    const {status, data} = await api("/api/history");
    if (status === 200) { history = data.devices; histStep = data.step_s; }
  } catch (e) { /* the state poll reports outages */ }
}
$("loginForm").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const {status, data} = await api("/api/login", {secret: $("secret").value});
  $("secret").value = "";
  if (status === 200) { say("logged in", "ok"); } else { say(data.error, "bad"); }
  await session(); poll();
});
$("logout").addEventListener("click", async () => {
  await api("/api/logout", {}); await session(); say("logged out");
});
$("verify").addEventListener("click", async () => {
  const out = $("verifyResult");
  $("verify").disabled = true; out.className = "mute"; out.textContent = "verifying…";
  try {
    const {status, data} = await api("/api/verify", {});
    if (status === 200) {
      out.className = data.ok ? "ok" : "bad"; out.textContent = data.summary;
      out.dataset.ok = data.ok ? "yes" : "no";
    } else { out.className = "bad"; out.textContent = data.error; }
  } finally { $("verify").disabled = false; }
});
$("scanForm").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("scanResult");
  out.innerHTML = '<p class="mute">scanning…</p>';
  const body = {units: $("scanUnits").value};
  if ($("scanTcp").value.trim()) body.tcp = $("scanTcp").value.trim();
  else body.bus = $("scanBus").value;
  const {status, data} = await api("/api/scan", body);
  if (status !== 200) { out.innerHTML = '<p class="bad">' + esc(data.error) + "</p>";
    return; }
  out.innerHTML = data.found.length ? "<p>" + data.found.map((f) => "unit " + f.unit +
    (f.sunspec_models.length ? ": SunSpec " + f.sunspec_models.join(", ") : "")
  ).join("<br>") + "</p><p class=\\"mute\\">Proposed entries:</p><pre>" +
    esc(data.proposed.join("\\n\\n")) + "</pre>" :
    '<p class="mute">no unit answered</p>';
});
async function loadConfig() {
  const {status, data} = await api("/api/config");
  $("config").textContent = status === 200 ? "# " + data.path + "\\n" +
    JSON.stringify(data.site, null, 2) : data.error;
}
document.querySelectorAll("nav a").forEach((a) => a.addEventListener("click", () => {
  document.querySelectorAll("nav a").forEach((b) => b.classList.toggle("on", b === a));
  for (const t of ["overview", "scan", "config"])
    $("tab-" + t).classList.toggle("hidden", t !== a.dataset.tab);
  if (a.dataset.tab === "config") loadConfig();
  if (a.dataset.tab === "scan") $("scanBus").innerHTML = buses.map((b) =>
    "<option>" + esc(b.id) + "</option>").join("");
}));
session().then(pollHistory).then(poll);
setInterval(poll, 2000);
setInterval(pollHistory, 10000);
</script></body></html>
"""


def render_page(nonce: str, gateway_id: str) -> str:
    """Return the page with the script's CSP ``nonce`` and the gateway's id."""
    return _PAGE.replace("@NONCE@", nonce).replace("@GATEWAY@", html.escape(gateway_id))
