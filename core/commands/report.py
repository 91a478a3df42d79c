"""`bench report`: one self-contained HTML page for one or several tracked grids.

Read from the tracking store with the reader `bench table` uses, so a grid run last month reports
as well as today's. The page needs no server and no network: figures are inlined as data URIs and
the tables sort with a few lines of inline script. A cell's figures sit behind a ``<details>``, so
a page of many cells opens fast.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from pathlib import Path

from . import detections, tables

# The figures a cell's run holds (engine/record.py), shown behind its <details>.
CELL_FIGURES = ("attention", "samples", "defense", "detector")
WHAT_RAN = (("datasets", "grid.datasets"), ("attacks", "grid.attacks"), ("defenses", "grid.defenses"),
            ("detectors", "grid.detectors"),
            ("students", "grid.students"), ("teachers", "grid.teachers"), ("seeds", "grid.seeds"),
            ("clean shares", "grid.clean_shares"), ("profile", "profile"), ("device", "device"),
            ("numerics", "numerics"), ("command", "command"))

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], up = th.dataset.up !== "1";
  const key = r => { const t = r.cells[col].innerText, n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1))
    .forEach(r => body.appendChild(r));
  th.dataset.up = up ? "1" : "0";
}));
"""
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; cursor: pointer; } td { text-align: right; } td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; } details { margin: 0.3em 0; } summary { cursor: pointer; }
.note { color: #555; } .failed { color: #a00; } code { background: #f5f5f5; padding: 0 0.2em; }
@media print { details { display: block; } th { cursor: auto; } }
"""


def _cell(text: str) -> str:
    """A markdown table cell as HTML: escaped, its ``<br>`` kept, ``*paper values*`` in italics."""
    out = html.escape(text.strip()).replace("&lt;br&gt;", "<br>")
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", out)


def markdown_to_html(markdown: str) -> str:
    """What the tables module renders as Markdown (notes, then a table), as HTML: tables sortable."""
    out, rows = [], []

    def flush():
        if rows:
            head, body = rows[0], rows[2:]
            out.append('<table class="sortable"><thead><tr>' + "".join(f"<th>{_cell(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table>")
            rows.clear()
    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append(line.strip().strip("|").split(" | "))
        else:
            flush()
            if line.strip():
                out.append(f'<p class="note">{_cell(line)}</p>')
    flush()
    return "\n".join(out)


def _png(data: bytes, alt: str) -> str:
    """A PNG inlined, its colours reduced to a palette of 256: a figure loses nothing a reader sees
    and the page a good part of its bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        buf, "PNG", optimize=True)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return _png(buf.getvalue(), alt)


def _cell_figures(tracker, run, scratch: Path) -> list[str]:
    """The PNGs a cell's run holds (the original run's, for a cell reused from an earlier grid)."""
    run_id = run.data.tags.get("nadbench.reused_from", run.info.run_id)
    images = []
    for folder in CELL_FIGURES:
        for item in tracker.client.list_artifacts(run_id, folder):
            if item.path.endswith(".png"):
                local = tracker.client.download_artifacts(run_id, item.path, str(scratch))
                images.append(_png(Path(local).read_bytes(), item.path))
    return images


def _what_ran(parent, children) -> str:
    params = parent.data.params
    rows = [(label, params[key]) for label, key in WHAT_RAN if params.get(key)]
    cell = children[0].data.params if children else {}  # each cell records the code that ran it
    rows += [(label, cell[key]) for label, key in (("nadbench", "nadbench.version"), ("commit", "nadbench.git_commit"))
             if key in cell]
    rows += [("run", f"{parent.info.run_name} ({parent.info.run_id})"),
             ("host", parent.data.tags.get("nadbench.host", "?"))]
    return '<table><tbody>' + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                                      for k, v in rows) + "</tbody></table>"


def _cells(tracker, children, scratch: Path) -> str:
    """Each cell: its numbers before and after, its figures behind a click; failed cells with their error."""
    out = []
    for run in children:
        name = html.escape(run.info.run_name or run.info.run_id)
        if run.info.status == "FAILED":
            error = run.data.tags.get("error", "failed").splitlines()[0]
            out.append(f'<p class="failed">{name}: failed: {html.escape(error)}</p>')
            continue
        result = json.loads(run.data.tags.get("nadbench.result", "{}"))  # what `bench table` reads
        numbers = ", ".join(f"{phase} {k.upper()} {100 * result[phase][k]:.2f}" for phase in ("before", "after")
                            for k in ("asr", "acc") if k in result.get(phase, {}))
        if result.get("kind") == "detection":
            numbers = ", ".join(f"{k.upper()} {100 * result['detection'][k]:.2f}" for k in ("auroc", "tpr", "f1"))
        figures = "".join(f"<p>{image}</p>" for image in _cell_figures(tracker, run, scratch))
        out.append(f"<details><summary>{name}: {numbers}</summary>{figures or '<p>no figures</p>'}</details>")
    return "\n".join(out)


def build(tracker, grids: list[tuple]) -> str:
    """The page for ``grids`` (each ``(parent run, results)`` as ``Tracker.grid_results`` gives them):
    per grid what ran, Table 1 in the paper's layout, the RA / DER view, its cells; then the
    leaderboard over all of them."""
    from .. import __version__

    parts = [f"<h1>nadbench report</h1><p class=\"note\">From {html.escape(tracker.uri)}, experiment "
             f"{html.escape(tracker.experiment_name)}; nadbench {__version__}. Open the runs with "
             f"<code>bench ui --tracking-uri {html.escape(tracker.uri)}</code>.</p>"]
    with tempfile.TemporaryDirectory() as scratch:
        for parent, results in grids:
            title, children = parent.info.run_name or parent.info.run_id, tracker.children(parent)
            parts += [f"<h2>{html.escape(title)}</h2>", "<h3>What ran</h3>", _what_ran(parent, children)]
            if tables.repairs(results):
                t = tables.build(results, paper=True)
                parts += ["<h3>Table 1</h3>", markdown_to_html(tables.render(t, "markdown")),
                          _figure(tables.figure(t, title), "Table 1 as bars"), "<h3>Robust accuracy and DER</h3>",
                          markdown_to_html(tables.render(tables.build(results, metrics=("ra", "der")), "markdown"))]
            found = detections.detections(results)
            if found:
                parts += ["<h3>Detection</h3>", markdown_to_html(detections.render(
                    detections.build(found), "markdown", found[0].get("fpr_target", 0.05)))]
            parts += ["<h3>Cells</h3>", _cells(tracker, children, Path(scratch))]
    everything = [r for _, rs in grids for r in rs]
    board = tables.leaderboard(everything)
    if board:
        parts += ["<h2>Leaderboard</h2>", markdown_to_html(tables.render_leaderboard(board, "markdown")),
                  _figure(tables.leaderboard_figure(board, "leaderboard"), "the leaderboard as bars")]
    if detections.detections(everything):
        parts += ["<h2>Detectors</h2>", markdown_to_html(detections.render_leaderboard(
            detections.leaderboard(everything), "markdown"))]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>nadbench report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{SORT_SCRIPT}</script></body></html>\n")
