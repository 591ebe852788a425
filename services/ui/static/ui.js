// supersede ui: live pages. The element marked data-live reloads its own content every two
// seconds (the server renders and escapes it; this file only swaps it in), unless the person
// is using a form control inside it. No data ever reaches a script here: the fragment is HTML the
// server escaped, and scripts in it never run.
"use strict";
(function () {
  var live = document.querySelector("[data-live]");
  if (!live) return;
  var every = 2000;
  // When a reload fails the content stays, and a note above it says since when and why (text
  // only), until one succeeds: a page left open during an outage showed old figures as live.
  var note = document.createElement("p");
  note.className = "stale";
  note.hidden = true;
  live.parentNode.insertBefore(note, live);
  var fresh = new Date();
  function stale(reason) {
    // (in UTC, as the pages' times: toISOString gives "2026-12-06T13:57:22.123Z")
    note.textContent = "Not updated since " + fresh.toISOString().slice(11, 19) + " UTC: " + reason;
    note.hidden = false;
  }
  function sameLinks(href) {
    return Array.prototype.filter.call(live.querySelectorAll("a"), function (a) {
      return a.getAttribute("href") === href;
    });
  }
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    var abort = new AbortController();  // (the server answers within 5 s, or says why not)
    var late = window.setTimeout(function () { abort.abort(); }, 15000);
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store", signal: abort.signal })
      .then(function (r) {
        if (r.ok) return r.text();
        return r.text().then(function (t) {
          stale((t || "").slice(0, 300) || "HTTP " + r.status);
          return null;
        });
      })
      .then(function (html) {
        if (html === null) return;
        var f = document.activeElement;
        if (html !== live.dataset.last) {
          if (f && live.contains(f) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(f.tagName)) return;
        }
        fresh = new Date();  // (what the page shows is the server's now)
        note.hidden = true;
        if (html === live.dataset.last) return;
        // A focused link keeps the focus: the same link of the new content gets it (a keyboard
        // user lost their place at each refresh, a probe).
        // (by its place among the links of that address: the rows of one key share one)
        var link = f && f.tagName === "A" && live.contains(f) ? f.getAttribute("href") : null;
        var nth = link === null ? 0 : sameLinks(link).indexOf(f);
        live.dataset.last = html;
        live.innerHTML = html;
        if (link !== null) {
          var same = sameLinks(link);
          if (same.length) same[Math.min(Math.max(nth, 0), same.length - 1)].focus({ preventScroll: true });
        }
      })
      .catch(function () { stale("the UI server does not answer"); })  // (tried again)
      .finally(function () {
        window.clearTimeout(late);
        window.setTimeout(refresh, every);
      });
  }
  window.setTimeout(refresh, every);
})();
