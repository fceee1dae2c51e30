// potluck's dashboard: polls the status API and redraws. Every string from the API reaches the page
// through textContent or an SVG attribute, never as markup: fingerprints and reasons come from peers.
"use strict";

const POLL_MS = 2000;
const CHART = { left: 64, right: 624, top: 16, bottom: 224 }; // matches the axes in index.html
const BADGES = { active: "ok", idle: "muted", banned: "bad", collecting: "ok", starting: "muted", finished: "done" };

let deadlineAtMs = null; // performance.now() at which the open round's deadline passes

function byId(id) {
  return document.getElementById(id);
}

function setText(id, value) {
  byId(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function number(x, digits) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  return x.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function ago(unixS) {
  if (typeof unixS !== "number") return "–";
  const s = Math.max(0, Date.now() / 1000 - unixS);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function badge(text) {
  const span = document.createElement("span");
  span.className = `badge ${BADGES[text] || "muted"}`;
  span.textContent = String(text);
  return span;
}

// One table row; a cell is a string/number (set as text) or a DOM node (built with textContent).
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell);
    else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function fillTable(id, rows) {
  byId(id).querySelector("tbody").replaceChildren(...rows);
}

function renderStatus(s) {
  const run = s.run || "(unnamed run)";
  setText("run-name", run);
  document.title = `potluck · ${run}`;
  const phase = byId("phase");
  phase.className = `badge ${BADGES[s.phase] || "muted"}`;
  phase.textContent = s.phase;
  const total = typeof s.rounds_total === "number" ? ` of ${s.rounds_total}` : "";
  let progress = s.round === null ? "round –" : `round ${s.round}${total}`;
  if (s.phase === "finished") progress = `${s.rounds_closed} round(s) closed`;
  setText("round-progress", progress);
  deadlineAtMs = typeof s.seconds_to_deadline === "number" ? performance.now() + 1000 * s.seconds_to_deadline : null;
  tickCountdown();
  setText("val-loss", number(s.val_loss, 4));
  setText("tokens-per-s", number(s.tokens_per_s, 0));
  setText("tokens-per-s-recent", number(s.tokens_per_s_recent, 0));
  setText("bytes-in", bytes(s.bytes_in));
  setText("bytes-out", bytes(s.bytes_out));
  setText("peers-active", s.peers_active);
  setText("peers-known", s.peers_known);
  setText("peers-banned", s.peers_banned);
  setText("join-command", s.join_command || "peer --join MULTIADDR");
  setText("config-hash", s.config_hash ? s.config_hash.slice(0, 12) : null);
  setText("aggregator", s.fingerprint);
  setText("model", s.model);
}

function tickCountdown() {
  const el = byId("countdown");
  if (deadlineAtMs === null) {
    el.textContent = "";
    return;
  }
  const s = Math.max(0, (deadlineAtMs - performance.now()) / 1000);
  el.textContent = s > 0 ? `closes in ${Math.ceil(s)} s` : "closing…";
}

function renderChart(history) {
  const points = history.filter((p) => typeof p.val_loss === "number" && typeof p.round === "number");
  const line = byId("loss-line");
  const last = byId("loss-last");
  byId("chart-empty").hidden = points.length > 0;
  if (points.length === 0) {
    line.setAttribute("points", "");
    last.setAttribute("cx", "-10");
    for (const id of ["loss-max-label", "loss-min-label", "round-min-label", "round-max-label"]) setText(id, "");
    return;
  }
  const rounds = points.map((p) => p.round);
  const losses = points.map((p) => p.val_loss);
  const r0 = Math.min(...rounds);
  const r1 = Math.max(...rounds);
  const lo = Math.min(...losses);
  const hi = Math.max(...losses);
  const x = (r) => CHART.left + ((r - r0) / (r1 - r0 || 1)) * (CHART.right - CHART.left);
  const y = (v) => CHART.top + ((hi - v) / (hi - lo || 1)) * (CHART.bottom - CHART.top);
  line.setAttribute("points", points.map((p) => `${x(p.round).toFixed(1)},${y(p.val_loss).toFixed(1)}`).join(" "));
  const end = points[points.length - 1];
  last.setAttribute("cx", x(end.round).toFixed(1));
  last.setAttribute("cy", y(end.val_loss).toFixed(1));
  setText("loss-max-label", number(hi, 3));
  setText("loss-min-label", number(lo, 3));
  setText("round-min-label", r0 < 0 ? "start" : r0);
  setText("round-max-label", r1);
}

function renderPeers(peers) {
  fillTable(
    "peers-table",
    peers.map((p) =>
      row([
        p.fingerprint,
        badge(p.status),
        p.client_mode || "",
        p.rounds_contributed,
        p.accepted,
        p.rejected,
        p.last_rejection ? `round ${p.last_rejection.round}: ${p.last_rejection.reason}` : "",
        number(p.tokens_per_s, 0),
        ago(p.last_seen_s),
      ]),
    ),
  );
}

function renderLeaderboard(standings) {
  fillTable(
    "leaderboard-table",
    standings.map((s) => row([s.rank, s.fingerprint, number(s.points, 1), s.accepted])),
  );
}

function renderRejections(rejections) {
  const items = rejections.map((r) => {
    const li = document.createElement("li");
    const who = document.createElement("strong");
    who.textContent = r.fingerprint || "?";
    const check = document.createElement("span");
    check.className = "check";
    check.textContent = r.check || "";
    li.append(who, ` round ${r.round} `, check, `: ${r.reason || ""}`);
    return li;
  });
  if (items.length === 0) {
    const li = document.createElement("li");
    li.className = "small";
    li.textContent = "None so far.";
    items.push(li);
  }
  byId("rejections").replaceChildren(...items);
}

function renderRounds(rounds) {
  fillTable(
    "rounds-table",
    rounds.map((r) =>
      row([
        r.round,
        r.closed_by,
        number(r.val_loss, 4),
        r.accepted,
        r.rejected,
        number(r.tokens, 0),
        typeof r.round_s === "number" ? `${r.round_s.toFixed(1)} s` : "–",
      ]),
    ),
  );
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function ledgerHead() {
  const response = await fetch("/api/ledger/head", { cache: "no-store" });
  if (response.status === 404) return null; // before the first round closes
  if (!response.ok) throw new Error(`/api/ledger/head: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const [status, peers, standings, rejections, rounds, head] = await Promise.all([
      getJSON("/api/status"),
      getJSON("/api/peers?limit=200"),
      getJSON("/api/leaderboard?limit=20"),
      getJSON("/api/rejections?limit=20"),
      getJSON("/api/rounds?limit=10"),
      ledgerHead(),
    ]);
    renderStatus(status);
    renderChart(status.loss_history);
    renderPeers(peers);
    renderLeaderboard(standings);
    renderRejections(rejections);
    renderRounds(rounds);
    setText("ledger-head", head && head.head_hash ? `${head.head_hash.slice(0, 16)} (round ${head.round})` : null);
    byId("connection").hidden = true;
    document.body.dataset.rounds = String(status.loss_history.length);
  } catch (error) {
    byId("connection").hidden = false;
    console.warn("status poll failed:", error);
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

async function copyJoinCommand() {
  const code = byId("join-command");
  const text = code.textContent;
  let copied = false;
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch (_) {
      copied = false;
    }
  }
  if (!copied) {
    // Plain http on a LAN is not a secure context: select the text and use the old copy command.
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      copied = document.execCommand("copy");
    } catch (_) {
      copied = false;
    }
  }
  setText("copy-result", copied ? "copied" : "selected: press Ctrl+C to copy");
}

document.addEventListener("DOMContentLoaded", () => {
  byId("copy-join").addEventListener("click", copyJoinCommand);
  setInterval(tickCountdown, 250);
  refresh();
});
