"""The committed notebooks as a report: clean, run top to bottom, and in
agreement with data/metrics.json."""

import json
import re

import pytest

import helpers as hp

NOTEBOOKS = sorted(hp.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
LOCAL_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|[A-Z]:\\\\Users)")


def outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for key in ("text/plain", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(key, "")))
    return "\n".join(parts)


def test_all_eight_notebooks_are_there():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in
                                               range(1, 9)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        "not one top-to-bottom run from a fresh kernel"
    assert sum("parameters" in c["metadata"].get("tags", [])
               for c in code) == 1
    assert "widgets" not in nb["metadata"]
    assert "papermill" not in nb["metadata"]
    for cell in code:
        for out in cell["outputs"]:
            assert out["output_type"] != "error"
            assert out.get("name") != "stderr", \
                f"stderr output (a warning?): {''.join(out['text'])[:200]}"
    text = outputs_text(nb)
    assert not LOCAL_PATH.search(text), "a local path in the outputs"
    assert "pip install" not in text


def test_metrics_file_agrees_with_the_notebooks():
    """Every headline result a notebook records is in data/metrics.json,
    and printed by that notebook as the README's table shows it."""
    import report

    metrics = json.loads((hp.DATA_DIR / "metrics.json").read_text())
    texts = {p.name[:2]: outputs_text(json.loads(p.read_text()))
             for p in NOTEBOOKS}
    for key, _, owner, fmt in report.RESULTS:
        if owner == "bench":
            continue
        assert key in metrics, f"{key} missing from data/metrics.json"
        shown = fmt.format(metrics[key])
        assert shown in texts[owner], \
            f"{key} = {shown} is not what notebook {owner} printed"


def test_the_readme_table_is_the_metrics_file():
    import report

    metrics = json.loads((hp.DATA_DIR / "metrics.json").read_text())
    readme = (hp.ROOT / "README.md").read_text()
    table = readme.split("<!-- results:start -->")[1].split(
        "<!-- results:end -->")[0]
    for label, value in report.results_rows(metrics):
        assert f"| {label} | {value} |" in table
    finding = readme.split("<!-- headline:start -->")[1].split(
        "<!-- headline:end -->")[0]
    assert finding.strip().splitlines() == report.headline(metrics)
    if "seeds" in metrics:
        seeds = readme.split("<!-- seeds:start -->")[1].split(
            "<!-- seeds:end -->")[0]
        assert seeds.strip().splitlines() == report.seeds_table(
            metrics["seeds"])


def test_the_headline_words_follow_the_numbers():
    """Where the record says the opposite, the README's paragraph does."""
    import report

    record = json.loads((hp.DATA_DIR / "metrics.json").read_text())
    text = " ".join(report.headline(record))
    assert "most of the overfitting is the encoder's" in text
    assert "too small for these sets to show" in text
    assert "the seed table below shows" in text
    assert "a tail of badly placed Gaussians carries the mean" in text
    # held-out images that lose as much ELBO as log p(x), test images that
    # lose log p(x), and a median amortisation gap as large as the mean
    other = dict(record, elbo_heldout=record["train_elbo"] - 4.0,
                 log_px_heldout=record["train_log_px_quadrature"] - 4.0,
                 test_log_px_quadrature=record["train_log_px_quadrature"]
                 - 10.0, amortization_gap_median_hi=record[
                     "amortization_gap_lo"] + 1.0)
    text = " ".join(report.headline(other))
    assert "not clearly the larger" in text
    assert "the change of writers costs log p(x) as well" in text
    assert "mean and median agree within their intervals" in text
    assert "falls by 4.0 ±" in text
    text = " ".join(report.headline({k: v for k, v in record.items()
                                     if k != "seeds"}))
    assert "does not say how far another training seed" in text


def test_labels_quote_the_sample_sizes_of_the_run():
    """A run with other sample sizes is labelled with its own, in the
    table and in the headline paragraph."""
    import report

    record = json.loads((hp.DATA_DIR / "metrics.json").read_text())
    rows = dict(report.results_rows(record))
    assert "test IWAE bound (K = 100), 2,000 random test images (04)" in rows
    other = dict(record, elbo_samples=10, n_iwae=500, n_train=5_000,
                 n_heldout=2_000, n_gap=50, n_refine=20, n_baseline=3,
                 mixture_components=25)
    rows = dict(report.results_rows(other))
    for label in ("test IWAE bound (K = 10), 500 random test images (04)",
                  "held-out ELBO, K = 10 (training images 5,001 to 7,000, "
                  "never trained on) (04)",
                  "approximation gap, 50 random test images, mean (07)",
                  "test log p(x), mixture of 25 Bernoulli products (the size "
                  "chosen on held-out training images) (04)",
                  "variance x calls of f, score function with a leave-one-out "
                  "baseline over K = 4 samples / reparam. (08)"):
        assert label in rows, label
    text = " ".join(report.headline(other))
    assert "on 5,000 training images, 2,000 held-out training images " \
        "(5,001 to 7,000," in text
    assert "K = 10 " in text and "on 500 random test images" in text
    assert "On 50 random test images" in text and "on 20 test images" in text
    # a record without its sizes says so rather than quoting the defaults
    bare = {k: v for k, v in record.items() if k not in report.SIZES}
    assert "(K = ?), ? random test images (04)" in " ".join(
        dict(report.results_rows(bare)))


def test_the_seed_table_has_each_seed_and_their_mean_and_sd():
    import report

    lines = report.seeds_table({"0": {"test ELBO": -150.0, "gap": 1.0},
                                "1": {"test ELBO": -152.0, "gap": 3.0}})
    assert lines[0] == "| seed | test ELBO | gap |"
    assert lines[2] == "| 0 | -150.00 | 1.00 |"
    assert lines[4] == "| mean ± sd of 2 | -151.00 ± 1.41 | 2.00 ± 1.41 |"


def test_html_report_renders_offline(tmp_path):
    import report

    index = report.render(hp.NOTEBOOKS_DIR, tmp_path,
                          hp.DATA_DIR / "metrics.json")
    pages = sorted(p.name for p in tmp_path.glob("0*.html"))
    assert len(pages) == 8
    assert (tmp_path / "mathjax" / "MathJax.js").is_file()
    for page in [index, *(tmp_path / p for p in pages)]:
        text = page.read_text()
        loads = re.findall(r'<script[^>]*src="([^"]*)"', text)
        assert loads and all(not s.startswith(("http", "//"))
                             for s in loads), loads
    assert "Headline results" in index.read_text()
