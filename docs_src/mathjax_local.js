// MathJax 2 local configuration, loaded as config/local/minicpm4.js (see mkdocs.yml, custom_mathjax_url).
// The jupyter-server-mathjax wheel ships only the STIX-Web fonts: use them, and never ask for image fonts.
MathJax.Hub.Config({
  "HTML-CSS": { availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null },
  SVG: { font: "STIX-Web" }
});
MathJax.Ajax.loadComplete("[MathJax]/config/local/minicpm4.js");
