"""``report.html`` of a run directory: one self-contained page (pictures inlined as data URIs,
no script or style from the network) that opens from disk: a summary, the plots, and a
sortable, filterable table of every image with its overlay beside its nearest normal image."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import cv2
import numpy as np

from .. import metrics
from ..clock import utc_now
from ..images import ImageError, load_image
from . import pictures
from .runs import RunDir

THUMB = 150
NORMAL_FOLDERS = ("good", "normal", "ok")


def _data_uri(rgb: np.ndarray, size: int = THUMB) -> str:
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(jpg.tobytes()).decode() if ok else ""


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""


def _thumb(path) -> str:
    try:
        return _data_uri(load_image(path).rgb)  # a file, or a video's frame
    except (ImageError, OSError):
        return ""


def _thumbs(paths: list[str]) -> dict[str, str]:
    """Thumbnails of ``paths``, each decoded once, in threads (OpenCV releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(_thumb, paths)))


def _labels(rows: list[dict]) -> np.ndarray | None:
    """1 for images outside a normal folder (``good``...), when both kinds are present."""
    labels = np.array([r["folder"].lower() not in NORMAL_FOLDERS for r in rows], dtype=int)
    return labels if 0 < labels.sum() < len(labels) else None


def summary(run: RunDir, rows: list[dict]) -> dict:
    """Counts, thresholds, timing and, when the folders tell normal from anomalous, metrics."""
    manifest = run.manifest() or {}
    scored = [r for r in rows if r["score"]]
    flagged = sum(1 for r in scored if r["is_anomalous"] == "1")
    out = {"images": len(scored), "flagged anomalous": flagged if manifest.get("tau") is not None else "n/a",
           "errors": len(run.error_rows()), "tau (image threshold)": manifest.get("tau"),
           "theta (pixel threshold)": manifest.get("theta"), "corpus": manifest.get("corpus"),
           "corpus images": manifest.get("corpus_images"), "scoring": manifest.get("scoring"),
           "started": manifest.get("started"), "invocations": len(manifest.get("runs") or []),
           "scoring time (s, all invocations)": round(sum(r.get("seconds", 0) for r in manifest.get("runs") or []), 2),
           "last finished": (manifest.get("runs") or [{}])[-1].get("finished")}
    m = run.metrics_record()
    if m is not None:
        out["metrics"] = {k: round(m[k], 4) for k in ("image_AUROC", "pixel_AUROC", "AUPRO") if k in m}
    else:
        labels = _labels(scored)
        if labels is not None:
            scores = np.array([float(r["score"]) for r in scored])
            out["metrics"] = {"image_AUROC (folders as labels)": round(metrics.auroc(labels, scores), 4)}
    return out


def _fact(value) -> str:
    """A summary value as HTML: a dict as ``key: value`` lines, not JSON."""
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in value.items())
    return html.escape(str(value))


def _plots(run: RunDir, rows: list[dict], tau) -> list[tuple[str, str]]:
    plots = [(name, _file_uri(run.plot(name))) for name in run.PLOTS]
    scores = [float(r["score"]) for r in rows if r["score"]]
    if scores:
        svg = pictures.histogram_svg(scores, tau).encode()
        plots.append(("score histogram", "data:image/svg+xml;base64," + base64.b64encode(svg).decode()))
    return [(n, uri) for n, uri in plots if uri]


def write_report(run_dir) -> Path:
    """Write ``run_dir/report.html`` from the run's files and return its path (each picture
    decoded once: rows share their nearest normal images)."""
    run = RunDir(run_dir)
    thumbs: dict[str, str] = {}

    def thumb(path) -> str:
        return thumbs[str(path)]

    run_dir = run.path
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    rows = run.score_rows()
    if not rows and not run.error_rows():
        raise ValueError(f"{run_dir}: no scores.csv: not a run directory (written by `spade-faiss score`)")
    info = summary(run, rows)
    pictures_needed = {str(run_dir / r["overlay"]) for r in rows if r.get("overlay")}
    pictures_needed |= {r["neighbour_paths"].split(";")[0] for r in rows if r["neighbour_paths"]}
    thumbs.update(_thumbs(sorted(pictures_needed)))
    table = []
    for r in sorted(rows, key=lambda r: -float(r["score"] or "nan")):
        overlay = run_dir / r["overlay"] if r.get("overlay") else None
        nearest = (r["neighbour_paths"].split(";") or [""])[0]
        verdict = {"1": "anomalous", "0": "normal"}.get(r["is_anomalous"], "not calibrated")
        regions = r.get("regions") or ""  # with a pixel threshold: how many, and the largest's area
        largest = f" (largest {r['largest_region']} px)" if regions not in ("", "0") else ""
        table.append(f"<tr data-score='{float(r['score']):.6g}' data-map='{r['map_max'] or 0}' "
                     f"data-regions='{regions or 0}'>"
                     f"<td class='name'>{html.escape(r['image_path'])}</td><td>{html.escape(r['folder'])}</td>"
                     f"<td>{float(r['score']):.4g}</td><td class='{verdict.replace(' ', '-')}'>{verdict}</td>"
                     f"<td>{r['map_max'] or ''}</td><td>{html.escape(str(regions) + largest)}</td>"
                     f"<td><img alt='overlay' src='{thumb(overlay) if overlay else ''}'></td>"
                     f"<td><img alt='nearest normal' src='{thumb(nearest) if nearest else ''}'>"
                     f"<div class='small'>{html.escape(Path(nearest).name)}</div></td></tr>")
    errors = "".join(f"<li>{html.escape(e['image_path'])}: {html.escape(e['reason'])}</li>" for e in run.error_rows())
    plots = "".join(f"<figure><img src='{uri}' alt='{html.escape(n)}'><figcaption>{html.escape(n)}</figcaption>"
                    f"</figure>" for n, uri in _plots(run, rows, info["tau (image threshold)"]))
    sheets = run.explain_sheets()
    why = "".join(f"<figure><img src='{_file_uri(p)}' alt='explanation'><figcaption>"
                  f"{html.escape(str(p.relative_to(run_dir)))}</figcaption></figure>" for p in sheets)
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fact(v)}</td></tr>"
                    for k, v in info.items() if v not in (None, {}))
    why = f"<h2>Why: nearest normal patches of the most anomalous images</h2>{why}" if why else ""
    page = TEMPLATE.format(title=html.escape(f"spade-faiss: {run_dir.resolve().name}"), facts=facts, plots=plots + why,
                           rows="".join(table), errors=f"<h2>Skipped inputs</h2><ul>{errors}</ul>" if errors else "",
                           written=utc_now())
    out = run.report
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: middle; }}
#images th {{ cursor: pointer; background: #eee; user-select: none; }}
.anomalous {{ color: #b00; font-weight: bold; }} .normal {{ color: #070; }} .not-calibrated {{ color: #888; }}
.small {{ font-size: 75%; color: #666; }} .name {{ max-width: 28em; word-break: break-all; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} figure img {{ max-height: 320px; }}
#controls {{ margin: 0.5em 0; }}
</style></head><body>
<h1>{title}</h1>
<p class="small">Scores: higher = more anomalous. Overlays share one colour scale (blue 0 to red at twice the pixel
threshold); white contours mark pixels above the threshold. Written {written}.</p>
<h2>Summary</h2><table id="summary">{facts}</table>
<h2>Plots</h2>{plots}
<h2>Images</h2>
<div id="controls"><input id="filter" placeholder="filter by name or folder" size="30">
<select id="verdict"><option value="">all verdicts</option><option>anomalous</option><option>normal</option></select>
<span id="count"></span></div>
<table id="images"><thead><tr><th data-key="name">image</th><th data-key="folder">folder</th>
<th data-key="score">score</th><th data-key="verdict">verdict</th><th data-key="map">map max</th>
<th data-key="regions">defect regions</th>
<th>overlay</th><th>nearest normal image</th></tr></thead><tbody>{rows}</tbody></table>
{errors}
<script>
const body = document.querySelector('#images tbody');
const rows = Array.from(body.rows);
let sortKey = 'score', ascending = false;
function cell(r, key) {{
  if (key === 'score') return parseFloat(r.dataset.score);
  if (key === 'map') return parseFloat(r.dataset.map);
  if (key === 'regions') return parseFloat(r.dataset.regions);
  const i = {{name: 0, folder: 1, verdict: 3}}[key];
  return r.cells[i].textContent;
}}
function render() {{
  const text = document.getElementById('filter').value.toLowerCase();
  const verdict = document.getElementById('verdict').value;
  const shown = rows.filter(r => (r.cells[0].textContent + ' ' + r.cells[1].textContent).toLowerCase().includes(text)
                                 && (!verdict || r.cells[3].textContent === verdict));
  shown.sort((a, b) => {{ const x = cell(a, sortKey), y = cell(b, sortKey);
                          return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); }});
  body.replaceChildren(...shown);
  document.getElementById('count').textContent = shown.length + ' of ' + rows.length + ' images';
}}
document.querySelectorAll('#images th[data-key]').forEach(th => th.addEventListener('click', () => {{
  ascending = sortKey === th.dataset.key ? !ascending : true; sortKey = th.dataset.key; render(); }}));
document.getElementById('filter').addEventListener('input', render);
document.getElementById('verdict').addEventListener('change', render);
render();
</script></body></html>
"""
