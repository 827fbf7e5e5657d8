// tlsmitm error-origin pages: "Go back", and the two-step override with a click delay.
//
// Served as a same-origin file (CSP script-src 'self'; no inline script anywhere). Without
// JavaScript the "Advanced" panel never opens and the "Continue" button stays disabled, so there is
// no override without JavaScript; "Go back" still works as a plain link.
//
// The "Continue" button ignores clicks until DELAY_MS after the panel was revealed and after the
// page last regained focus (Chromium's PROCEED_CLICKJACKING_DELAY is 500 ms; Firefox's
// security.dialog_enable_delay is 1000 ms; we use the longer one). There is deliberately no
// keyboard bypass sequence (matrix UI-06).
"use strict";
(function () {
  var DELAY_MS = 1000;

  var back = document.getElementById("back");
  if (back) {
    back.addEventListener("click", function (event) {
      if (window.history.length > 1) {
        event.preventDefault();
        window.history.back();
      }
    });
  }

  var advanced = document.getElementById("advanced");
  var panel = document.getElementById("advanced-panel");
  var form = document.getElementById("proceed-form");
  var proceed = document.getElementById("proceed");
  if (!advanced || !panel || !form || !proceed) {
    return;
  }
  if (window.top !== window.self) {
    // Never offer an override inside a frame (Firefox bug 633691); the server forbids framing too.
    advanced.hidden = true;
    panel.hidden = true;
    return;
  }

  var armedSince = null; // performance.now() when the delay last restarted; null: not armed
  var timer = null;

  function disarm() {
    armedSince = null;
    proceed.disabled = true;
    if (timer !== null) {
      window.clearTimeout(timer);
      timer = null;
    }
  }

  function restartDelay() {
    disarm();
    if (panel.hidden || document.visibilityState !== "visible") {
      return;
    }
    armedSince = window.performance.now();
    timer = window.setTimeout(function () {
      timer = null;
      proceed.disabled = false;
    }, DELAY_MS);
  }

  function delayHasPassed() {
    return (
      armedSince !== null &&
      window.performance.now() - armedSince >= DELAY_MS &&
      document.hasFocus()
    );
  }

  advanced.addEventListener("click", function () {
    var opening = panel.hidden;
    panel.hidden = !opening;
    advanced.setAttribute("aria-expanded", opening ? "true" : "false");
    restartDelay();
  });

  window.addEventListener("focus", restartDelay);
  window.addEventListener("blur", disarm);
  document.addEventListener("visibilitychange", restartDelay);
  window.addEventListener("pageshow", restartDelay);

  form.addEventListener("submit", function (event) {
    if (!delayHasPassed()) {
      event.preventDefault();
      return;
    }
    // One submission only; disabled after the event so the submission itself goes ahead.
    window.setTimeout(disarm, 0);
  });
})();
