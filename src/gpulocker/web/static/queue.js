/* The dashboard's "Waiting in line": keep each waiting request's place current without a
   reload, from the JSON API (/api/v1/requests, the same records the CLI reads). Polls
   every GPUs_STATUS_REFRESH_RATE_SECONDS (at least 1 s) while something waits, every 20 s
   otherwise (to pick up requests made elsewhere), and not at all while the tab is hidden.
   Everything from the server is written with textContent: no HTML. */
"use strict";

(function () {
  const card = document.getElementById("my-queue");
  if (!card) return;
  const url = card.dataset.requestsUrl;
  const fastMs = Math.max(1000, parseFloat(card.dataset.refresh || "2") * 1000);
  const slowMs = 20000;
  const tbody = card.querySelector("tbody");
  const template = document.getElementById("queue-row-template");
  const tableWrap = card.querySelector("[data-queue-table]");
  const empty = card.querySelector("[data-queue-empty]");
  const note = card.querySelector("[data-queue-note]");
  const live = card.querySelector("[data-queue-live]");
  const liveText = card.querySelector("[data-queue-live-text]");
  const liveDot = live.querySelector(".live-dot");
  const STATE_KIND = { waiting: "warn", granted: "ok", cancelled: "", expired: "danger" };
  let timer = null;

  function field(row, name) { return row.querySelector('[data-field="' + name + '"]'); }

  function pill(text, kind) {
    const span = document.createElement("span");
    span.className = "pill" + (kind ? " pill-" + kind : "");
    span.textContent = text;
    return span;
  }

  /** "2026-11-28 20:15", as the server's when() macro writes a UTC time. */
  function when(iso) {
    const time = document.createElement("time");
    if (!iso) { time.textContent = "—"; return time; }
    time.setAttribute("datetime", iso);
    time.title = iso.slice(0, 19).replace("T", " ") + " UTC";
    time.textContent = iso.slice(0, 16).replace("T", " ");
    return time;
  }

  function hoursText(h) {
    const g = function (v) { return String(Number(v.toPrecision(6))); };
    return h >= 48 ? g(h) + " h (" + g(h / 24) + " days)" : g(h) + " h";
  }

  function rowOf(id) { return tbody.querySelector('tr[data-request="' + id + '"]'); }

  /** A row for a waiting request made elsewhere (the CLI, another tab). */
  function addRow(r) {
    const row = template.content.firstElementChild.cloneNode(true);
    row.dataset.request = String(r.id);
    field(row, "id").textContent = "#" + r.id;
    field(row, "what").textContent = r.count + " × " + r.gpu_type + " for " + hoursText(r.hours);
    field(row, "until").replaceChildren(when(r.wait_until));
    const form = row.querySelector("form");
    form.action = form.dataset.action.replace(/\/0\/cancel$/, "/" + r.id + "/cancel");
    form.querySelector("button").setAttribute("aria-label", "Cancel request " + r.id);
    tbody.prepend(row);  // newest first, as the server lists them
    return row;
  }

  function update(row, r) {
    field(row, "position").textContent = r.position === null || r.position === undefined ? "—" : String(r.position);
    field(row, "state").replaceChildren(pill(r.state, STATE_KIND[r.state] || ""));
    if (r.state === "waiting") return;
    row.classList.add("is-ended");
    const actions = field(row, "actions");
    if (r.state === "granted") {
      const link = document.createElement("a");
      link.className = "btn btn-sm btn-primary";
      link.href = window.location.pathname;
      link.textContent = "Show my GPUs";
      actions.replaceChildren(link);
    } else {
      actions.replaceChildren();
    }
  }

  function apply(requests) {
    let waiting = 0;
    const granted = [];
    requests.forEach(function (r) {
      let row = rowOf(r.id);
      if (!row && r.state !== "waiting") return;  // an old one, never shown here
      if (!row) row = addRow(r);
      if (r.state === "waiting") waiting += 1;
      if (r.state === "granted" && row.dataset.state === "waiting") granted.push("#" + r.id);
      row.dataset.state = r.state;
      update(row, r);
    });
    tableWrap.hidden = tbody.rows.length === 0;
    empty.hidden = !tableWrap.hidden;
    if (granted.length) {
      note.textContent = "Granted: " + granted.join(", ") + ". “Show my GPUs” brings up the line for your shell.";
    }
    return waiting;
  }

  function setLive(ok, shown) {
    live.hidden = !shown;
    liveDot.classList.toggle("stale", !ok);
    liveText.textContent = ok ? "updated " + new Date().toLocaleTimeString() : "not updating; reload the page";
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = document.hidden ? null : setTimeout(poll, ms);
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (answer) {
        const waiting = apply(answer.requests || []);
        setLive(true, tbody.rows.length > 0);
        schedule(waiting ? fastMs : slowMs);
      })
      .catch(function () {
        setLive(false, true);
        schedule(slowMs);
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { clearTimeout(timer); timer = null; } else { poll(); }
  });
  schedule(tbody.rows.length ? fastMs : slowMs);
})();
