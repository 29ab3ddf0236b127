# Two commands do everything on a fresh machine (Python 3.11+, gcc, the package registries):
#   make demo   - venv + install + a fused ResNet next to its eager reference
#   make test   - venv + install + the test suite (CPU: Triton kernels run in the Triton interpreter)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.fastres-installed
# The CUTLASS build takes ~4 GB of memory per job; 2 jobs fit the 24 GB CI machine.
MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu test-sweep bench-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	$(PIP) install -q -c constraints.txt --upgrade pip setuptools wheel ninja packaging
	$(PIP) install -q -c constraints.txt torch torchvision triton nvidia-cutlass
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastres demo

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# On a machine with a GPU and an existing torch (no network): see README "Running on a GPU".
test-gpu:
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

# fastres.optimize over whole timm / torchvision model libraries, each against eager (~15 min on 2 cores).
test-sweep: install
	$(PY) -m pytest tests/test_optimize_sweep.py --sweep $(PYTEST_ARGS)

bench-smoke: install
	$(PY) -m fastres bench layers --smoke --out bench-out

clean:
	rm -rf $(VENV) build *.egg-info fastres/*.so bench-out
