"""save_figure refuses a figure that cannot be read alone: a panel that
plots data without naming its axes, or several series without a key."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import helpers as hp  # noqa: E402


def panel(fig, x="x", y="y"):
    ax = fig.subplots()
    ax.set(xlabel=x, ylabel=y)
    return ax


CASES = {
    "a labelled line": (lambda f: panel(f).plot([1, 2]), []),
    "an image panel": (lambda f: f.subplots().imshow(np.zeros((3, 3))), []),
    "error bars, one series": (
        lambda f: panel(f).errorbar([1, 2], [1, 2], yerr=0.1), []),
    "a histogram": (lambda f: panel(f).hist(np.arange(9.0)), []),
    "a legend proxy": (lambda f: (ax := panel(f)).plot([1, 2])
                       and ax.plot([], [], label="key"), []),
    "no y label": (lambda f: panel(f, y="").plot([1, 2]),
                   ["panel 1 (untitled) has no y label"]),
    "two lines, no legend": (
        lambda f: (ax := panel(f)).plot([1, 2]) and ax.plot([2, 1]),
        ["panel 1 (untitled) draws 2 series without a legend"]),
    "a histogram and a line, no legend": (
        lambda f: (ax := panel(f)).hist(np.arange(9.0)) and ax.axvline(4),
        ["panel 1 (untitled) draws 2 series without a legend"]),
    "two lines with a legend": (
        lambda f: (ax := panel(f)).plot([1, 2], label="a")
        and ax.plot([2, 1], label="b") and ax.legend(), []),
}


@pytest.mark.parametrize("case", CASES)
def test_what_figure_problems_finds(case):
    draw, problems = CASES[case]
    fig = plt.figure()
    draw(fig)
    assert hp.figure_problems(fig) == problems
    plt.close(fig)


def test_a_panel_may_share_its_label_with_its_row():
    fig, (a, b) = plt.subplots(1, 2, sharey=True)
    for ax in (a, b):
        ax.plot([1, 2])
        ax.set_xlabel("x")
    a.set_ylabel("y")
    assert hp.figure_problems(fig) == []
    plt.close(fig)


def test_save_figure_refuses_before_writing(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    ax.set_title("unlabelled")
    outputs = hp.output_paths(tmp_path)
    with pytest.raises(hp.ConfigError, match=r"figure 99_test cannot be read "
                       r"alone: panel 1 \(unlabelled\) has no x label"):
        hp.save_figure(fig, "99_test", outputs, show=False)
    assert not (outputs.figures / "99_test.png").exists()


def test_every_committed_figure_is_one_a_notebook_draws():
    """figures/ holds what the notebooks save (and the latent-size sweep's
    figure, which `make sweep` draws): a figure a notebook stopped drawing
    is deleted, not left behind."""
    import json
    import re

    import export

    saved = {"sweep_latent_dim"}
    for path in export.notebook_paths():
        for cell in json.loads(path.read_text())["cells"]:
            saved |= set(re.findall(r'save_figure\(\s*fig,\s*"(\w+)"',
                                    "".join(cell["source"])))
    committed = {p.stem for p in (hp.ROOT / "figures").glob("*.png")}
    assert committed - saved == set()


def test_a_label_for_the_whole_figure_counts():
    fig, (a, b) = plt.subplots(1, 2)
    for ax in (a, b):
        ax.plot([1, 2])
        ax.set_ylabel("y")
    assert [p.split(" has")[1] for p in hp.figure_problems(fig)] == \
        [" no x label"] * 2
    fig.supxlabel("x for both")
    assert hp.figure_problems(fig) == []
    plt.close(fig)
