# The VAE notebook series. Two commands matter:
#   make run    run all notebooks in order, headless, into build/
#   make test   unit tests and nbval regression of the committed notebooks
# Each sets up what is missing first (.venv, MNIST) and is quick after that.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.ready
MNIST  := data/MNIST/raw/t10k-labels-idx1-ubyte

# Batch-run settings: `make run EPOCHS=5 SEED=1 OUT=build/quick`. Every
# NAME=VALUE on make's command line other than make's own settings below is
# a notebook parameter, and so is each NAME=VALUE in P="NAME=VALUE ...":
# the runner checks every name and value before the first notebook starts,
# so a misspelt name (EPOCH=5) stops the run instead of being ignored.
OUT       ?= build
NOTEBOOKS ?=
MAKE_OWN  := PYTHON OUT NOTEBOOKS P SWEEP JOBS
CMDLINE   := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
PARAMS := $(foreach p,$(filter-out $(MAKE_OWN),$(CMDLINE)),-p '$(p)=$($(p))') \
          $(foreach p,$(P),-p $(p))

.PHONY: run sweep seeds test test-perturbed refresh report bench export student venv data clean

run: $(READY) $(MNIST)
	$(PY) run_series.py --out $(OUT) $(if $(NOTEBOOKS),--only $(NOTEBOOKS)) $(PARAMS)

# The series (or NOTEBOOKS) once for every combination of the values in
# SWEEP, e.g. `make sweep SWEEP="LATENT_DIM=2,3,5" NOTEBOOKS=03,04`, each
# run in its own folder under OUT, with a table and a figure across them;
# JOBS configurations at a time (default 2, the cores shared between them).
JOBS ?= 2
sweep: $(READY) $(MNIST)
	$(PY) run_series.py --out $(OUT) --jobs $(JOBS) $(if $(NOTEBOOKS),--only $(NOTEBOOKS)) $(PARAMS) $(foreach s,$(SWEEP),--sweep $(s))

# The default configuration trained with three seeds (0 is the committed
# weights), the whole series for each, into build/seeds; each seed's
# headline numbers are recorded in data/metrics.json and the README.
seeds: $(READY) $(MNIST)
	$(PY) run_series.py --out build/seeds --jobs $(JOBS) --sweep SEED=0,1,2 --record-seeds

# Unit tests (with a grid of small runs over latent sizes 1, 2 and 3, not the
# committed configuration) and nbval on the committed notebooks; then nbval again with
# every model weight jittered by one part in a million (VAE_PERTURB=1, with
# tests/perturb/sitecustomize.py run as each kernel starts): the
# jitter is the same on every machine and larger than any difference in
# rounding between CPUs, so a printed digit that depends on rounding fails
# here, not on a user's machine.
test: $(READY) $(MNIST)
	$(PY) -m pytest
	VAE_PERTURB=1 PYTHONPATH=$(CURDIR)/tests/perturb $(PY) -m pytest notebooks

# The perturbed nbval pass alone.
test-perturbed: $(READY) $(MNIST)
	VAE_PERTURB=1 PYTHONPATH=$(CURDIR)/tests/perturb $(PY) -m pytest notebooks

# Rewrite the committed notebooks, figures/ and data/metrics.json in place
# from a run with the default parameters.
refresh: $(READY) $(MNIST)
	$(PY) run_series.py --refresh $(if $(NOTEBOOKS),--only $(NOTEBOOKS))

# The committed notebooks as a static HTML site in build/html (offline).
report: $(READY)
	$(PY) report.py

bench: $(READY) $(MNIST)
	$(PY) benchmarks/train_speed.py --record

# Rewrite helpers.py from the notebooks' cells marked `#| export`.
export: $(READY)
	$(PY) export.py

# The student edition in build/student: the eight notebooks with every
# marked solution left for the student ("For lecturers" in the README).
student: $(READY)
	$(PY) student.py

venv: $(READY)
data: $(MNIST)

$(READY): requirements.txt pyproject.toml
	@echo ">> creating the virtual environment in $(VENV) (first time: a few minutes, torch is large)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@
	@echo ">> environment ready"

$(MNIST): | $(READY)
	@$(PY) -c "import helpers; helpers.ensure_mnist()"

clean:
	rm -rf build .pytest_cache
