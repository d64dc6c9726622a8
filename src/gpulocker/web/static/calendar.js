/* The calendar page, kept current without a reload: every 10 x GPUS_STATUS_REFRESH_RATE_SECONDS
   (at least 3 s; 20 s by default) it fetches the calendar again and swaps in the parts marked
   data-cal-live (the drawings and the bookings table). The booking form is never touched,
   so nothing typed is lost, and a part that holds the keyboard focus waits for the next
   round. Not at all while the tab is hidden. What is swapped in is this page as the server
   rendered it (same origin, escaped by its templates): no HTML from anywhere else. */
"use strict";

(function () {
  const root = document.querySelector("[data-cal-refresh]");
  if (!root) return;
  const everyMs = Math.max(3000, parseFloat(root.dataset.calRefresh || "2") * 10000);
  const url = root.dataset.calUrl;  // the calendar itself: after a refused booking this page is the form's answer
  const live = document.querySelector("[data-cal-live-note]");
  const liveText = live && live.querySelector("[data-cal-live-text]");
  const liveDot = live && live.querySelector(".live-dot");
  let timer = null;

  function setLive(ok) {
    if (!live) return;
    live.hidden = false;
    liveDot.classList.toggle("stale", !ok);
    liveText.textContent = ok ? "updated " + new Date().toLocaleTimeString() : "not updating; reload the page";
  }

  /** Put each live part of `fresh` (a parsed page) in place of the one shown. */
  function swap(fresh) {
    document.querySelectorAll("[data-cal-live]").forEach(function (part) {
      const next = fresh.querySelector('[data-cal-live="' + part.dataset.calLive + '"]');
      if (!next || part.contains(document.activeElement)) return;
      part.replaceWith(document.importNode(next, true));
    });
  }

  function schedule() {
    clearTimeout(timer);
    timer = document.hidden ? null : setTimeout(refresh, everyMs);
  }

  function refresh() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.redirected && new URL(response.url).pathname.endsWith("/login")) {
          window.location.reload();  // signed out elsewhere: the page sends us to sign in
          return null;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (html === null) return;
        swap(new DOMParser().parseFromString(html, "text/html"));
        setLive(true);
        schedule();
      })
      .catch(function () {
        setLive(false);
        schedule();
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { clearTimeout(timer); timer = null; } else { refresh(); }
  });
  schedule();
})();
