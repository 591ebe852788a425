// supersede ui: live pages. The element marked data-live reloads its own content every two
// seconds (the server renders and escapes it; this file only swaps it in), unless the person
// is using a form control inside it. No data ever reaches a script here: the fragment is HTML the
// server escaped, and scripts in it never run.
"use strict";
(function () {
  var live = document.querySelector("[data-live]");
  if (!live) return;
  var every = 2000;
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null || html === live.dataset.last) return;
        var f = document.activeElement;
        if (f && live.contains(f) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(f.tagName)) return;
        live.dataset.last = html;
        live.innerHTML = html;
      })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
