"""Write the student edition of the series: the eight notebooks with every
marked solution left for the student to write.

    python student.py                    # -> build/student (`make student`)
    python student.py --out DIR

Solutions are marked the way nbgrader marks them: in a code cell, the lines
between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; in a Markdown cell
(a written answer), the lines between ``<!-- BEGIN SOLUTION -->`` and
``<!-- END SOLUTION -->``, comments that Jupyter does not render. The marks
are comments, so the series prints what it printed without them, and
export.py leaves them out of helpers.py. nbgrader's own generator needs a
course directory and its database; these few lines do the one step the
series needs, offline.

In the student edition each code region becomes a stub that raises
NotImplementedError naming the exercise, each written answer becomes
"YOUR ANSWER HERE", outputs are cleared, and everything else (the prose,
the checks) stays as it is. A notebook's second cell lists its exercises.
The notebooks import helpers.py, the series' own shared module, for what
earlier notebooks define, so a student can start at any notebook; their
figures and metrics go to build/student/output, never over the series'.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from export import NOTEBOOKS, ROOT, SOLUTION, notebook_paths

OUT = ROOT / "build" / "student"
TEXT_BEGIN, TEXT_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
TEXT_STUB = "YOUR ANSWER HERE"
OUTPUT_DIR = "build/student/output"   # relative to the repository


@dataclass
class Exercise:
    label: str      # "01.2"
    what: str       # "the body of gaussian_log_pdf", "written answer (b)"
    cell: int       # the index of its cell in the notebook


def _function_of(lines: list[str], at: int, indent: str) -> str | None:
    """The name of the def that encloses line `at` (less indented)."""
    for line in reversed(lines[:at]):
        found = re.match(r"^(\s*)def (\w+)\(", line)
        if found and len(found.group(1)) < len(indent):
            return found.group(2)
    return None


def _clear_code(source: str, label) -> tuple[str, list[str]]:
    """source with each marked region replaced by a stub; what each was."""
    lines, out, names, inside = source.split("\n"), [], [], None
    for i, line in enumerate(lines):
        mark = SOLUTION.match(line)
        kind = mark.group(2) if mark else None
        if kind == "BEGIN" and inside is None:
            inside = mark.group(1)
            name = _function_of(lines, i, inside)
            what = f"the body of {name}" if name else "this cell's code"
            tag = label(what)
            names.append(what)
            out += [f"{inside}# YOUR CODE HERE (exercise {tag})",
                    f"{inside}raise NotImplementedError(",
                    f'{inside}    "exercise {tag}: write {what} here; the '
                    f'cells after this one"',
                    f'{inside}    " check it")']
        elif kind == "END" and inside is not None:
            inside = None
        elif kind:
            raise ValueError(f"unbalanced solution marks near {line!r}")
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise ValueError("a ### BEGIN SOLUTION without its ### END SOLUTION")
    return "\n".join(out), names


def _clear_text(source: str, label, context: dict) -> tuple[str, list[str]]:
    """source with each marked answer replaced by the text stub. context
    carries the section and the last question (a bold "(x)") seen so far
    in the notebook, to name an answer whose cell asks no question."""
    out, names, inside = [], [], False
    for line in source.split("\n"):
        heading = re.match(r"^#+\s+(.*)", line)
        if heading and not inside:
            context.update(section=heading.group(1).strip(), question=None)
        asked = re.findall(r"\*\*\((\w)\)", line)
        if asked and not inside:
            context["question"] = asked[-1]
        if line.strip() == TEXT_BEGIN and not inside:
            inside = True
            question = re.findall(r"\*\*\((\w)\)", "\n".join(out))
            what = (f"written answer ({question[-1]})" if question else
                    f"written answer ({context['question']}), continued"
                    if context.get("question") else
                    f"the written answer in '{context.get('section', '')}'")
            names.append(what)
            out.append(f"{TEXT_STUB} (exercise {label(what)})")
        elif line.strip() == TEXT_END and inside:
            inside = False
        elif inside is False:
            out.append(line)
    if inside:
        raise ValueError(f"a {TEXT_BEGIN} without its {TEXT_END}")
    return "\n".join(out), names


def student_notebook(nb: dict, stem: str) -> tuple[dict, list[Exercise]]:
    """The student edition of one notebook (nbformat JSON) and its
    exercises; nb is left as it is."""
    nb = copy.deepcopy(nb)
    exercises: list[Exercise] = []
    context: dict = {}

    def label(what: str) -> str:
        exercises.append(Exercise(f"{stem[:2]}.{len(exercises) + 1}", what,
                                  index))
        return exercises[-1].label

    for index, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            source, _ = _clear_code(source, label)
            if "parameters" in cell["metadata"].get("tags", []):
                source = re.sub(r'^OUTPUT_DIR = ""', f'OUTPUT_DIR = '
                                f'"{OUTPUT_DIR}"', source, flags=re.M)
        elif cell["cell_type"] == "markdown":
            source, _ = _clear_text(source, label, context)
        mine = [e.label for e in exercises if e.cell == index]
        if mine:
            cell["metadata"]["exercise"] = ", ".join(mine)
        cell["source"] = source.splitlines(keepends=True)
    if exercises:
        listing = "\n".join(f"- **{e.label}**: {e.what}" for e in exercises)
        intro = ("**Student edition.** The parts marked *YOUR CODE HERE* "
                 "and *YOUR ANSWER HERE* are yours to write. Until a piece "
                 "of code is written, the first cell that uses it stops "
                 "with the exercise's name; once it is, the checks after "
                 "it say whether it is right. A written answer has no "
                 "check: the cells after it show the evidence. Exercises "
                 "in this notebook:\n\n" + listing)
    else:
        intro = ("**Student edition.** This notebook has no exercises of "
                 "its own: read it, run it, and try its exercises at the "
                 "end.")
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "student-intro",
                           "metadata": {"student": "intro"},
                           "source": intro.splitlines(keepends=True)})
    for e in exercises:
        e.cell += 1
    return nb, exercises


def write_edition(out: Path = OUT, notebooks: Path = NOTEBOOKS
                  ) -> dict[str, list[Exercise]]:
    """Every notebook's student edition, written into out; the
    exercises of each."""
    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for path in notebook_paths(notebooks):
        nb, exercises = student_notebook(
            json.loads(path.read_text(encoding="utf-8")), path.stem)
        (out / path.name).write_text(
            json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8")
        found[path.stem] = exercises
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT,
                        help="folder for the student notebooks")
    args = parser.parse_args()
    found = write_edition(args.out)
    total = sum(len(e) for e in found.values())
    print(f"Student edition: {len(found)} notebooks, {total} exercises, "
          f"in {args.out}")
    for stem, exercises in found.items():
        print(f"  {stem}: " + ("; ".join(f"{e.label} {e.what}"
                                         for e in exercises) or "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
