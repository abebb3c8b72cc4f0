# Two entry points for a newcomer: `make demo` and `make test`. Both build the virtual environment
# on first use (torch 2.13.0 CPU wheel first, so nothing pulls a CUDA build) and are safe to re-run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.leanformer-installed

.PHONY: env demo test bench dynamic-bench quant-bench batch1-bench zoo-table clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: env
	$(VENV)/bin/leanformer inspect minilm --out runs/demo --overwrite

test: env
	$(PY) -m pytest -q

bench: env
	@for b in benchmarks/*_bench.py; do echo "== $$b"; $(PY) $$b || exit 1; done

dynamic-bench: env  # dense vs dynamic-k MoE vs early exit, FLOPs and CPU latency (hours on one thread)
	$(PY) benchmarks/dynamic_bench.py

quant-bench: env  # quantization Pareto curves (quality vs honest bits) + latency table (≈40 min on one thread)
	$(PY) benchmarks/quant_bench.py

batch1-bench: env  # batch-1 decode speed of 3-bit models vs fp32 as the model outgrows the caches (≈20 min)
	$(PY) benchmarks/batch1_bench.py

zoo-table: env  # the README's architecture support table, from the zoo test's recorded outcomes
	$(PY) benchmarks/zoo_table.py

clean:
	rm -rf $(VENV) runs
