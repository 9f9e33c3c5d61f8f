// The toolbar's bulk actions; single nodes open and close on their own as details elements.
function setAll(open) { document.querySelectorAll('details.node').forEach(function (d) { d.open = open; }); }
function toLevel(level) { document.querySelectorAll('details.node').forEach(function (d) {
  d.open = Number(d.dataset.level) < level; }); }
