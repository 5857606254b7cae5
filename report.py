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
import collections
import html
import json
import math
import shutil
import statistics
from pathlib import Path

import helpers as hp

# the configurations that jupyter-server-mathjax ships (HTML-CSS output)
MATHJAX = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"

# The headline results: metrics key, what it is, the notebook that records
# it (and prints it in this format) or "bench" for the benchmark, format.
# The README's table, the HTML index and the test that holds the metrics
# file against the notebooks' outputs all read this list.
RESULTS = [
    ("train_elbo", "train ELBO, mean of K = 100 samples per image", "03",
     "{:.2f}"),
    ("test_elbo", "test ELBO, mean of K = 100 samples per image", "03",
     "{:.2f}"),
    ("train_log_px_quadrature", "train log p(x), quadrature", "04",
     "{:.2f}"),
    ("test_log_px_quadrature", "test log p(x), quadrature", "04", "{:.2f}"),
    ("test_iwae", "test IWAE bound (K = {elbo_samples}), {n_iwae} random "
     "test images", "04", "{:.2f}"),
    ("test_iwae_gap", "test log p(x) - IWAE bound (K = {elbo_samples}), "
     "{n_iwae} random test images", "04", "{:.2f}"),
    ("test_log_px_prior_mc",
     "test log p(x), prior Monte Carlo, {n_check} random test images", "04",
     "{:.2f}"),
    ("quadrature_prior_mc_mean_abs_diff",
     "mean abs. difference quadrature vs prior MC, same images", "04",
     "{:.3f}"),
    ("mixture_test_log_px", "test log p(x), mixture of {mixture_components} "
     "Bernoulli products (the size chosen on held-out training images)",
     "04", "{:.2f}"),
    ("frankenstein_auc", "AUC, natural vs spliced digits", "04", "{:.3f}"),
    ("elbo_heldout", "held-out ELBO, K = {elbo_samples} (training images "
     "{held_out}, never trained on)", "04", "{:.2f}"),
    ("log_px_heldout", "held-out log p(x), quadrature", "04", "{:.2f}"),
    ("approximation_gap", "approximation gap, {n_gap} random test images, "
     "mean", "07", "{:.2f}"),
    ("amortization_gap_train", "amortisation gap, {n_gap} random training "
     "images, mean", "07", "{:.2f}"),
    ("amortization_gap_heldout", "amortisation gap, {n_gap} random held-out "
     "images, mean", "07", "{:.2f}"),
    ("amortization_gap", "amortisation gap, {n_gap} random test images, "
     "mean", "07", "{:.2f}"),
    ("amortization_gap_median", "amortisation gap, {n_gap} random test "
     "images, median", "07", "{:.2f}"),
    ("refine_share_closed_100", "share of that gap closed by 100 SVI steps "
     "from the encoder's q, {n_refine} test images", "07", "{:.0%}"),
    ("grad_variance_ratio_sf",
     "variance of the ELBO's gradient in mu_1, summed over a minibatch, "
     "K = 1: score function / reparam.", "08", "{:,.0f}"),
    ("grad_variance_ratio_sf_baseline",
     "that variance, score function with a per-image baseline ({calls} "
     "calls of f per image) / reparam.", "08", "{:.1f}"),
    ("grad_price_ratio_sf_baseline",
     "variance x calls of f, score function with a per-image baseline / "
     "reparam.", "08", "{:,.0f}"),
    ("grad_price_ratio_sf_loo",
     "variance x calls of f, score function with a leave-one-out baseline "
     "over K = {calls} samples / reparam.", "08", "{:.1f}"),
    ("train_speedup_vs_dataloader",
     "training speed-up of the series' loop over a DataLoader loop", "bench",
     "{:.2f}x"),
    ("train_hand_gradient_speedup",
     "hand-written gradient, speed-up over autograd", "bench", "{:.2f}x"),
    ("train_time_over_matmul_bound",
     "training time / its matrix products alone", "bench", "{:.2f}x"),
    ("train_adam_floor_over_matmul_bound",
     "matrix products + Adam steps / matrix products alone", "bench",
     "{:.2f}x"),
]


def with_uncertainty(metrics: dict, key: str, fmt: str) -> str:
    """metrics[key] in fmt, with its standard error (KEY_se) or 95%
    interval (KEY_lo, KEY_hi) where the record has one."""
    value = fmt.format(metrics[key])
    if f"{key}_se" in metrics:
        value += " ± " + fmt.format(metrics[f"{key}_se"])
    if f"{key}_lo" in metrics and f"{key}_hi" in metrics:
        value += (f" [{fmt.format(metrics[key + '_lo'])}, "
                  f"{fmt.format(metrics[key + '_hi'])}]")
    return value


# The sample sizes the notebooks record beside their results, which the
# labels above and the headline paragraph quote: 04 records the sets, K
# and the mixture's size, 07 the images of its gap split and of its
# refinement, 08 its baseline's extra samples.
SIZES = ["n_train", "n_test", "n_heldout", "elbo_samples", "n_iwae",
         "n_check", "mixture_components", "n_gap", "n_refine", "n_baseline"]


def sizes(metrics: dict) -> dict:
    """The record's sample sizes as the labels print them ("2,000"), and
    the ones derived from them; "?" for any the record lacks."""
    shown = collections.defaultdict(lambda: "?", {
        key: f"{int(metrics[key]):,}" for key in SIZES if key in metrics})
    if {"n_train", "n_heldout"} <= set(metrics):
        first = int(metrics["n_train"]) + 1
        shown["held_out"] = (f"{first:,} to "
                             f"{first + int(metrics['n_heldout']) - 1:,}")
    if "n_baseline" in metrics:
        shown["calls"] = f"{int(metrics['n_baseline']) + 1:,}"
    return shown


def results_rows(metrics: dict):
    """(label, formatted value) of each headline result in the record,
    with its uncertainty, the label quoting the record's sample sizes."""
    shown = sizes(metrics)
    for key, label, owner, fmt in RESULTS:
        if key in metrics:
            yield (f"{label.format_map(shown)} ({owner})",
                   with_uncertainty(metrics, key, fmt))


def prune_metrics(metrics_path: Path) -> list[str]:
    """Drop from the record the keys that are no headline result (nor a
    result's standard error, KEY_se, or interval, KEY_lo and KEY_hi), left
    by earlier versions; the keys dropped."""
    record = json.loads(metrics_path.read_text())
    keep = {f"{key}{end}" for key, *_ in RESULTS
            for end in ("", "_se", "_lo", "_hi")}
    keep.update(SIZES)
    keep.add("seeds")   # the seed sweep's numbers (run_series.py)
    stale = sorted(set(record) - keep)
    if stale:
        text = json.dumps({k: v for k, v in record.items() if k in keep},
                          indent=2) + "\n"
        hp.atomic_write(metrics_path, lambda tmp: tmp.write_text(text))
    return stale


def seeds_table(seeds: dict) -> list[str]:
    """The seed sweep's numbers as Markdown rows: one per seed, then the
    mean and standard deviation over the seeds."""
    names = list(next(iter(seeds.values())))
    lines = ["| seed | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for seed, row in seeds.items():
        lines.append(f"| {seed} | " + " | ".join(
            f"{row[n]:.2f}" if n in row else "" for n in names) + " |")
    cells = []
    for n in names:
        vals = [row[n] for row in seeds.values() if n in row]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
    lines.append(f"| mean ± sd of {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def headline(m: dict) -> list[str]:
    """The README's headline finding, every number and every comparison in
    it taken from the record (a run of other settings gets other words)."""
    def change(a, b):   # (mean of b - mean of a, its standard error)
        return m[b] - m[a], math.hypot(m[f"{a}_se"], m[f"{b}_se"])

    def interval(key, fmt="{:.2f}"):
        return with_uncertainty(m, key, fmt)

    n = sizes(m)
    held = (f"held-out training images ({n['held_out']}, from the same pool "
            "of writers, never trained on)")
    sets = (f"three sets of {n['n_test']} images: training images, {held} "
            "and test images (other writers)"
            if n["n_train"] == n["n_heldout"] == n["n_test"] else
            f"{n['n_train']} training images, {n['n_heldout']} {held} and "
            f"{n['n_test']} test images (other writers)")
    px, px_se = change("log_px_heldout", "train_log_px_quadrature")
    elbo, elbo_se = change("elbo_heldout", "train_elbo")
    writers, writers_se = change("log_px_heldout", "test_log_px_quadrature")
    first = (
        "With a 2-D latent space, log p(x) can be computed exactly by "
        "quadrature, for every image. Notebook 04 compares it with the ELBO "
        f"on {sets}. From training to held-out images "
        f"the exact log p(x) falls by {px:.1f} ± {px_se:.1f} nats while the "
        f"ELBO falls by {elbo:.1f} ± {elbo_se:.1f}"
        + (f", {elbo / px:.0f} times as much" if elbo > 1.5 * px > 0
           else "")
        + "; from held-out to test images log p(x) changes by "
        f"{writers:+.1f} ± {writers_se:.1f}. "
        + ("So most of the overfitting is the encoder's"
           if elbo - 2 * elbo_se > 2 * (px + 2 * px_se) else
           "The encoder's share of the overfitting is not clearly the larger")
        + (", and any cost of the change of writers is too small for these "
           "sets to show. "
           if writers > -2 * writers_se else
           "; the change of writers costs log p(x) as well. ")
        + f"The importance-weighted bound with K = {n['elbo_samples']} "
        "(Burda, Grosse & Salakhutdinov 2016) still falls "
        f"{m['test_iwae_gap']:.1f} ± {m['test_iwae_gap_se']:.1f} nats short "
        f"of log p(x) on {n['n_iwae']} random test images; the ELBO falls "
        f"{m['test_log_px_quadrature'] - m['test_elbo']:.1f} nats short on "
        f"all {n['n_test']}. All of this is one training run, and its ± "
        "are over images" + ("; the seed table below shows how far another "
                             "training seed moves the test numbers."
                             if m.get("seeds") else
                             "; this record does not say how far another "
                             "training seed would move them."))
    second = (
        "Notebook 07 splits the ELBO's shortfall image by image (Cremer, Li "
        "& Duvenaud 2018), with the best diagonal Gaussian for each image "
        "found by Newton's method on an exact grid ELBO. On "
        f"{n['n_gap']} random test images the approximation gap (the "
        "Gaussian family) is "
        f"{interval('approximation_gap')} nats and the amortisation gap "
        f"(one encoder for all images) {interval('amortization_gap')}, with "
        f"a median of {interval('amortization_gap_median')}: "
        + ("a tail of badly placed Gaussians carries the mean. "
           if m["amortization_gap_median_hi"] < m["amortization_gap_lo"]
           else "mean and median agree within their intervals. ")
        + "On training images the amortisation gap is "
        f"{interval('amortization_gap_train')}, on held-out images "
        f"{interval('amortization_gap_heldout')} (95% bootstrap intervals "
        "over images). A hundred SVI steps from the encoder's guess close "
        f"{interval('refine_share_closed_100', '{:.0%}')} of it on "
        f"{n['n_refine']} test images "
        "(refinement at test time, as in Krishnan, Liang & Hoffman 2018). "
        "Zhang, Hayes & Barber "
        "(2022) find for larger VAEs that overfitting is mostly in "
        "inference, which amortised inference regularisation (Shu et al. "
        "2018) targets.")
    seeds = list((m.get("seeds") or {}).values())
    spread = {name: statistics.stdev(row[name] for row in seeds)
              for name in ("test log p(x)", "amortisation gap")
              if len(seeds) > 1 and all(name in row for row in seeds)}
    if len(spread) == 2:
        second += (f" Over {len(seeds)} training seeds the test log p(x) "
                   "has a standard deviation of "
                   f"{spread['test log p(x)']:.2f} nats and the test "
                   f"amortisation gap {spread['amortisation gap']:.2f} "
                   "(table below).")
    return [first, "", second + " The numbers are those of the committed "
            "run; this paragraph and the table under \"Results\" are "
            "generated from it."]


def update_readme(metrics_path: Path) -> None:
    """Rewrite the generated parts of README.md, between their markers:
    the headline finding, the results and the seed sweep's numbers."""
    readme = hp.ROOT / "README.md"
    text = readme.read_text()
    metrics = json.loads(metrics_path.read_text())
    rows = results_rows(metrics)
    tables = {"results": ["| result | value |", "|---|---|"]
              + [f"| {label} | {value} |" for label, value in rows]}
    if {"log_px_heldout", "amortization_gap_lo"} <= set(metrics):
        tables["headline"] = headline(metrics)
    if metrics.get("seeds"):
        tables["seeds"] = seeds_table(metrics["seeds"])
    for name, lines in tables.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = (f"{head}{start}\n" + "\n".join(lines)
                    + f"\n{end}{rest.split(end, 1)[1]}")
    readme.write_text(text)


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
    table = "".join(f"<tr><td>{html.escape(label)}</td><td>{value}</td></tr>"
                    for label, value in results_rows(metrics))
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
