# Two commands do all set-up on a fresh machine:
#   make app    install what is needed and open the app on the built-in demo
#   make test   install what is needed (incl. Chromium for the browser test) and run the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: install app test chromium demo bench
install: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null)

app: $(STAMP)
	$(BIN)/ecif app

demo: $(STAMP)
	$(BIN)/ecif demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/fidelity.py
	$(BIN)/python bench/detect.py
