"""The review page `graft serve RUN --audit OUT` answers on ``GET /review``: one constant string, like the main page.

Everything that varies (paths, labels, class names) arrives as JSON from ``/review/items`` and goes into the DOM
through ``textContent`` only; thumbnails are ``/review/thumb/N`` (numbers, never paths). The CSP allows exactly this
script and style by hash, images and fetches from this server only, and no forms.
"""

from __future__ import annotations

from graft.deploy.page import SECURITY_HEADERS, csp_hash

__all__ = ["REVIEW_HEADERS", "REVIEW_PAGE"]

_STYLE = """
:root{--ink:#1d232b;--muted:#5d6873;--line:#d9dee4;--accent:#2f6fd0;--bad:#b3261e;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{padding:14px 24px;background:#fff;border-bottom:1px solid var(--line)}
header h1{font-size:19px;margin:0}
main{padding:20px 24px;max-width:1200px}
h2{font-size:16px}
.muted{color:var(--muted);font-size:13px}
.list{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px}
.card .images{display:flex;gap:8px}
.card img,.card .none{width:140px;height:140px;object-fit:contain;background:#eef0f3;border-radius:6px}
.card .none{display:flex;align-items:center;justify-content:center;font-size:12px;color:var(--muted);padding:6px}
.name{font-size:13px;color:var(--muted);overflow-wrap:anywhere;margin:6px 0}
.buttons{display:flex;flex-wrap:wrap;gap:6px;margin-top:8px}
button,select{font:inherit;font-size:13px}
.decided{font-weight:600;color:var(--accent);margin-top:6px}
.error{color:var(--bad);font-weight:600;overflow-wrap:anywhere}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let classes = [];
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);  // text, never markup: names are data
  return node;
}
function thumb(item) {
  if (Number.isInteger(item.thumb)) {
    const image = el("img");
    image.alt = item.path;
    image.src = "/review/thumb/" + item.thumb;
    return image;
  }
  return el("div", "none", "no thumbnail: not a file inside the dataset");
}
function status(card, item) {
  const line = card.querySelector(".decided");
  line.textContent = item.decision ? "decided: " + item.decision : "";
}
async function decide(card, item, decision, label) {
  try {
    const response = await fetch("/review/decide", {method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({item: item.id, decision: decision, label: label || ""})});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    item.decision = decision + (decision === "relabel" ? " " + label : "");
    status(card, item);
  } catch (error) {
    card.querySelector(".decided").replaceChildren(el("span", "error", String(error.message).split("\\n")[0]));
  }
}
function button(card, item, text, decision, label) {
  const node = el("button", "", text);
  node.type = "button";
  node.addEventListener("click", () => decide(card, item, decision, typeof label === "function" ? label() : label));
  return node;
}
function relabelTo(card, item) {
  const select = el("select");
  for (const name of classes) {
    const option = el("option", "", name);
    option.value = name;
    select.append(option);
  }
  return [select, button(card, item, "relabel to", "relabel", () => select.value)];
}
function issueCard(item) {
  const card = el("div", "card");
  const images = el("div", "images");
  images.append(thumb(item));
  const facts = el("div");
  facts.append(el("div", "", "given: " + item.given), el("div", "", "suggested: " + item.suggested),
    el("div", "muted", "score " + item.score));
  images.append(facts);
  const buttons = el("div", "buttons");
  if (Number.isInteger(item.thumb)) {  // only a file inside the dataset can be decided on (the server says the same)
    buttons.append(button(card, item, "confirm (relabel to " + item.suggested + ")", "relabel", item.suggested),
      button(card, item, "reject (keep)", "keep"), button(card, item, "exclude", "exclude"), ...relabelTo(card, item));
  }
  card.append(images, el("div", "name", item.path), buttons, el("div", "decided"));
  status(card, item);
  return card;
}
function pairCard(pair) {
  const card = el("div", "card");
  const images = el("div", "images");
  images.append(thumb(pair.a), thumb(pair.b));
  card.append(images, el("div", "muted", pair.kind + ", similarity " + pair.similarity));
  for (const [side, item] of [["A", pair.a], ["B", pair.b]]) {
    const part = el("div");
    const buttons = el("div", "buttons");
    if (Number.isInteger(item.thumb)) {
      buttons.append(button(part, item, "exclude " + side, "exclude"), button(part, item, "keep " + side, "keep"));
    }
    part.append(el("div", "name", side + ": " + item.path), buttons, el("div", "decided"));
    status(part, item);
    card.append(part);
  }
  return card;
}
async function load() {
  try {
    const response = await fetch("/review/items");
    const items = await response.json();
    if (!response.ok) throw new Error(items.error || response.statusText);
    classes = items.classes || [];
    $("where").textContent = "Decisions are appended to " + items.decisions + " (graft fit --exclude reads it); " +
      "images are never moved or edited. Dataset: " + items.data;
    $("issues-count").textContent = String((items.label_issues || []).length);
    $("pairs-count").textContent = String((items.duplicates || []).length);
    $("issues").replaceChildren(...(items.label_issues || []).map(issueCard));
    $("pairs").replaceChildren(...(items.duplicates || []).map(pairCard));
  } catch (error) {
    $("where").replaceChildren(el("span", "error", "could not read /review/items: " + error.message));
  }
}
load();
"""

REVIEW_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graft: review the audit</title>
<style>{_STYLE}</style>
</head>
<body>
<header><h1>Review the audit</h1><p class="muted" id="where">loading&hellip;</p></header>
<main>
<h2>Label issues (<span id="issues-count">0</span>)</h2>
<div class="list" id="issues"></div>
<h2>Duplicate pairs (<span id="pairs-count">0</span>)</h2>
<div class="list" id="pairs"></div>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""

REVIEW_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {csp_hash(_SCRIPT)}; style-src {csp_hash(_STYLE)}; "
                                "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    **SECURITY_HEADERS,
}
