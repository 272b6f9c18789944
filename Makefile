# The quick-start commands (see README):
#   make demo          the main job on the Shapes world: build it if needed, train the projection, analyse it
#   make experiments   after make demo: the paper's other results (Tables 1 and 2, Figure 5, S.4)
#   make test          the test suite
# Each creates the local virtual environment .venv on first use; re-running is cheap.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Nothing is downloaded from model or dataset hubs, and W&B stays offline.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: demo experiments test install clean-world

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py
	$(PY) analyze.py

experiments: $(STAMP)
	$(PY) experiments/prompt_decoding.py
	$(PY) experiments/neuron_scores.py
	$(PY) experiments/receptive_fields.py
	$(PY) experiments/selectivity.py

test: $(STAMP)
	$(PY) -m pytest -q

clean-world:
	rm -rf .cache/mmn/world-*
