// Typeset the formulas of a page with the KaTeX copy in docs/assets/katex (no CDN needed).
// pymdownx.arithmatex (generic mode) leaves each formula as the TeX between \( \) or \[ \] in
// an element of class "arithmatex": a span inline, a div for a display formula.
(function () {
  function typeset(root) {
    root.querySelectorAll(".arithmatex").forEach(function (element) {
      if (element.dataset.typeset) return;
      var tex = element.textContent.trim().slice(2, -2);
      katex.render(tex, element, {
        displayMode: element.tagName === "DIV",
        throwOnError: false, // a bad formula shows in red; docs/check_pages.py fails on it
      });
      element.dataset.typeset = "1";
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { typeset(document); }); // Material's page loads
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document); });
  }
})();
