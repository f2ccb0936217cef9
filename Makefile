# Two entry points: `make demo` and `make test`. Both build .venv on first use from the committed lock
# (requirements.lock: exact versions with hashes), and re-install only when the lock or pyproject.toml
# changed. The stamp is written only after `mmbench doctor` has loaded every native extension, so a broken
# install is retried on the next `make`, never silently kept.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
UV_VERSION := 0.13.9

.PHONY: demo test venv venv-cpu clean bench lock doctor

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@rm -f $(STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/mmbench doctor
	touch $(STAMP)

# CPU-only install (no ~3-4 GB of CUDA libraries): torch / torchaudio / torchvision at the locked versions
# from PyTorch's CPU index, everything else from the lock with its hashes, minus torch's CUDA packages.
# Then `make demo` / `make test` use this .venv as is (the stamp is newer than the lock).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
GPU_ONLY := ^(torch|torchaudio|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==
venv-cpu:
	@rm -f $(STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps --index-url $(TORCH_CPU_INDEX) \
	    $$(grep -E '^(torch|torchaudio|torchvision)==' $(LOCK) | cut -d' ' -f1)
	awk '/^[^ #]/ {skip = ($$0 ~ /$(GPU_ONLY)/)} !skip' $(LOCK) > $(VENV)/requirements-cpu.lock
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/requirements-cpu.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/mmbench doctor
	touch $(STAMP)

doctor: $(STAMP)
	$(BIN)/mmbench doctor

demo: $(STAMP)
	$(BIN)/mmbench prepare synthetic
	$(BIN)/mmbench sweep recipes/quickstart.yaml
	$(BIN)/mmbench report --compare --sweep quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/step_throughput.py

# Re-lock after changing a dependency in pyproject.toml: resolves for every platform and Python >= 3.11,
# with hashes, into requirements.lock (commit it). uv runs from its own throwaway venv.
lock:
	test -x .lockenv/bin/uv || ($(PYTHON) -m venv .lockenv && .lockenv/bin/pip install --quiet uv==$(UV_VERSION))
	.lockenv/bin/uv pip compile pyproject.toml --extra test --universal --generate-hashes \
	    --python-version 3.11 --no-header --upgrade -o $(LOCK)

clean:
	rm -rf $(VENV) .lockenv data results.db runs
