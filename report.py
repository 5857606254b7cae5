"""Render the notebook series as a static HTML report that reads offline.

    python report.py                   # the committed notebooks -> build/html
    python report.py --notebooks build/notebooks --out build/html

One page per notebook (nbconvert's lab template, outputs as stored, nothing
re-executed) and an index page with a line per notebook and the headline
results. Math is typeset by a copy of MathJax taken from the PyPI package
jupyter-server-mathjax, so no page loads anything from the network.
`make report` calls this; `make run` renders its own executed notebooks.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
from pathlib import Path

import helpers as hp

# the configurations that jupyter-server-mathjax ships (HTML-CSS output)
MATHJAX = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"


def title_and_blurb(nb) -> tuple[str, str]:
    """The notebook's '# NN — title' heading and its first paragraph."""
    first = "".join(nb.cells[0].source).split("\n\n")
    title = first[0].lstrip("# ").strip()
    blurb = first[1].replace("\n", " ").strip() if len(first) > 1 else ""
    return title, blurb


def first_sentences(text: str, limit: int = 320) -> str:
    """Whole sentences from the start of ``text``, at most ``limit`` long."""
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[:end + 1] if end > 0 else cut


def render(notebooks: Path, out: Path, metrics_path: Path) -> Path:
    import jupyter_server_mathjax
    import nbformat
    from nbconvert import HTMLExporter

    out.mkdir(parents=True, exist_ok=True)
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (out / "mathjax").exists():
        shutil.copytree(static, out / "mathjax")
    exporter = HTMLExporter(template_name="lab", mathjax_url=MATHJAX,
                            require_js_url="", jquery_url="",
                            embed_images=True)
    rows = []
    for path in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        title, blurb = title_and_blurb(nb)
        body, _ = exporter.from_notebook_node(nb, resources={
            "metadata": {"name": title}})
        body = body.replace('<script src=""></script>', "")  # no require.js
        page = path.stem + ".html"
        (out / page).write_text(body, encoding="utf-8")
        rows.append(f'<li><a href="{page}">{html.escape(title)}</a>: '
                    f"{html.escape(first_sentences(blurb))}</li>")
    metrics = json.loads(metrics_path.read_text()) \
        if metrics_path.exists() else {}
    from run_series import RESULTS

    table = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{fmt.format(metrics[key])}"
        f"</td></tr>" for key, label, fmt in RESULTS if key in metrics)
    index = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>The VAE notebook series</title>
<script type="text/x-mathjax-config">
MathJax.Hub.Config({{tex2jax: {{inlineMath: [['$', '$']],
                               processEscapes: true}}}});
</script>
<script src="{MATHJAX}"></script>
<style>
body {{ font-family: sans-serif; max-width: 52em; margin: 2em auto;
       line-height: 1.5; padding: 0 1em; }}
td {{ padding: 0.2em 1em 0.2em 0; border-bottom: 1px solid #ddd; }}
li {{ margin-bottom: 0.6em; }}
</style></head><body>
<h1>The VAE notebook series</h1>
<p>Eight notebooks that build, train and take apart a variational
autoencoder on binarised MNIST (Kingma &amp; Welling 2013, Appendix C) with a
two-dimensional latent space, written to be run, taught from and read as a
report. Every page below shows the outputs of the committed run.</p>
<ol>{''.join(rows)}</ol>
<h2>Headline results</h2>
<p>Nats per image unless stated.</p>
<table>{table}</table>
</body></html>
"""
    (out / "index.html").write_text(index, encoding="utf-8")
    return out / "index.html"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--notebooks", default=str(hp.NOTEBOOKS_DIR))
    ap.add_argument("--out", default="build/html")
    ap.add_argument("--metrics", default=str(hp.DATA_DIR / "metrics.json"))
    args = ap.parse_args(argv)
    index = render(Path(args.notebooks), Path(args.out), Path(args.metrics))
    print(f"Report written: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
