"""Run the notebook series in order, headless, with papermill.

    python run_series.py                      # all notebooks into build/
    python run_series.py -p EPOCHS=5 -p SEED=1 --out build/quick
    python run_series.py --only 01,03         # a subset, still in order
    python run_series.py --refresh            # rewrite the committed report
    python run_series.py --sweep SEED=0,1,2 --out build/seeds
    python run_series.py --sweep LATENT_DIM=2,3,5 --only 03,04 --jobs 2

Without --refresh, executed notebooks go to OUT/notebooks and figures,
metrics and any newly trained checkpoint to OUT, so the committed files stay
as they are. With --refresh (default parameters only) the notebooks are
rewritten in place and figures/, data/metrics.json and data/ are updated:
that is how the report in the repository is made. A sweep runs the series
once for every combination of the values given, each into its own folder
OUT/NAME=VALUE,..., and writes a table and a figure of the headline numbers
across them (OUT/sweep.md, OUT/sweep.csv, OUT/sweep.png); with --jobs N
it runs N configurations at a time, sharing the CPU cores between them.
`make run`,
`make sweep` and `make refresh` call this script.
"""

from __future__ import annotations

import argparse
import ast
import csv
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpers as hp

# Notebooks that exist only for a two-dimensional latent space, and why:
# with another LATENT_DIM the runner leaves them out, saying so.
NEEDS_PLANE = {
    "07_posterior_inference": "it compares q with the true posterior "
                              "integrated over the latent plane",
}
# The headline numbers a sweep collects from each run's metrics. log p(x)
# is the quadrature where 04 could integrate (1 or 2 latent dimensions)
# and the IWAE bound with K_ESTIMATE samples otherwise.
HEADLINES = ["train ELBO", "test ELBO", "test IWAE", "test log p(x)"]
# and, in the table only, 07's split of the gap where 07 ran
GAPS = ["approximation gap", "amortisation gap"]


def notebook_paths() -> list[Path]:
    return sorted(hp.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


@functools.lru_cache
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
    ap.add_argument("--sweep", action="append", default=[],
                    metavar="NAME=V1,V2,...", help="run once for every value "
                    "(repeatable: every combination)")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="run N configurations of a sweep at a time, each "
                         "with an equal share of the CPU cores (default: 1)")
    ap.add_argument("--no-html", action="store_true",
                    help="skip the HTML index of the executed notebooks")
    ap.add_argument("--record-seeds", action="store_true",
                    help="after a sweep over SEED alone (default parameters "
                         "otherwise), record each seed's headline numbers "
                         "in data/metrics.json and the README")
    ap.add_argument("--refresh", action="store_true",
                    help="rewrite the committed notebooks, figures and "
                         "metrics in place, with default parameters")
    return ap.parse_args(argv)


def name_value(item: str, what: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.isidentifier() or not value:
        raise SystemExit(f"error: {what} {item!r} is not NAME=VALUE; write "
                         "it like EPOCHS=5.")
    return name, value


def check_overrides(args, paths: list[Path]
                    ) -> tuple[list[dict], dict, list[str]]:
    """Parse and validate every override, for every configuration of a
    sweep, before any notebook runs; the configurations' overrides, the
    notebooks' defaults and the swept names."""
    base = {}
    for item in args.param:
        name, value = name_value(item, "parameter")
        base[name] = parse_value(value)
    axes = {}
    for item in args.sweep:
        name, values = name_value(item, "sweep")
        axes[name] = [parse_value(v) for v in values.split(",")]
        if len(set(map(repr, axes[name]))) != len(axes[name]):
            raise SystemExit(f"error: --sweep {item} repeats a value; give "
                             "each value once.")
        if name in base:
            raise SystemExit(f"error: {name} is both swept and set with -p; "
                             "give it in one place.")
    known = {}
    for path in paths:
        known.update(parameters_of(path))
    ruleless = sorted(set(known) - set(hp.PARAMETERS))
    if ruleless:
        raise SystemExit(f"error: the notebook parameter(s) "
                         f"{', '.join(ruleless)} have no rule in "
                         "hp.PARAMETERS; add one in the appendix of "
                         "notebooks/01_distributions.ipynb.")
    unknown = sorted((set(base) | set(axes)) - set(known))
    if unknown:
        raise SystemExit(f"error: no selected notebook has a parameter "
                         f"{', '.join(unknown)}; known parameters are "
                         f"{', '.join(sorted(known))}.")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs} must be at least 1; "
                         "give the number of configurations to run at once.")
    if args.record_seeds and (list(axes) != ["SEED"] or base or
                              not {"03", "04"} <= {p.stem[:2] for p in paths}):
        raise SystemExit("error: --record-seeds records a sweep over SEED "
                         "alone, with the default parameters and notebooks "
                         "03 and 04 among those run; drop the other "
                         "overrides, or run without --record-seeds.")
    if args.refresh and (base or axes):
        raise SystemExit("error: --refresh rebuilds the committed report "
                         "with the default parameters; drop the overrides, "
                         "or run without --refresh into an --out folder.")
    configs = [{**base, **dict(zip(axes, values))}
               for values in itertools.product(*axes.values())]
    for overrides in configs:
        try:
            hp.check_parameters({**known, **overrides})
        except hp.ConfigError as err:
            where = "" if not axes else \
                f" (in the sweep's run {label(overrides, axes)})"
            raise SystemExit(f"error: {err}{where}") from None
    return configs, known, list(axes)


def check_folder(out: Path, overrides: dict) -> None:
    """Refuse to mix two configurations' results in one folder: OUT keeps
    the parameters of the run that made it in parameters.json."""
    record = out / "parameters.json"
    if record.exists():
        before = json.loads(record.read_text())
        if before != json.loads(json.dumps(overrides)):
            raise SystemExit(f"error: {out} holds the results of a run with "
                             f"other parameters ({before or 'the defaults'})"
                             "; give another --out folder, or delete that "
                             "one to replace it.")


def label(overrides: dict, axes) -> str:
    """The folder name of one configuration of a sweep."""
    return ",".join(f"{name}={overrides[name]}" for name in axes)


def runnable(paths: list[Path], overrides: dict, where: str = ""
             ) -> list[Path]:
    """The notebooks this configuration can run, saying why any is left
    out."""
    latent = overrides.get("LATENT_DIM", 2)
    keep = []
    for path in paths:
        if path.stem in NEEDS_PLANE and latent != 2:
            print(f"skipping {path.stem}{where}: {NEEDS_PLANE[path.stem]}, "
                  f"and LATENT_DIM = {latent}.", flush=True)
        else:
            keep.append(path)
    return keep


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


def run_notebooks(paths: list[Path], overrides: dict, out: Path | None
                  ) -> bool:
    """Run the notebooks in order, into out (or in place when out is
    None); False, having said where, when one fails."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.stem} ...", end=" ", flush=True)
        start = time.perf_counter()
        if out is None:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb")
            os.close(fd)
            target = Path(tmp)
        else:
            target = out / "notebooks" / path.name
        params = {k: v for k, v in overrides.items()
                  if k in parameters_of(path)}
        try:
            run_one(path, target, params)
            if out is None:
                strip_run_metadata(target)
                os.replace(target, path)
        except DeadKernelError:
            print("failed", flush=True)
            print(f"error: the kernel running {path.stem} died, most often "
                  "because it ran out of memory; close other programs, or "
                  "run fewer sweep configurations at once (--jobs 1).",
                  file=sys.stderr)
            return False
        except pm.PapermillExecutionError as err:
            print("failed", flush=True)
            first = (err.source.strip().splitlines() or [""])[0][:60]
            print(f"error: {path.stem} stopped in cell {err.exec_count} "
                  f"({first}) with {err.ename}: {err.evalue}",
                  file=sys.stderr)
            if out is not None:
                print(f"The partly executed notebook is {target}; the "
                      "notebooks before it finished.", file=sys.stderr)
            return False
        finally:
            if out is None and target.exists():
                target.unlink()
        print(f"{time.perf_counter() - start:.1f} s", flush=True)
    return True


def read_metrics(out: Path) -> dict:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_configuration(out: Path, overrides: dict, chosen: list[Path],
                      html: bool) -> bool:
    """Run one configuration's notebooks into out, recording its
    parameters there; False when a notebook failed."""
    import report

    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    text = json.dumps(overrides, indent=2, sort_keys=True) + "\n"
    hp.atomic_write(out / "parameters.json",
                    lambda tmp: tmp.write_text(text))
    overrides = {**overrides, "OUTPUT_DIR": str(out)}
    print(f"Running {len(chosen)} notebook(s) into {out} with {overrides}",
          flush=True)
    if not run_notebooks(chosen, overrides, out):
        return False
    if html:
        index = report.render(out / "notebooks", out / "html",
                              out / "metrics.json")
        print(f"HTML report: {index}")
    return True


def run_in_parallel(jobs: list[tuple[str, Path, dict, list[Path]]],
                    n_jobs: int) -> bool:
    """Run each configuration (label, folder, overrides, notebooks) as a
    runner of its own, n_jobs at a time, each kernel with an equal share of
    the cores; print each one's lines, prefixed with its label, as they
    come. False when any failed."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def run(job):
        name, out, overrides, chosen = job
        argv = [sys.executable, str(Path(__file__).resolve()), "--out",
                str(out), "--no-html", "--only",
                ",".join(p.stem for p in chosen)]
        for key, value in overrides.items():
            argv += ["-p", f"{key}={value!r}"]
        with subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) as child:
            for line in child.stdout:
                # a kernel that is slow to stop (cores shared) is interrupted
                # by jupyter_client after its notebook finished, and says so
                if "KeyboardInterrupt caught in kernel" not in line:
                    print(f"{name} | {line.rstrip()}", flush=True)
        return child.returncode == 0

    print(f"Running {len(jobs)} configurations, {n_jobs} at a time with "
          f"{threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(n_jobs) as pool:
        return all(list(pool.map(run, jobs)))


def headline(metrics: dict, params: dict) -> dict:
    """The numbers of one run that a sweep's table shows (those it has)."""
    row = {"train ELBO": metrics.get("train_elbo"),
           "test ELBO": metrics.get("test_elbo"),
           "test IWAE": metrics.get("test_iwae"),
           "approximation gap": metrics.get("approximation_gap"),
           "amortisation gap": metrics.get("amortization_gap")}
    if "test_log_px_quadrature" in metrics:
        row["test log p(x)"] = metrics["test_log_px_quadrature"]
        row["log p(x) by"] = "quadrature"
    elif "test_log_px_iwae" in metrics:
        row["test log p(x)"] = metrics["test_log_px_iwae"]
        row["log p(x) by"] = f"IWAE, K = {params['K_ESTIMATE']:,}"
    return {k: v for k, v in row.items() if v is not None}


def write_sweep_summary(out: Path, runs: list[tuple[dict, dict]],
                        axes: list[str], defaults: dict) -> Path:
    """The table (Markdown and CSV) and the figure of a sweep's headline
    numbers: one row per run and, when SEED is swept, the mean and standard
    deviation over the seeds of each other configuration."""
    rows = [({a: cfg[a] for a in axes}, headline(m, {**defaults, **cfg}))
            for cfg, m in runs]
    numbers = [h for h in HEADLINES if any(h in r for _, r in rows)]
    gaps = [h for h in GAPS if any(h in r for _, r in rows)]
    others = [a for a in axes if a != "SEED"]
    summary = []
    if "SEED" in axes:
        groups = {}
        for key, row in rows:
            groups.setdefault(tuple(key[a] for a in others), []).append(row)
        for group, members in groups.items():
            if len(members) < 2:
                continue
            cells = {"SEED": f"mean ± sd of {len(members)}",
                     **dict(zip(others, group))}
            for h in numbers + gaps:
                vals = [r[h] for r in members if h in r]
                if len(vals) > 1:
                    cells[h] = (f"{statistics.mean(vals):.2f} ± "
                                f"{statistics.stdev(vals):.2f}")
            ways = {r.get("log p(x) by") for r in members}
            if len(ways) == 1 and None not in ways:
                cells["log p(x) by"] = ways.pop()
            summary.append(cells)
    k_iwae = sorted({{**defaults, **cfg}.get("ELBO_SAMPLES")
                     for cfg, _ in runs} - {None})
    names = {"test IWAE": "test IWAE" + (f" (K = {k_iwae[0]})"
                                         if len(k_iwae) == 1 else "")}
    head = axes + numbers + (["log p(x) by"] if "test log p(x)" in numbers
                             else []) + gaps

    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    table = [[cell({**key, **row}.get(h, "")) for h in head]
             for key, row in rows]
    table += [[str(cells.get(h, "")) for h in head] for cells in summary]
    shown = [names.get(h, h) for h in head]
    with open(out / "sweep.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([shown] + table)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.png").unlink(missing_ok=True)
    if numbers:
        sizes = {tuple({**defaults, **cfg}.get(k) for k in
                       ("N_TRAIN", "N_TEST", "N_IWAE")) for cfg, _ in runs}
        plot_sweep(out / "sweep.png", rows, axes, numbers, names,
                   sizes.pop() if len(sizes) == 1 else None)
    return out / "sweep.md"


def record_seeds(runs: list[tuple[dict, dict]], defaults: dict) -> None:
    """Keep each seed's headline numbers in data/metrics.json ("seeds") and
    show them in the README's seed table."""
    import report

    seeds = {}
    for cfg, metrics in runs:
        row = headline(metrics, {**defaults, **cfg})
        seeds[str(cfg["SEED"])] = {k: round(row[k], 6)
                                   for k in HEADLINES + GAPS if k in row}
    path = hp.DATA_DIR / "metrics.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record["seeds"] = seeds
    text = json.dumps(dict(sorted(record.items())), indent=2) + "\n"
    hp.atomic_write(path, lambda tmp: tmp.write_text(text))
    report.update_readme(path)
    print(f"Recorded {len(seeds)} seeds' headline numbers in {path} and the "
          "README.")


def plot_sweep(path: Path, rows, axes, numbers, names, sizes=None) -> None:
    """Each headline number against the first swept parameter other than
    SEED (mean, and the standard deviation over seeds as bars); a test
    log p(x) that is an IWAE bound rather than a quadrature is drawn with
    open markers and dashed lines, so that an exact value is never joined
    to a bound as if they were one kind of number."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    others = [a for a in axes if a != "SEED"]
    x_axis = others[0] if others else axes[0]
    rest = [a for a in others if a != x_axis]
    hp.plot_defaults()   # the series' look
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ways = sorted({row.get("log p(x) by") for _, row in rows}
                  - {None, "quadrature"})   # how the bounds were found
    for h, colour in zip(numbers, plt.rcParams["axes.prop_cycle"]
                         .by_key()["color"]):
        lines = {}
        for key, row in rows:
            if h in row:
                line = tuple(key[a] for a in rest)
                lines.setdefault(line, {}).setdefault(key[x_axis], []) \
                    .append((row[h], row.get("log p(x) by", "quadrature")))
        for line, by_x in lines.items():
            xs = sorted(by_x)
            mid = [statistics.mean(v for v, _ in by_x[x]) for x in xs]
            sd = [statistics.stdev(v for v, _ in by_x[x])
                  if len(by_x[x]) > 1 else 0.0 for x in xs]
            extra = ", ".join(f"{a} = {v}" for a, v in zip(rest, line))
            key = names.get(h, h) + (f" ({extra})" if extra else "")
            bound = [h == "test log p(x)" and by_x[x][0][1] != "quadrature"
                     for x in xs]
            if any(sd):
                ax.errorbar(xs, mid, yerr=sd, color=colour, capsize=3,
                            fmt="none")
            for i in range(len(xs) - 1):   # dashed where a bound is joined
                ax.plot(xs[i:i + 2], mid[i:i + 2], color=colour,
                        ls="--" if bound[i] or bound[i + 1] else "-")
            for x, m, open_ in zip(xs, mid, bound):
                ax.plot(x, m, "o", color=colour,
                        markerfacecolor="white" if open_ else colour)
            if not all(bound):   # a key entry for each kind drawn
                ax.plot([], [], "o-", color=colour, label=key
                        + (" by quadrature" if any(bound) else ""))
            if any(bound):
                ax.plot([], [], "o--", color=colour, markerfacecolor="white",
                        label=key + " by " + (" or ".join(ways) or "IWAE")
                        + ", a lower bound")
    seeds = {key.get("SEED") for key, _ in rows}
    bars = "; bars: sd over seeds" if "SEED" in axes and others else ""
    title = (f"Headline numbers across the sweep: {len(rows)} runs"
             + (f", {len(seeds)} seeds" if "SEED" in axes
                else ", each with the default seed")
             + bars)
    if sizes and None not in sizes:
        title += (f"\n{sizes[0]:,} training and {sizes[1]:,} test images; "
                  f"test IWAE on {sizes[2]:,} random test images")
    called = {"LATENT_DIM": "latent dimensions", "HIDDEN_DIM": "hidden units",
              "N_TRAIN": "training images", "EPOCHS": "epochs",
              "LR": "learning rate", "BATCH_SIZE": "minibatch size"}
    log_x = x_axis == "LATENT_DIM"
    ax.set(xlabel=f"{called.get(x_axis, x_axis)} ({x_axis})"
           + (", log scale" if log_x else ""),
           ylabel="nats per image (higher is better)", title=title)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(sorted({key[x_axis] for key, _ in rows}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.minorticks_off()
    ax.legend(fontsize=8)
    problems = hp.figure_problems(fig)
    assert not problems, f"the sweep's figure: {'; '.join(problems)}"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = select(args.only)
    configs, defaults, axes = check_overrides(args, paths)
    base = Path(args.out).resolve()
    folders = [base / label(c, axes) if axes else base for c in configs]
    total = time.perf_counter()
    import report

    if args.refresh:
        os.environ.pop("VAE_OUTPUT_DIR", None)
        print(f"Running {len(paths)} notebook(s) in place (committed "
              "report)", flush=True)
        if not run_notebooks(paths, {}, None):
            return 1
        print(f"Done in {time.perf_counter() - total:.1f} s.")
        metrics = hp.output_paths("").metrics
        stale = report.prune_metrics(metrics)
        if stale:
            print(f"dropped from data/metrics.json: {', '.join(stale)}")
        report.update_readme(metrics)
        print("README.md results table updated from data/metrics.json.")
        index = report.render(hp.NOTEBOOKS_DIR, hp.ROOT / "build" / "html",
                              metrics)
        print(f"HTML report: {index}")
        return 0
    plans = [runnable(paths, c, f" in {label(c, axes)}" if axes else "")
             for c in configs]
    if not all(plans):
        raise SystemExit("error: every selected notebook is skipped in this "
                         "configuration; select others with --only, or run "
                         "them with LATENT_DIM=2.")
    # each configuration keeps only the overrides its notebooks take
    given = [{k: v for k, v in c.items()
              if any(k in parameters_of(p) for p in chosen)}
             for c, chosen in zip(configs, plans)]
    for out, overrides in zip(folders, given):
        check_folder(out, overrides)
    if axes and args.jobs > 1:
        names = [label(c, axes) for c in configs]
        if not run_in_parallel(list(zip(names, folders, given, plans)),
                               args.jobs):
            print("error: a configuration of the sweep failed; its lines "
                  "above say where.", file=sys.stderr)
            return 1
    else:
        for out, overrides, chosen in zip(folders, given, plans):
            if not run_configuration(out, overrides, chosen,
                                     html=not (axes or args.no_html)):
                return 1
    print(f"Done in {time.perf_counter() - total:.1f} s.")
    if axes:
        runs = [(c, read_metrics(out)) for c, out in zip(configs, folders)]
        summary = write_sweep_summary(base, runs, axes, defaults)
        if args.record_seeds:
            record_seeds(runs, defaults)
        if (base / "sweep.png").exists():
            print(f"Sweep summary: {summary} (and sweep.csv, sweep.png)")
        else:
            print(f"Sweep table: {summary} (and sweep.csv); no figure, as "
                  "the selected notebooks compute none of the headline "
                  "numbers (03 and 04 do).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
