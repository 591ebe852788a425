// supersede ui: live pages. A page whose <main> has data-live reloads its own content every
// two seconds (the server renders and escapes it; this file only swaps it in). No data ever
// reaches a script here: the fragment is HTML the server escaped, and scripts in it never run.
"use strict";
(function () {
  var main = document.querySelector("main[data-live]");
  if (!main) return;
  var every = 2000;
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null && html !== main.dataset.last) {
          main.dataset.last = html;
          main.innerHTML = html;
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
