/* The live schedule: refresh every GPU card from /api/gpu_status every
   GPUs_STATUS_REFRESH_RATE_SECONDS (plain polling, no reload), and draw each GPU's
   utilization/memory history with uPlot (shipped in static/vendor, never fetched from
   the internet). Everything from the server is written with textContent: no HTML. */
"use strict";

(function () {
  const grid = document.getElementById("gpu-grid");
  if (!grid) return;
  const me = grid.dataset.me;
  const statusUrl = grid.dataset.statusUrl;
  const historyUrl = grid.dataset.historyUrl;
  const refreshMs = Math.max(1000, parseFloat(grid.dataset.refresh || "2") * 1000);
  const totals = {};  // "host/id" -> memory_total_mib, for memory as a percentage
  const charts = {};  // "host/id" -> {plot, hours}

  function fmtPct(v) { return v === null || v === undefined ? "—" : Math.round(v) + " %"; }
  function fmtUnit(v, unit) { return v === null || v === undefined ? "—" : Math.round(v) + " " + unit; }
  function fmtMib(v) {
    if (v === null || v === undefined) return "—";
    let size = v * 1024 * 1024;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(size) >= 1024 && i < units.length - 1) { size /= 1024; i++; }
    return i === 0 ? Math.round(size) + " B" : Number(size.toPrecision(3)) + " " + units[i];
  }
  function clamp(v) { return Math.min(100, Math.max(0, v || 0)); }

  function field(card, name) { return card.querySelector('[data-field="' + name + '"]'); }

  function setBar(bar, value) {
    if (!bar) return;
    bar.setAttribute("aria-valuenow", String(Math.round(clamp(value))));
    bar.firstElementChild.style.width = clamp(value).toFixed(1) + "%";
  }

  function pill(text, kind, title) {
    const span = document.createElement("span");
    span.className = "pill" + (kind ? " pill-" + kind : "");
    span.textContent = text;
    if (title) span.title = title;
    return span;
  }

  function statusPill(gpu) {
    if (!gpu.healthy) return pill("unhealthy", "danger", gpu.error || "");
    if (gpu.holder && gpu.holder === me) return pill("yours", "accent");
    if (gpu.holder || gpu.allocation_id) return pill("in use", "warn");
    return pill("free", "ok");
  }

  function processTable(processes) {
    if (!processes || !processes.length) {
      const p = document.createElement("p");
      p.className = "muted";
      p.style.margin = "0";
      p.textContent = "No processes.";
      return p;
    }
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    [["User", ""], ["PID", "num"], ["Memory", "num"]].forEach(function (h) {
      const th = document.createElement("th");
      th.textContent = h[0];
      if (h[1]) th.className = h[1];
      head.appendChild(th);
    });
    const body = table.createTBody();
    processes.forEach(function (proc) {
      const row = body.insertRow();
      [[proc.user || "?", ""], [proc.pid, "num"], [fmtMib(proc.memory_mib), "num"]].forEach(function (c) {
        const td = row.insertCell();
        td.textContent = String(c[0]);
        if (c[1]) td.className = c[1];
      });
    });
    return table;
  }

  function updateCard(card, gpu) {
    const key = gpu.host + "/" + gpu.gpu_id;
    totals[key] = gpu.memory_total_mib;
    const mine = Boolean(gpu.holder) && gpu.holder === me;
    card.classList.toggle("is-mine", mine);
    card.classList.toggle("is-unhealthy", !gpu.healthy);
    field(card, "status").replaceChildren(statusPill(gpu));
    field(card, "util-text").textContent = fmtPct(gpu.utilization);
    setBar(field(card, "util-bar"), gpu.utilization);
    const used = gpu.memory_used_mib;
    const total = gpu.memory_total_mib;
    field(card, "mem-text").textContent = (used === null || used === undefined ? "—" : fmtMib(used)) + " / " + fmtMib(total);
    setBar(field(card, "mem-bar"), total ? (100 * (used || 0)) / total : 0);
    field(card, "temp").textContent = fmtUnit(gpu.temperature_c, "°C");
    field(card, "power").textContent = fmtUnit(gpu.power_w, "W");
    field(card, "holder").textContent = gpu.holder || (gpu.allocation_id ? "someone" : "—");
    const left = field(card, "left");
    if (gpu.expires_at) {
      const time = document.createElement("time");
      time.setAttribute("datetime", gpu.expires_at);
      time.setAttribute("data-countdown", "");
      time.textContent = window.GPULocker.timeLeft(gpu.expires_at);
      left.replaceChildren(time);
    } else {
      left.textContent = "—";
    }
    field(card, "procs").replaceChildren(processTable(gpu.processes));
  }

  function setLive(ok, text) {
    const dot = document.querySelector("[data-live-dot]");
    const label = document.querySelector("[data-live-text]");
    if (dot) dot.classList.toggle("stale", !ok);
    if (label) label.textContent = text;
  }

  /** A warning when the agent's readings are missing or old (the agent is down?), else "". */
  function staleness(gpus) {
    const limit = Math.max(30000, 3 * refreshMs);
    const times = gpus.map(function (g) { return g.sampled_at ? Date.parse(g.sampled_at) : NaN; });
    if (!gpus.length || times.some(isNaN)) return "no live readings from the agent yet";
    const oldest = Math.min.apply(null, times);
    const age = Date.now() - oldest;
    if (age > limit) return "readings are " + window.GPULocker.durationText(age / 1000) + " old: is the agent running?";
    return "";
  }

  async function refresh() {
    try {
      const response = await fetch(statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.status === 401) {
        window.location.reload();  // signed out elsewhere: the page sends us to sign in
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      (data.gpus || []).forEach(function (gpu) {
        const card = grid.querySelector('[data-gpu="' + CSS.escape(gpu.host + "/" + gpu.gpu_id) + '"]');
        if (card) updateCard(card, gpu);
      });
      const stale = staleness(data.gpus || []);
      if (stale) setLive(false, stale);
      else setLive(true, "updated " + new Date().toLocaleTimeString());
    } catch (err) {
      setLive(false, "cannot reach the server (" + err.message + "); retrying");
    }
  }

  /* --- history charts --- */

  function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  function toSeries(payload, key) {
    const points = payload.points || payload.samples || payload.history || [];
    const total = payload.memory_total_mib || totals[key] || 0;
    const t = [], util = [], mem = [];
    points.forEach(function (p) {
      const at = typeof p.at === "number" ? p.at : Date.parse(p.at) / 1000;
      t.push(at);
      util.push(p.utilization === null || p.utilization === undefined ? null : p.utilization);
      const used = p.memory_used_mib;
      mem.push(used === null || used === undefined || !total ? null : (100 * used) / total);
    });
    return [t, util, mem];
  }

  function chartOptions(width) {
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--border"), width: 1 }, ticks: { stroke: cssVar("--border") } };
    return {
      width: width,
      height: 150,
      cursor: { drag: { x: false, y: false } },
      legend: { show: false },
      scales: { y: { range: [0, 100] } },
      axes: [axis, Object.assign({ size: 52, values: function (u, vals) { return vals.map(function (v) { return v + "%"; }); } }, axis)],
      series: [
        {},
        { label: "util", stroke: cssVar("--bar-util"), width: 2, fill: cssVar("--bar-util") + "22", value: function (u, v) { return v === null ? "—" : v.toFixed(0) + "%"; } },
        { label: "mem", stroke: cssVar("--bar-mem"), width: 2, value: function (u, v) { return v === null ? "—" : v.toFixed(0) + "%"; } },
      ],
    };
  }

  async function drawChart(holder, hours) {
    const card = holder.closest("[data-gpu]");
    const key = card.dataset.gpu;
    const url = historyUrl + encodeURIComponent(holder.dataset.chart) + "/history?hours=" + hours + "&host=" + encodeURIComponent(holder.dataset.host);
    let data;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      data = toSeries(await response.json(), key);
    } catch (err) {
      holder.replaceChildren(emptyNote("History is not available (" + err.message + ")."));
      return;
    }
    if (!data[0].length) {
      if (charts[key]) { charts[key].plot.destroy(); delete charts[key]; }
      holder.replaceChildren(emptyNote("No samples in this range yet."));
      return;
    }
    const width = Math.max(200, holder.clientWidth);
    if (charts[key]) {
      charts[key].plot.setData(data);
      charts[key].hours = hours;
      return;
    }
    holder.replaceChildren();
    charts[key] = { plot: new window.uPlot(chartOptions(width), data, holder), hours: hours };
  }

  function emptyNote(text) {
    const p = document.createElement("p");
    p.className = "chart-empty";
    p.textContent = text;
    return p;
  }

  function wireCharts() {
    grid.querySelectorAll("[data-chart]").forEach(function (holder) {
      const card = holder.closest("[data-gpu]");
      const buttons = card.querySelectorAll(".seg button");
      buttons.forEach(function (button) {
        button.addEventListener("click", function () {
          buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b === button)); });
          drawChart(holder, button.dataset.hours);
        });
      });
      drawChart(holder, 1);
    });
    let resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () {
        Object.keys(charts).forEach(function (key) {
          const holder = grid.querySelector('[data-gpu="' + CSS.escape(key) + '"] [data-chart]');
          if (holder) charts[key].plot.setSize({ width: Math.max(200, holder.clientWidth), height: 150 });
        });
      }, 150);
    });
    setInterval(function () {
      Object.keys(charts).forEach(function (key) {
        const holder = grid.querySelector('[data-gpu="' + CSS.escape(key) + '"] [data-chart]');
        if (holder) drawChart(holder, charts[key].hours);
      });
    }, 60000);
  }

  function start() {
    refresh();
    setInterval(refresh, refreshMs);
    if (window.uPlot) wireCharts();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
