"""The page ``graft serve RUN --label POOL`` answers on ``GET /``: the pool's images in a grid, the run's classes as
buttons, each click POSTed to ``/label``.

As the prediction page (graft/deploy/page.py), it is one constant string: names, classes and predictions arrive as
JSON from ``/label/items`` and enter the DOM through ``textContent`` only, and the Content-Security-Policy allows the
inline script and style by hash. Images come from ``/label/image/N`` (this server) only.
"""

from __future__ import annotations

from graft.deploy.page import SECURITY_HEADERS, csp_hash

__all__ = ["LABEL_PAGE", "LABEL_PAGE_HEADERS"]

_STYLE = """
:root{--ink:#1d232b;--muted:#5d6873;--line:#d9dee4;--accent:#2f6fd0;--done:#2e7d32;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{padding:14px 24px;background:#fff;border-bottom:1px solid var(--line)}
header h1{font-size:19px;margin:0 0 4px}
.muted{color:var(--muted);font-size:13px;overflow-wrap:anywhere}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:14px;padding:20px 24px}
.card{background:#fff;border:2px solid var(--line);border-radius:10px;padding:10px}
.card.current{border-color:var(--accent)}
.card.done{border-color:var(--done)}
.card img{width:100%;height:200px;object-fit:contain;background:#eef0f3;border-radius:6px}
.name{font-size:12px;color:var(--muted);overflow-wrap:anywhere;margin:6px 0}
.buttons{display:flex;flex-wrap:wrap;gap:4px}
.buttons button{border:1px solid var(--line);background:#fff;border-radius:5px;padding:3px 7px;cursor:pointer;
overflow-wrap:anywhere}
.buttons button.chosen{background:var(--done);color:#fff;border-color:var(--done)}
.error{color:#b3261e;font-weight:600}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let items = [], classes = [], current = 0;
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);  // text, never markup: names are user data
  return node;
}
function status(text, bad) { const s = $("status"); s.textContent = text; s.className = bad ? "error" : "muted"; }
function focusNext() {
  const next = items.findIndex((item) => !item.label);
  current = next < 0 ? 0 : next;
  document.querySelectorAll(".card").forEach((card, i) => card.classList.toggle("current", i === current));
}
async function choose(index, label) {
  const response = await fetch("/label", {method: "POST", headers: {"content-type": "application/json"},
                                          body: JSON.stringify({id: items[index].id, label: label})});
  const answer = await response.json().catch(() => ({error: "no answer"}));
  if (!response.ok) { status(answer.error || ("error " + response.status), true); return; }
  items[index].label = label;
  const card = $("card-" + index);
  card.classList.add("done");
  card.querySelectorAll("button").forEach((b) => b.classList.toggle("chosen", b.dataset.label === label));
  status(answer.labelled + " labelled, written to " + answer.file);
  focusNext();
}
function card(item, index) {
  const box = el("div", "card");
  box.id = "card-" + index;
  const image = el("img");
  image.loading = "lazy";
  image.src = "/label/image/" + item.id;
  image.alt = item.name;
  box.append(image, el("div", "name", item.name));
  if (item.predicted) box.append(el("div", "muted", "model: " + item.predicted));
  const buttons = el("div", "buttons");
  classes.forEach((name, k) => {
    const button = el("button", item.label === name ? "chosen" : "", (k < 9 ? (k + 1) + " " : "") + name);
    button.dataset.label = name;
    button.addEventListener("click", () => choose(index, name));
    buttons.append(button);
  });
  box.append(buttons);
  if (item.label) box.classList.add("done");
  return box;
}
async function load() {
  const answer = await (await fetch("/label/items")).json();
  items = answer.items; classes = answer.classes;
  $("what").textContent = answer.items.length + " images from " + answer.pool + "; labels go to " + answer.file +
    " (keys 1-9 label the outlined image)";
  $("grid").replaceChildren(...items.map(card));
  focusNext();
}
document.addEventListener("keydown", (event) => {
  const k = Number(event.key);
  if (items.length && k >= 1 && k <= Math.min(9, classes.length)) choose(current, classes[k - 1]);
});
load().catch((error) => status("could not load the pool: " + error, true));
"""

LABEL_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graft: label images</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header><h1>Label images</h1><div id="what" class="muted">loading&hellip;</div><div id="status" class="muted"></div>
</header>
<div id="grid"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""

LABEL_PAGE_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {csp_hash(_SCRIPT)}; style-src {csp_hash(_STYLE)}; "
                                "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    **SECURITY_HEADERS,
}
