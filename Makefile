# Two commands do all set-up on a fresh machine:
#   make app    install what is needed and open the app on the built-in demo
#   make test   install what is needed (incl. Chromium for the browser test) and run the tests
# and one more for the slow ground-truth checks (retraining, leave-one-out), which CI also runs:
#   make test-slow
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The peers of bench/peers (TRAK, kronfluence; never used by ecif) and Ray, for the benchmarks and
# the tests of their adapters and of the Ray path.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench,ray]"
	touch $(BENCH_STAMP)

.PHONY: install app test test-slow chromium demo bench
install: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null)

# ARGS: more options for `ecif app` (e.g. ARGS="--port 8600"); bench/first_contact.py uses it.
app: $(STAMP)
	$(BIN)/ecif app $(ARGS)

demo: $(STAMP)
	$(BIN)/ecif demo

test: $(BENCH_STAMP) chromium
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BENCH_STAMP) chromium
	$(BIN)/python -m pytest -q -m slow

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.fidelity
	$(BIN)/python -m bench.fidelity_selected
	$(BIN)/python -m bench.detect --digits
	$(BIN)/python -m bench.detect --pretrained-pool
	$(BIN)/python -m bench.detect_sweep
	$(BIN)/python -m bench.detect_disagreements
	$(BIN)/python -m bench.edit
	$(BIN)/python -m bench.trace
	$(BIN)/python -m bench.trace --pretrained-pool
	$(BIN)/python -m bench.trace --corruption systematic-class
	$(BIN)/python -m bench.trace --pretrained-pool --corruption systematic-class
	$(BIN)/python -m bench.trace_retrieval
	$(BIN)/python -m bench.scoring_time
	$(BIN)/python -m bench.solvers
	$(BIN)/python -m bench.blocks
	$(BIN)/python -m bench.blocks_vit
	$(BIN)/python -m bench.peers
	$(BIN)/python -m bench.peers.tuned --datasets shapes
	$(BIN)/python -m bench.cleaning
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.scale.extraction
