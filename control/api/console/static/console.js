// toolplane console: the only script the pages load (CSP: script-src 'self', no inline).
// Counts approvals' expiry down, and keeps a running run's page live over its event stream.
"use strict";

function remaining(iso) {
  const left = Math.floor((Date.parse(iso) - Date.now()) / 1000);
  if (!(left > 0)) return "expired";
  const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
  const mm = String(m).padStart(2, "0"), ss = String(s).padStart(2, "0");
  return h ? `${h}h ${mm}m ${ss}s` : `${m}m ${ss}s`;
}

function countDown() {
  for (const el of document.querySelectorAll("[data-expires]")) {
    const left = remaining(el.dataset.expires);
    el.textContent = left === "expired" ? "expired" : `expires in ${left}`;
    el.classList.toggle("expired", left === "expired");
  }
}

function setStatus(nodeId, status) {
  for (const el of document.querySelectorAll("[data-status-of]")) {
    if (el.dataset.statusOf !== nodeId) continue;
    el.textContent = status;
    if (el.classList.contains("status")) el.className = `status status-${status}`;
  }
  for (const el of document.querySelectorAll("g.box[data-node]")) {
    if (el.dataset.node === nodeId) el.setAttribute("class", `box status-${status}`);
  }
}

const TERMINAL = new Set(["completed", "failed", "denied", "cancelled"]);

async function refresh(section) {
  // The run ended: fetch its page once more and show the results, without a reload.
  if (section.dataset.ended) return;
  section.dataset.ended = "1";
  const response = await fetch(window.location.href, { credentials: "same-origin" });
  if (!response.ok) {
    console.warn(`run page: ${response.status}`);
    return;
  }
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.getElementById("run-body");
  const current = document.getElementById("run-body");
  if (fresh && current) current.replaceWith(document.importNode(fresh, true));
}

function follow(section) {
  const runId = section.dataset.run;
  const source = new EventSource(`${window.location.pathname.replace(/\/$/, "")}/events`);
  source.addEventListener("node", (e) => {
    const data = JSON.parse(e.data);
    if (data.node_id) setStatus(data.node_id, data.status);
  });
  source.addEventListener("run", (e) => {
    const data = JSON.parse(e.data);
    const el = document.getElementById("run-status");
    if (el && data.run_id === runId) {
      el.textContent = data.status;
      el.className = `status status-${data.status}`;
    }
    if (TERMINAL.has(data.status)) {
      source.close();
      refresh(section).catch((err) => console.warn(`run page: ${err}`));
    }
  });
  source.addEventListener("end", () => {
    source.close();
    refresh(section).catch((err) => console.warn(`run page: ${err}`));
  });
  source.onerror = () => {
    // A closed stream without "end" (the session ended): stop and say so.
    if (source.readyState === EventSource.CLOSED) {
      const live = document.getElementById("live");
      if (live) live.textContent = "not live";
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  countDown();
  if (document.querySelector("[data-expires]")) setInterval(countDown, 1000);
  const section = document.getElementById("run");
  if (section && section.dataset.live) follow(section);
});
