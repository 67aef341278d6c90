// llama-gate dashboard: draws the Overview's charts and refreshes the Live page.
// Served as a file (the Content-Security-Policy allows no inline script); data comes from a
// JSON block in the page or from /live.json, and is only ever written into the page as text.
"use strict";

const PALETTE = ["#3157d5", "#e8833a", "#2f9e6e", "#c0362c", "#8a5cd1", "#c9a227",
                 "#1f9bb4", "#d1558f", "#8c96a8"];

function barChart(id, labels, datasets, stacked) {
  const canvas = document.getElementById(id);
  if (!canvas) return null;
  return new Chart(canvas, {
    type: "bar",
    data: { labels, datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: { x: { stacked }, y: { stacked, beginAtZero: true } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    },
  });
}

function lineChart(id, labels, datasets, yTitle) {
  const canvas = document.getElementById(id);
  if (!canvas) return null;
  return new Chart(canvas, {
    type: "line",
    data: { labels, datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      interaction: { mode: "index", intersect: false },
      scales: { y: { beginAtZero: true, title: { display: !!yTitle, text: yTitle } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    },
  });
}

function line(label, data, color, dashed) {
  return { label, data, borderColor: color, backgroundColor: color, pointRadius: 2,
           borderDash: dashed ? [6, 4] : [], tension: 0.2 };
}

function overview() {
  const data = JSON.parse(document.getElementById("overview-data").textContent);
  const labels = data.days.map((day) => day.slice(5));  // MM-DD
  const stacks = (field) => data.stacked.map((user, i) => ({
    label: user.name, data: user[field], backgroundColor: PALETTE[i % PALETTE.length],
  }));
  barChart("requests-chart", labels, stacks("requests"), true);
  barChart("tokens-chart", labels, stacks("tokens"), true);
  barChart("errors-chart", labels,
           [{ label: "errors", data: data.series.errors, backgroundColor: "#c0362c" }], false);
  lineChart("latency-chart", labels, [
    line("p50", data.series.p50_ms, "#3157d5", false),
    line("p95", data.series.p95_ms, "#e8833a", true),
  ], "ms");
  lineChart("ttfb-chart", labels, [
    line("p50", data.series.ttfb_p50_ms, "#2f9e6e", false),
    line("p95", data.series.ttfb_p95_ms, "#8a5cd1", true),
  ], "ms");
  if (data.series.cached_share) {
    lineChart("cached-chart", labels,
              [line("cached share of prompt tokens", data.series.cached_share, "#1f9bb4", false)],
              "%");
  }
}

function mine() {
  const data = JSON.parse(document.getElementById("mine-data").textContent);
  const labels = data.days.map((day) => day.slice(5));  // MM-DD
  barChart("my-requests-chart", labels,
           [{ label: "requests", data: data.requests, backgroundColor: PALETTE[0] }], false);
  barChart("my-tokens-chart", labels,
           [{ label: "tokens", data: data.tokens, backgroundColor: PALETTE[1] }], false);
}

function groups() {
  const data = JSON.parse(document.getElementById("groups-data").textContent);
  const labels = data.days.map((day) => day.slice(5));  // MM-DD
  barChart("groups-tokens-chart", labels, data.groups.map((group, i) => ({
    label: group.name, data: group.tokens, backgroundColor: PALETTE[i % PALETTE.length],
  })), true);
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fillBody(tableId, items, fill, emptyText, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    fill(tr, item);
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    cell(tr, emptyText).colSpan = columns;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function showLive(live) {
  document.getElementById("live-at").textContent = live.at;
  document.getElementById("live-served").textContent = live.served;
  document.getElementById("live-queued").textContent = live.queued;
  document.getElementById("live-db").textContent = live.database_up ? "up" : "unreachable";
  document.getElementById("live-backlog").textContent = live.audit_backlog;
  fillBody("backends", live.backends, (tr, b) => {
    const name = cell(tr, b.name + " ");
    const url = document.createElement("small");
    url.textContent = b.url;
    name.appendChild(url);
    cell(tr, b.up ? "up" : `down: ${b.problem}`, b.up ? "up" : "down");
    cell(tr, `${b.busy} / ${b.slots}`, "n");
    cell(tr, String(b.queued), "n");
    cell(tr, String(b.busy_all), "n");
    cell(tr, String(b.queued_all), "n");
    cell(tr, b.models === null ? "any (not reported)"
      : b.models.map((m) => (m === b.default ? `${m} (default)` : m)).join(", "));
  }, "No backends.", 7);
  fillBody("live-users", live.users, (tr, u) => {
    cell(tr, u.username);
    cell(tr, String(u.served), "n");
    cell(tr, String(u.queued), "n");
  }, "Nobody has a request in flight.", 3);
  fillBody("processes", live.processes, (tr, p) => {
    const name = cell(tr, `${p.host} pid ${p.pid}`);
    if (p.this) {
      const mark = document.createElement("small");
      mark.textContent = " (this one)";
      name.appendChild(mark);
    }
    cell(tr, String(p.served), "n");
    cell(tr, String(p.queued), "n");
    cell(tr, p.seen_at || "now");
  }, "No processes.", 4);
}

function liveRefresh() {
  const seconds = 2;
  const refresh = async () => {
    try {
      const response = await fetch("/live.json", { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.assign("/login?next=/live");
        return;
      }
      if (response.ok) showLive(await response.json());
    } catch (error) {
      // The proxy is restarting or the tunnel dropped: keep trying.
    }
    window.setTimeout(refresh, seconds * 1000);
  };
  window.setTimeout(refresh, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "overview") overview();
  if (page === "live") liveRefresh();
  if (page === "mine") mine();
  if (page === "groups") groups();
});
