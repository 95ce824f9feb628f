// Render the math that pymdownx.arithmatex (generic mode) marks up, with the KaTeX that the
// build copies into the site (docs/_hooks/katex.py): nothing is fetched from the network.
// Inline math is <span class="arithmatex">\(...\)</span>, display math <div class="arithmatex">\[...\]</div>.
function renderArithmatex(root) {
  for (const element of root.querySelectorAll(".arithmatex")) {
    if (element.dataset.katex) continue;
    const text = element.textContent.trim();
    const tex = /^\\[([]/.test(text) ? text.slice(2, -2) : text;
    katex.render(tex, element, { displayMode: element.tagName === "DIV", throwOnError: false });
    element.dataset.katex = "rendered";
  }
}

if (typeof document$ !== "undefined") {
  document$.subscribe(() => renderArithmatex(document));  // Material's page-load signal
} else {
  document.addEventListener("DOMContentLoaded", () => renderArithmatex(document));
}
