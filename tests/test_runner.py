"""The batch runner: bad input stops it at once with one sentence, a
failing notebook is named with its cell, a folder keeps the results of one
configuration only, and a sweep over latent sizes 1, 2 and 3 (tiny data,
one epoch) runs every notebook that applies end to end through papermill
into a scratch folder, skipping the others up front with a sentence."""

import json
import os
import subprocess

import nbformat
import pytest

import helpers as hp
import run_series


@pytest.mark.parametrize("argv,message", [
    (["-p", "EPOCHS=-5"], "EPOCHS must be a whole number"),
    (["-p", "LATENT_DIM=0"], "LATENT_DIM must be a whole number"),
    (["--only", "42"], "no notebook called '42'"),
    (["-p", "NO_SUCH=1"], "no selected notebook has a parameter NO_SUCH"),
    (["-p", "EPOCHS"], "is not NAME=VALUE"),
    (["--refresh", "-p", "EPOCHS=5"], "drop the overrides"),
    (["--only", "04", "-p", "GRID_SPACING=-0.1"], "GRID_SPACING must be"),
    (["--only", "04", "-p", "GRID_SPACING=0.03"], "must divide"),
    (["--only", "08", "-p", "M=0"], "M must be"),
    (["--only", "08", "-p", "K_VALUES=[1,0]"], "K_VALUES must be"),
    (["--only", "07", "-p", "SVI_LR=-1"], "SVI_LR must be"),
    (["--only", "04", "-p", "MIXTURE_SIZES=5"], "MIXTURE_SIZES must be"),
    (["--only", "04", "-p", "N_CHECK=20000"], "N_CHECK=20000 cannot exceed"),
    (["--sweep", "SEED=1,2,1"], "repeats a value"),
    (["--sweep", "SEED=1,2", "-p", "SEED=3"], "both swept and set with -p"),
    (["--sweep", "LATENT_DIM=2,0"], "LATENT_DIM must be a whole number"),
    (["--sweep", "NO_SUCH=1,2"], "no selected notebook has a parameter"),
    (["--jobs", "0", "--sweep", "SEED=1,2"], "--jobs 0 must be at least 1"),
    (["--sweep", "SEED=1,2", "-p", "EPOCHS=3", "--record-seeds"],
     "--record-seeds records a sweep over SEED alone"),
    (["--sweep", "SEED=1,2", "--only", "03", "--record-seeds"],
     "notebooks 03 and 04 among those run"),
    (["--only", "07", "-p", "LATENT_DIM=3"], "every selected notebook is "
                                              "skipped"),
])
def test_bad_input_stops_before_any_notebook_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        run_series.main(argv)
    text = str(stop.value)
    assert text.startswith("error: ") and message in text
    assert "\n" not in text
    assert "Running" not in capsys.readouterr().out


def test_a_folder_keeps_the_results_of_one_configuration(tmp_path, capsys):
    (tmp_path / "parameters.json").write_text('{"EPOCHS": 5}')
    with pytest.raises(SystemExit) as stop:
        run_series.main(["--out", str(tmp_path), "-p", "EPOCHS=6"])
    assert "holds the results of a run with other parameters" in \
        str(stop.value)
    assert "Running" not in capsys.readouterr().out


def series_of_one(tmp_path, monkeypatch, name, *cells):
    """A one-notebook series in tmp_path/nbs: a parameter cell, then cells."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("OUTPUT_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *map(nbformat.v4.new_code_cell, cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / f"{name}.ipynb")
    monkeypatch.setattr(hp, "NOTEBOOKS_DIR", tmp_path / "nbs")


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, monkeypatch,
                                                   capsys):
    series_of_one(tmp_path, monkeypatch, "99_broken", "print('fine')",
                  "raise ValueError('boom')")
    assert run_series.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert ("99_broken stopped in cell 4 (raise ValueError('boom')) with "
            "ValueError: boom") in err  # papermill's injected cell is 2
    assert (tmp_path / "out" / "notebooks" / "99_broken.ipynb").exists()


def test_a_dead_kernel_is_named_with_its_likely_cause(tmp_path, monkeypatch,
                                                     capsys):
    series_of_one(tmp_path, monkeypatch, "98_dies", "import os; os._exit(9)")
    assert run_series.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the kernel running 98_dies died, most often because it ran out " \
        "of memory" in err
    assert "Traceback" not in err


# The test grid: latent sizes 1, 2 and 3 on a few hundred images, one
# epoch, every analysis with small sample sizes, two configurations at a
# time. About two and a half minutes on two cores.
TINY = ["-p", "EPOCHS=1", "-p", "SEED=1", "-p", "N_TRAIN=300",
        "-p", "N_TEST=200", "-p", "N_SAMPLES=20000", "-p", "N_REPEATS=50",
        "-p", "PRIOR_SAMPLES=4096", "-p", "N_CHECK=50", "-p", "N_CURVE=5",
        "-p", "N_IWAE=100", "-p", "K_ESTIMATE=200", "-p", "MIXTURE_SIZES=[5,20]",
        "-p", "N_FRANKEN=50", "-p", "SVI_STEPS=50", "-p", "N_GAP=20",
        "-p", "NEWTON_STEPS=30", "-p", "N_REFINE=10", "-p", "N_REPS=100",
        "-p", "N_REPS_K=50", "-p", "M=20"]


@pytest.mark.slow
def test_a_sweep_over_latent_sizes_runs_every_notebook_that_applies(
        tmp_path, capsys):
    out = tmp_path / "grid"
    committed = {p: p.stat().st_mtime_ns for p in hp.DATA_DIR.glob("*.*")}
    code = run_series.main(["--out", str(out), "--jobs", "2",
                            "--sweep", "LATENT_DIM=1,2,3", *TINY])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Traceback" not in printed
    lines = printed.splitlines()
    for dim in (1, 3):
        skip = (f"skipping 07_posterior_inference in LATENT_DIM={dim}: it "
                "compares q with the true posterior")
        assert any(line.startswith(skip) for line in lines), printed
    assert lines.index(next(l for l in lines if l.startswith("skipping"))) \
        < lines.index(next(l for l in lines if "Running" in l))
    for dim in (1, 2, 3):
        run = out / f"LATENT_DIM={dim}"
        config = hp.VAEConfig(latent_dim=dim, epochs=1, n_train=300, seed=1)
        assert (run / "checkpoints" / config.checkpoint_name()).is_file()
        assert not (hp.DATA_DIR / config.checkpoint_name()).exists()
        for path in run_series.notebook_paths():
            ran = (run / "notebooks" / path.name).is_file()
            assert ran == (dim == 2 or not path.stem.startswith("07")), \
                (dim, path.name)
        assert (run / "figures" / "08_variance_vs_k.png").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        exact = metrics.get("test_log_px_quadrature")
        bound = metrics.get("test_log_px_iwae")
        assert (exact is None) == (dim == 3) and (bound is None) == (dim < 3)
        assert -543.5 < metrics["test_elbo"] < (exact or bound) < 0
        executed = nbformat.read(run / "notebooks" / "03_training.ipynb", 4)
        injected = [c for c in executed.cells
                    if "injected-parameters" in c.metadata.get("tags", [])]
        assert f"LATENT_DIM = {dim}" in injected[0].source
        assert json.loads((run / "parameters.json").read_text())[
            "LATENT_DIM"] == dim
    assert committed == {p: p.stat().st_mtime_ns
                         for p in hp.DATA_DIR.glob("*.*")}
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith("| 1 |") and "| quadrature |" in table[2]
    assert table[4].startswith("| 3 |") and "| IWAE, K = 200 |" in table[4]
    assert (out / "sweep.csv").is_file() and (out / "sweep.png").is_file()


def test_make_gives_the_runner_every_name_that_is_not_its_own():
    """`make run NAME=VALUE` passes every name but make's own settings to
    the runner, so that its check sees a misspelt one (EPOCH) too."""
    env = {k: v for k, v in os.environ.items()   # not a parent make's
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    lines = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", "EPOCH=5", "N_IWAE=3",
         "OUT=build/x", "NOTEBOOKS=04", "P=N_REPS=5"], cwd=hp.ROOT, env=env,
        capture_output=True, text=True, check=True).stdout.splitlines()
    command = [line for line in lines if "run_series.py" in line][-1]
    assert command.startswith(".venv/bin/python run_series.py --out build/x "
                              "--only 04")
    for given in ("-p 'EPOCH=5'", "-p 'N_IWAE=3'", "-p N_REPS=5"):
        assert given in command
    assert "OUT=" not in command and "NOTEBOOKS=" not in command
