// The Switchyard console's one script. Pages work without it; with it, an
// element marked data-refresh="URL" data-every="SECONDS" takes the HTML the
// server renders at URL (escaped there) every so many seconds.
"use strict";
(function () {
  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var every = Math.max(2, parseInt(el.getAttribute("data-every") || "5", 10)) * 1000;
    function tick() {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", redirect: "error" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) { el.innerHTML = html; el.removeAttribute("data-stale"); })
        .catch(function () { el.setAttribute("data-stale", "true"); });
    }
    setInterval(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  });
})();
