"""The web page ``graft serve`` answers on ``GET /``, its security headers, the run facts it shows, and the report.

The page is one constant string (HTML with its CSS and JS inline; no CDN, fonts or external images). It is static:
everything that varies (classes, backbone, metrics) arrives as JSON from ``/metadata`` and goes into the DOM through
``textContent`` only, so a class folder named ``<img src=x onerror=alert(1)>`` is shown as text. Because the script
and style never change, the Content-Security-Policy allows exactly them by SHA-256 hash: no ``'unsafe-inline'`` and
no per-response nonce (nothing is templated, so a nonce would buy nothing a hash does not).

Optional explanations: when ``/metadata`` lists an ``/explain`` endpoint, the page offers a "where it looked" switch
and POSTs each file there as it does to ``/predict``; an ``overlay`` (a ``data:image/png;base64,...`` URI or a
same-origin path) in that answer, or in a ``/predict`` row, is shown beside the thumbnail.

A multi-label run's row (``classes`` in it: graft.deploy.labelsets) is drawn as its label set, then every class's
probability bar with its threshold marked and the classes that reached theirs ticked; never a "top-1".
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

from graft.evaluation.metrics import calibration_sentence
from graft.models.run_folder import trained_as
from graft.utils.files import read_json_object
from graft.utils.text import display_name

__all__ = ["PAGE", "PAGE_HEADERS", "REPORT_HEADERS", "SECURITY_HEADERS", "csp_hash", "latest_report", "run_facts"]

_STYLE = """
:root{--ink:#1d232b;--muted:#5d6873;--line:#d9dee4;--accent:#2f6fd0;--bad:#b3261e;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{padding:14px 24px;background:#fff;border-bottom:1px solid var(--line);display:flex;gap:16px;align-items:baseline}
header h1{font-size:19px;margin:0}
header a{color:var(--accent)}
main{display:grid;grid-template-columns:minmax(0,1fr) 300px;gap:20px;padding:20px 24px;max-width:1200px}
@media (max-width:800px){main{grid-template-columns:1fr}}
#drop{border:2px dashed var(--line);border-radius:10px;background:#fff;padding:26px;text-align:center;cursor:pointer}
#drop.over{border-color:var(--accent);background:#eef4fd}
#drop p{margin:4px 0}
.muted{color:var(--muted);font-size:13px}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px;margin-top:16px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px}
.card .images{display:flex;gap:8px}
.card img{width:112px;height:112px;object-fit:contain;background:#eef0f3;border-radius:6px}
.card .name{font-size:13px;color:var(--muted);overflow-wrap:anywhere;margin:6px 0}
.top1,.set{font-weight:600;font-size:16px;overflow-wrap:anywhere}
.label{display:grid;grid-template-columns:minmax(0,1fr) 52px;gap:2px 8px;font-size:13px;margin-top:4px}
.label span{overflow-wrap:anywhere}
.label .pct{text-align:right;font-variant-numeric:tabular-nums}
.bar{grid-column:1/3;height:6px;background:#e7eaee;border-radius:3px;overflow:hidden;position:relative}
.fill{height:100%;background:var(--accent)}
.mark{position:absolute;top:0;width:2px;height:100%;background:var(--ink)}
.label.passed span:first-child{font-weight:600}
.error{color:var(--bad);font-weight:600;overflow-wrap:anywhere}
aside{background:#fff;border:1px solid var(--line);border-radius:10px;padding:14px;align-self:start}
aside h2{font-size:15px;margin:0 0 8px}
dl{display:grid;grid-template-columns:auto minmax(0,1fr);gap:3px 10px;margin:0 0 10px;font-size:13px}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
#explain-switch{display:none;margin-top:10px}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let meta = {endpoints: []};
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);  // text, never markup: names are user data
  return node;
}
function pct(value) { return (100 * value).toFixed(1) + "%"; }
function fact(list, name, value) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", "", name), el("dd", "", value));
}
function renderFacts(m) {
  const box = $("facts");
  box.replaceChildren(el("h2", "", "Model"));
  for (const run of m.facts || []) {
    const list = el("dl");
    fact(list, "run", run.run);
    fact(list, "backbone", run.backbone);
    fact(list, "strategy", run.strategy);
    fact(list, "trained", run.trained);
    const val = run.val || {};
    fact(list, "val accuracy", typeof val.accuracy === "number" ? pct(val.accuracy) : null);
    for (const [key, value] of Object.entries(val)) {
      if (/^top\\d+_accuracy$/.test(key) && typeof value === "number") fact(list, key.replace("_", " "), pct(value));
    }
    fact(list, "val mAP", typeof val.mAP === "number" ? val.mAP.toFixed(3) : null);
    fact(list, "val micro F1", typeof val.micro_f1 === "number" ? val.micro_f1.toFixed(3) : null);
    fact(list, "val macro F1", typeof val.macro_f1 === "number" ? val.macro_f1.toFixed(3) : null);
    fact(list, "val exact match", typeof val.exact_match === "number" ? pct(val.exact_match) : null);
    fact(list, "val images", val.images);
    fact(list, "calibration", run.calibration);
    box.append(list);
  }
  const classes = m.classes || [];
  box.append(el("h2", "", classes.length + " classes" + (m.multi_label ? ", label sets" : "")));
  const names = el("p", "muted");  // a set's classes with the threshold each must reach
  names.textContent = m.multi_label ? classes.map((c, i) => c + " \u2265 " + pct(m.thresholds[i])).join(", ")
    : classes.join(", ");
  box.append(names);
  if (m.limits) {
    box.append(el("p", "muted", "Limits: " + (m.limits.max_upload_bytes / 1048576).toFixed(1) + " MB, " +
      m.limits.max_pixels.toLocaleString() + " pixels per image."));
  }
  if (m.report) $("report-link").hidden = false;
  if ((m.endpoints || []).includes("/explain")) $("explain-switch").style.display = "block";
}
async function loadMeta() {
  try {
    const response = await fetch("/metadata");
    meta = await response.json();
    renderFacts(meta);
  } catch (error) {
    $("facts").replaceChildren(el("p", "error", "could not read /metadata: " + error.message));
  }
}
function safeImage(url) {
  return typeof url === "string" && (/^data:image\\/(png|jpeg|webp);base64,/.test(url) ||
    (url.startsWith("/") && !url.startsWith("//")));
}
function showOverlay(card, url) {
  if (!safeImage(url)) return;
  const image = el("img", "overlay");
  image.alt = "where the model looked";
  image.src = url;
  card.querySelector(".images").append(image);
}
function showError(card, message) {
  card.querySelector(".out").classList.remove("muted");
  card.querySelector(".out").replaceChildren(el("div", "error", String(message).split("\\n")[0]));
}
function showSet(card, row) {  // a multi-label run: the set, then every class against its threshold
  const out = card.querySelector(".out");
  out.classList.remove("muted");
  out.replaceChildren(el("div", "set", row.labels.length ? row.labels.join(", ") : "no class reaches its threshold"));
  for (const c of row.classes) {
    const line = el("div", c.passed ? "label passed" : "label");
    const fill = el("div", "fill");
    fill.style.width = pct(c.probability);
    const mark = el("div", "mark");
    mark.style.left = pct(c.threshold);
    mark.title = "threshold " + pct(c.threshold);
    const bar = el("div", "bar");
    bar.append(fill, mark);
    line.append(el("span", "", (c.passed ? "\u2713 " : "") + c.label), el("span", "pct", pct(c.probability)), bar);
    out.append(line);
  }
}
function showLabels(card, row) {
  if (Array.isArray(row.classes)) return showSet(card, row);
  const out = card.querySelector(".out");
  out.classList.remove("muted");
  out.replaceChildren(el("div", "top1", row.labels[0]));
  row.labels.forEach((label, i) => {
    const line = el("div", "label");
    const fill = el("div", "fill");
    fill.style.width = pct(row.probabilities[i]);  // CSSOM, which the CSP allows (a style attribute it would not)
    const bar = el("div", "bar");
    bar.append(fill);
    line.append(el("span", "", label), el("span", "pct", pct(row.probabilities[i])), bar);
    out.append(line);
  });
}
async function post(path, file) {
  const body = new FormData();
  body.append("file", file, file.name);
  const response = await fetch(path, {method: "POST", body});
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok) throw new Error(data && typeof data.error === "string" ? data.error : "HTTP " + response.status);
  return data;
}
async function classify(file, card) {
  try {
    const row = (await post("/predict", file)).predictions[0];
    showLabels(card, row);
    if (row.overlay) showOverlay(card, row.overlay);
    else if ($("explain").checked && (meta.endpoints || []).includes("/explain")) {
      const answer = await post("/explain", file);
      const first = (answer.explanations || answer.predictions || [])[0] || {};
      showOverlay(card, first.overlay);
    }
  } catch (error) {
    showError(card, error.message);
  }
  card.classList.add("done");
}
function addCard(file) {
  const card = el("div", "card");
  const images = el("div", "images");
  const thumb = el("img", "thumb");
  thumb.alt = file.name;
  thumb.onerror = () => { thumb.hidden = true; };  // not an image: the server's answer says why
  thumb.src = URL.createObjectURL(file);
  images.append(thumb);
  card.append(images, el("div", "name", file.name), el("div", "out muted", "classifying\\u2026"));
  $("results").prepend(card);
  return card;
}
async function handle(files) {
  const queue = Array.from(files).map((file) => [file, addCard(file)]);
  const worker = async () => {
    while (queue.length) { const [file, card] = queue.shift(); await classify(file, card); }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);  // one request per file, four at a time
}
const drop = $("drop");
drop.addEventListener("click", () => $("picker").click());
drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("picker").click(); });
$("picker").addEventListener("change", (event) => { handle(event.target.files); event.target.value = ""; });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handle(event.dataTransfer.files);
});
window.addEventListener("dragover", (event) => event.preventDefault());  // a missed drop must not navigate away
window.addEventListener("drop", (event) => event.preventDefault());
loadMeta();
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graft</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header><h1>graft</h1><span class="muted">drop images to classify them</span>
<a id="report-link" href="/report" hidden>evaluation report</a></header>
<main>
<section>
<div id="drop" tabindex="0" role="button" aria-label="choose or drop images">
<p><strong>Drop images here</strong> or click to choose files</p>
<p class="muted">They go only to this server's /predict; nothing is stored.</p>
<input id="picker" type="file" accept="image/*" multiple hidden>
</div>
<label id="explain-switch"><input id="explain" type="checkbox"> show where the model looked</label>
<div id="results"></div>
</section>
<aside id="facts"><p class="muted">loading the model's facts&hellip;</p></aside>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def csp_hash(text: str) -> str:
    """A Content-Security-Policy source for exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

# Only this page's own script and style run; images from this server, data: (overlays) and blob: (the thumbnails
# made from the user's own files); fetch only to this server; no forms, frames, plugins or <base>.
PAGE_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {csp_hash(_SCRIPT)}; style-src {csp_hash(_STYLE)}; "
                                "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    **SECURITY_HEADERS,
}

# The report is graft's own self-contained HTML (plots as data: URIs, one inline <style>) and needs no script at all;
# its style is allowed inline because the report module owns it and a hash here would break on every change there.
REPORT_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    **SECURITY_HEADERS,
}


# the validation numbers the page shows (mAP, micro F1 and exact match: a multi-label run's)
_SHOWN = ("images", "macro_f1", "ece", "mean_confidence", "mAP", "micro_f1", "exact_match")


def run_facts(run_dir: str | os.PathLike) -> dict:
    """What the page shows about one run: backbone, strategy, when trained and the validation numbers."""
    run = Path(run_dir)
    card, metrics = read_json_object(run / "graft.json"), read_json_object(run / "metrics.json")
    val = metrics.get("val") if isinstance(metrics.get("val"), dict) else {}
    numbers = {key: value for key, value in val.items() if key in _SHOWN or key.endswith("accuracy")}
    try:
        trained = datetime.fromtimestamp((run / "model.safetensors").stat().st_mtime, timezone.utc)
        when = trained.strftime("%Y-%m-%d %H:%M UTC")
    except OSError:
        when = None
    return {"run": display_name(run.name), "backbone": display_name(str(card.get("backbone", ""))),
            "strategy": display_name(trained_as(card)) if card else "", "trained": when,
            "val": {key: value for key, value in numbers.items() if isinstance(value, (int, float))},
            "calibration": _calibration(val)}


def _calibration(val: dict) -> str | None:
    """The validation verdict in words (over-/under-confident or calibrated), None where metrics.json has none."""
    needed = {"calibration": str, "ece": float, "mean_confidence": float, "accuracy": float}
    if not all(isinstance(val.get(key), kind) for key, kind in needed.items()):
        return None
    if val["calibration"] not in ("over-confident", "under-confident", "calibrated"):
        return None  # a hand-edited metrics.json: shown only when it says one of graft's own verdicts
    return display_name(calibration_sentence(val))


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and not path.parent.is_symlink()


def latest_report(run_dirs) -> Path | None:
    """The newest ``report.html`` directly in a run folder or one folder below it (``eval-DATA/``), or None.

    Symbolic links are not followed: the server hands out graft's own reports, never a file a link points at."""
    found = []
    for run in map(Path, run_dirs):
        for path in [run / "report.html", *run.glob("*/report.html")]:
            try:
                if _regular_file(path):
                    found.append((path.stat().st_mtime, str(path), path))
            except OSError:  # removed or unreadable between the listing and the look: not a report to serve
                continue
    return max(found)[2] if found else None
