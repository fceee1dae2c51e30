// The peer's page: polls /api/status every 2 s; API strings reach the page through textContent only.
"use strict";

const BADGES = { training: "ok", finished: "done", syncing: "muted", stopped: "muted" };

function show(id, value) {
  document.getElementById(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    show("fingerprint", s.fingerprint);
    show("phase", s.phase);
    document.getElementById("phase").className = `badge ${BADGES[s.phase] || "muted"}`;
    show("run", s.run);
    show("round", s.round);
    show("loss", typeof s.loss === "number" ? s.loss.toFixed(4) : null);
    show("tokens-per-s", typeof s.tokens_per_s === "number" ? Math.round(s.tokens_per_s) : null);
    show("accepted", s.accepted);
    show("rejected", s.rejected);
    show("last-rejection", s.last_rejection ? `round ${s.last_rejection.round}: ${s.last_rejection.reason}` : "none");
    show("receipts", s.receipts);
    show("score-total", typeof s.score_total === "number" ? s.score_total.toFixed(1) : null);
    show("bytes-up", bytes(s.bytes_up));
    show("bytes-down", bytes(s.bytes_down));
    show("state-served", bytes(s.state_bytes_served));
    show("detail", s.detail || "");
    document.getElementById("connection").hidden = true;
  } catch (error) {
    document.getElementById("connection").hidden = false;
    console.warn("status poll failed:", error);
  } finally {
    setTimeout(refresh, 2000);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
