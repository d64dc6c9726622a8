/* GPULocker: small helpers for every page. No framework, nothing from the internet. */
"use strict";

window.GPULocker = (function () {
  /** "2 d 3 h", "3 h 05 min", "12 min", "45 s" (the same as the server's filter). */
  function durationText(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const days = Math.floor(seconds / 86400);
    const hours = Math.floor((seconds % 86400) / 3600);
    const minutes = Math.floor((seconds % 3600) / 60);
    if (days) return days + " d " + hours + " h";
    if (hours) return hours + " h " + String(minutes).padStart(2, "0") + " min";
    if (minutes) return minutes + " min";
    return (seconds % 60) + " s";
  }

  function timeLeft(iso) {
    if (!iso) return "—";
    const left = (Date.parse(iso) - Date.now()) / 1000;
    return left > 0 ? durationText(left) : "ended";
  }

  /** Keep every <time data-countdown> counting down. */
  function tickCountdowns() {
    document.querySelectorAll("time[data-countdown]").forEach(function (el) {
      el.textContent = timeLeft(el.getAttribute("datetime"));
    });
  }

  /** Buttons with data-copy="#selector" copy that element's text. */
  function wireCopyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        const source = document.querySelector(button.getAttribute("data-copy"));
        if (!source) return;
        const text = source.textContent.trim();
        const done = function () {
          const label = button.textContent;
          button.textContent = "Copied";
          setTimeout(function () { button.textContent = label; }, 1500);
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done);
        } else {
          const range = document.createRange();
          range.selectNodeContents(source);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          if (document.execCommand("copy")) done();
        }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    wireCopyButtons();
    tickCountdowns();
    setInterval(tickCountdowns, 15000);
  });

  return { durationText: durationText, timeLeft: timeLeft };
})();
