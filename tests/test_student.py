"""The student edition (student.py): generated from the series with every
marked solution removed; each notebook, run as generated, stops at its
first exercise with that exercise's name; and the checks after each group
of exercise cells fail on the stubs and pass once the series' solutions
are put back."""

import json
import re

import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import helpers as hp
import student

SERIES = sorted(hp.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
# smaller runs where a notebook's checks repeat an expensive estimate
SMALL = {"08_gradient_variance": {"N_REPS": 100}}


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    return out, student.write_edition(out)


def sources(nb):
    return ["".join(c["source"]) for c in nb["cells"]]


def solution_lines(text: str) -> tuple[set, set]:
    """The lines inside a notebook's solution marks, and those outside."""
    inside, outside, marked = set(), set(), False
    for line in text.splitlines():
        if "BEGIN SOLUTION" in line:
            marked = True
        elif "END SOLUTION" in line:
            marked = False
        else:
            (inside if marked else outside).add(line.strip())
    return inside, outside


def test_the_exercises_the_course_needs_are_marked(edition):
    _, found = edition
    labels = {stem[:2]: [e.what for e in ex] for stem, ex in found.items()}
    assert {"the body of gaussian_sample", "the body of gaussian_log_pdf",
            "the body of bernoulli_log_pdf"} <= set(labels["01"])
    assert {"the body of decode", "the body of log_weights"} \
        <= set(labels["02"])
    assert {"the body of logsumexp", "the body of log_integrate_grid"} \
        <= set(labels["04"])
    assert "the body of svi" in labels["07"]
    assert {f"written answer ({q})" for q in "abcd"} <= set(labels["07"])
    assert {"the body of reparam_gradient",
            "the body of score_function_gradient"} <= set(labels["08"])


@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_no_solution_is_left_and_the_rest_is_kept(edition, path):
    out, found = edition
    series = json.loads(path.read_text())
    mine = json.loads((out / path.name).read_text())
    text = "\n".join(sources(mine))
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    inside, outside = solution_lines("\n".join(sources(series)))
    kept = {line.strip() for line in text.splitlines()}
    leaked = {line for line in inside - outside if len(line) > 8} & kept
    assert not leaked, f"solution lines left in the student edition: {leaked}"
    changed = {e.cell for e in found[path.stem]}
    for i, (theirs, ours) in enumerate(zip(series["cells"],
                                           mine["cells"][:1] + mine[
                                               "cells"][2:])):
        if ours["cell_type"] == "code":
            assert ours["outputs"] == [] and ours["execution_count"] is None
        if i + (i > 0) not in changed and "parameters" not in ours[
                "metadata"].get("tags", []):
            assert ours["source"] == theirs["source"], f"cell {i} changed"


def student_client(out, stem, tmp_path):
    """A client for the student notebook, its figures going to tmp_path and
    its expensive estimates made small."""
    import nbformat

    nb = nbformat.read(out / f"{stem}.ipynb", as_version=4)
    params = next(c for c in nb.cells
                  if "parameters" in c.metadata.get("tags", []))
    params.source = re.sub(r'^OUTPUT_DIR = .*$', f'OUTPUT_DIR = '
                           f'"{tmp_path}"', params.source, flags=re.M)
    for name, value in SMALL.get(stem, {}).items():
        params.source = re.sub(rf"^{name} = .*$", f"{name} = {value!r}",
                               params.source, flags=re.M)
    return nb, NotebookClient(nb, timeout=600, kernel_name="python3",
                              resources={"metadata": {"path": str(out)}})


WITH_EXERCISES = [p for p in SERIES
                  if "BEGIN SOLUTION" in p.read_text()]


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=lambda p: p.stem)
def test_as_generated_it_stops_at_its_first_exercise(edition, path,
                                                     tmp_path):
    out, found = edition
    nb, client = student_client(out, path.stem, tmp_path)
    first = found[path.stem][0].cell
    names = [e.label for e in found[path.stem] if e.cell == first]
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert "NotImplementedError" in str(err.value)
    assert any(f"exercise {name}:" in str(err.value) for name in names), \
        f"stopped with something else: {str(err.value)[-300:]}"


def exercise_groups(nb, exercises):
    """The code cells holding exercises, grouped where no other code cell
    lies between two of them (their checks come after the last)."""
    cells = sorted({e.cell for e in exercises
                    if nb.cells[e.cell].cell_type == "code"})
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    groups = []
    for cell in cells:
        if groups and code.index(cell) == code.index(groups[-1][-1]) + 1:
            groups[-1].append(cell)
        else:
            groups.append([cell])
    return groups


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=lambda p: p.stem)
def test_each_check_fails_on_the_stub_and_passes_on_the_solution(
        edition, path, tmp_path):
    """Run the student notebook cell by cell. After each group of exercise
    cells, the stubs must make a later cell fail, naming one of the
    group's exercises, before the next exercise; with the series'
    solutions in their place, the cells from the exercise to that one
    pass. Stop after the last exercise's check."""
    out, found = edition
    series = json.loads(path.read_text())
    nb, client = student_client(out, path.stem, tmp_path)
    groups = exercise_groups(nb, found[path.stem])

    def run(i):
        if nb.cells[i].cell_type == "code":
            client.execute_cell(nb.cells[i], i)

    with client.setup_kernel():
        position = 0
        for k, group in enumerate(groups):
            for index in range(position, group[-1] + 1):
                run(index)
            stop = groups[k + 1][0] if k + 1 < len(groups) else len(nb.cells)
            names = [e.label for e in found[path.stem] if e.cell in group]
            failed = None
            for index in range(group[-1] + 1, stop):
                try:
                    run(index)
                except CellExecutionError as err:
                    assert any(f"exercise {n}:" in str(err) for n in names), \
                        f"cell {index} failed otherwise: {str(err)[-300:]}"
                    failed = index
                    break
            assert failed is not None, \
                f"no cell after exercises {names} fails on their stubs"
            for cell in group:                  # the solutions, put back
                nb.cells[cell].source = "".join(
                    series["cells"][cell - 1]["source"])
            for index in range(group[0], failed + 1):
                run(index)
            position = failed + 1


def test_marks_become_stubs_and_unbalanced_marks_are_refused():
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# 09 — Toy"},
        {"cell_type": "code", "metadata": {}, "outputs": [],
         "execution_count": 3, "source":
         "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
         "    ### END SOLUTION"},
        {"cell_type": "markdown", "metadata": {}, "source":
         "**(a) Is 2 even?**\n<!-- BEGIN SOLUTION -->\nYes.\n"
         "<!-- END SOLUTION -->"}]}
    mine, exercises = student.student_notebook(nb, "09_toy")
    code = "".join(mine["cells"][2]["source"])
    assert "return 2 * x" not in code and "exercise 09.1: write the body " \
        "of double here" in code
    assert mine["cells"][2]["execution_count"] is None
    assert "".join(mine["cells"][3]["source"]) == \
        "**(a) Is 2 even?**\nYOUR ANSWER HERE (exercise 09.2)"
    assert [(e.label, e.what, e.cell) for e in exercises] == [
        ("09.1", "the body of double", 2),
        ("09.2", "written answer (a)", 3)]
    assert "09.1" in "".join(mine["cells"][1]["source"])  # the listing
    namespace = {}
    exec(code, namespace)
    with pytest.raises(NotImplementedError, match="exercise 09.1"):
        namespace["double"](1)
    nb["cells"][1]["source"] = "def f():\n    ### BEGIN SOLUTION\n    pass"
    with pytest.raises(ValueError, match="without its ### END SOLUTION"):
        student.student_notebook(nb, "09_toy")
