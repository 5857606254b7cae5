"""The batch runner: bad input stops it at once with one sentence, a
failing notebook is named with its cell, and a smoke run of all eight
notebooks in a small, non-default configuration works end to end through
papermill into a scratch folder."""

import json

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
])
def test_bad_input_stops_before_any_notebook_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        run_series.main(argv)
    text = str(stop.value)
    assert text.startswith("error: ") and message in text
    assert "\n" not in text
    assert "Running" not in capsys.readouterr().out


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, monkeypatch,
                                                   capsys):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("OUTPUT_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print('fine')"),
                nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "99_broken.ipynb")
    monkeypatch.setattr(hp, "NOTEBOOKS_DIR", tmp_path / "nbs")
    assert run_series.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert ("99_broken stopped in cell 4 (raise ValueError('boom')) with "
            "ValueError: boom") in err  # papermill's injected cell is 2
    assert (tmp_path / "out" / "notebooks" / "99_broken.ipynb").exists()


# A configuration other than the committed one, small enough for a minute
# or two: a fresh model trained for a few epochs on a subset, and every
# analysis notebook with small sample sizes.
SMOKE = ["-p", "EPOCHS=3", "-p", "SEED=1", "-p", "N_TRAIN=1000",
         "-p", "N_TEST=500", "-p", "N_SAMPLES=20000", "-p", "N_REPEATS=50",
         "-p", "PRIOR_SAMPLES=16384", "-p", "N_CHECK=200", "-p", "N_CURVE=5",
         "-p", "N_IWAE=200",
         "-p", "MIXTURE_SIZES=[5,20]", "-p", "N_FRANKEN=100",
         "-p", "SVI_STEPS=50", "-p", "N_GAP=20", "-p", "GAP_STEPS=30",
         "-p", "N_REPS=100", "-p", "N_REPS_K=50"]


@pytest.mark.slow
def test_smoke_run_of_the_whole_series_in_another_configuration(tmp_path):
    out = tmp_path / "run"
    committed = {p: p.stat().st_mtime_ns for p in hp.DATA_DIR.glob("*.*")}
    code = run_series.main(["--out", str(out), *SMOKE])
    assert code == 0
    config = hp.VAEConfig(epochs=3, n_train=1000, seed=1)
    assert (out / "checkpoints" / config.checkpoint_name()).is_file()
    assert not (hp.DATA_DIR / config.checkpoint_name()).exists()
    assert committed == {p: p.stat().st_mtime_ns
                         for p in hp.DATA_DIR.glob("*.*")}
    metrics = json.loads((out / "metrics.json").read_text())
    assert -543.5 < metrics["test_elbo"] < 0
    assert metrics["test_elbo"] < metrics["test_log_px_quadrature"]
    for path in run_series.notebook_paths():
        assert (out / "notebooks" / path.name).is_file(), path.name
    assert (out / "figures" / "03_learning_curves.png").is_file()
    assert (out / "figures" / "08_variance_vs_k.png").is_file()
    executed = nbformat.read(out / "notebooks" / "03_training.ipynb", 4)
    injected = [c for c in executed.cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert "EPOCHS = 3" in injected[0].source
