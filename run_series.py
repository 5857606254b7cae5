"""Run the notebook series in order, headless, with papermill.

    python run_series.py                      # all notebooks into build/
    python run_series.py -p EPOCHS=5 -p SEED=1 --out build/quick
    python run_series.py --only 01,03         # a subset, still in order
    python run_series.py --refresh            # rewrite the committed report

Without --refresh, executed notebooks go to OUT/notebooks and figures,
metrics and any newly trained checkpoint to OUT, so the committed files stay
as they are. With --refresh (default parameters only) the notebooks are
rewritten in place and figures/, data/metrics.json and data/ are updated:
that is how the report in the repository is made. `make run` and
`make refresh` call this script.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from pathlib import Path

import helpers as hp


def notebook_paths() -> list[Path]:
    return sorted(hp.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameters_of(path: Path) -> dict:
    """The default values of a notebook's parameters (papermill reads its
    cell tagged 'parameters')."""
    import papermill as pm

    found = pm.inspect_notebook(str(path))
    if not found:
        raise SystemExit(f"error: {path.name} has no cell tagged 'parameters'"
                         "; tag its parameter cell so papermill can override"
                         " it.")
    return {name: ast.literal_eval(p["default"]) for name, p in found.items()}


def parse_value(text: str):
    """A Python literal if it parses as one, else the text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def select(only: str | None) -> list[Path]:
    paths = notebook_paths()
    if not only:
        return paths
    chosen = []
    for key in only.split(","):
        key = key.strip()
        match = [p for p in paths
                 if p.stem == key or p.stem.split("_")[0] == key.zfill(2)]
        if not match:
            names = ", ".join(p.stem for p in paths)
            raise SystemExit(f"error: no notebook called {key!r}; choose "
                             f"from {names}.")
        chosen += match
    return sorted(set(chosen))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build",
                    help="folder for executed notebooks, figures, metrics "
                         "and new checkpoints (default: build)")
    ap.add_argument("--only", help="comma-separated notebook numbers or "
                                   "names, e.g. 01,03")
    ap.add_argument("-p", "--param", action="append", default=[],
                    metavar="NAME=VALUE", help="override a parameter in "
                    "every notebook that has it (repeatable)")
    ap.add_argument("--refresh", action="store_true",
                    help="rewrite the committed notebooks, figures and "
                         "metrics in place, with default parameters")
    return ap.parse_args(argv)


def check_overrides(args, paths: list[Path]) -> dict:
    """Parse and validate every override before any notebook runs."""
    overrides = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"error: parameter {item!r} is not NAME=VALUE;"
                             " write it like EPOCHS=5.")
        overrides[name] = parse_value(value)
    known = {}
    for path in paths:
        known.update(parameters_of(path))
    ruleless = sorted(set(known) - set(hp.PARAMETERS))
    if ruleless:
        raise SystemExit(f"error: the notebook parameter(s) "
                         f"{', '.join(ruleless)} have no rule in "
                         "hp.PARAMETERS; add one in the appendix of "
                         "notebooks/01_distributions.ipynb.")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SystemExit(f"error: no selected notebook has a parameter "
                         f"{', '.join(unknown)}; known parameters are "
                         f"{', '.join(sorted(known))}.")
    if args.refresh and overrides:
        raise SystemExit("error: --refresh rebuilds the committed report "
                         "with the default parameters; drop the overrides, "
                         "or run without --refresh into an --out folder.")
    try:
        hp.check_parameters({**known, **overrides})
    except hp.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return overrides


def strip_run_metadata(path: Path) -> None:
    """Drop papermill's timing metadata so the committed files stay tidy."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def run_one(path: Path, target: Path, parameters: dict) -> None:
    import papermill as pm

    pm.execute_notebook(str(path), str(target), parameters=parameters,
                        cwd=str(path.parent), progress_bar=False,
                        log_output=False, kernel_name="python3",
                        # keep the kernel's start-up log notices off stderr
                        extra_arguments=["--IPKernelApp.log_level=ERROR"])


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = select(args.only)
    overrides = check_overrides(args, paths)
    if args.refresh:
        os.environ.pop("VAE_OUTPUT_DIR", None)
        where = "in place (committed report)"
    else:
        out = Path(args.out).resolve()
        (out / "notebooks").mkdir(parents=True, exist_ok=True)
        overrides["OUTPUT_DIR"] = str(out)
        where = f"into {out}"
    print(f"Running {len(paths)} notebook(s) {where}"
          + (f" with {overrides}" if not args.refresh else ""), flush=True)
    total = time.perf_counter()
    import papermill as pm

    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.stem} ...", end=" ", flush=True)
        start = time.perf_counter()
        if args.refresh:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb")
            os.close(fd)
            target = Path(tmp)
        else:
            target = out / "notebooks" / path.name
        params = {k: v for k, v in overrides.items()
                  if k in parameters_of(path)}
        try:
            run_one(path, target, params)
            if args.refresh:
                strip_run_metadata(target)
                os.replace(target, path)
        except pm.PapermillExecutionError as err:
            print("failed", flush=True)
            first = (err.source.strip().splitlines() or [""])[0][:60]
            print(f"error: {path.stem} stopped in cell {err.exec_count} "
                  f"({first}) with {err.ename}: {err.evalue}",
                  file=sys.stderr)
            if not args.refresh:
                print(f"The partly executed notebook is {target}; the "
                      "notebooks before it finished.", file=sys.stderr)
            return 1
        finally:
            if args.refresh and target.exists():
                target.unlink()
        print(f"{time.perf_counter() - start:.1f} s", flush=True)
    print(f"Done in {time.perf_counter() - total:.1f} s.")
    import report

    if args.refresh:
        stale = report.prune_metrics(hp.output_paths("").metrics)
        if stale:
            print(f"dropped from data/metrics.json: {', '.join(stale)}")
        report.update_readme(hp.output_paths("").metrics)
        print("README.md results table updated from data/metrics.json.")
        index = report.render(hp.NOTEBOOKS_DIR, hp.ROOT / "build" / "html",
                              hp.output_paths("").metrics)
    else:
        index = report.render(out / "notebooks", out / "html",
                              out / "metrics.json")
    print(f"HTML report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
