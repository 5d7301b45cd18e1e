# The README's commands. Every target sets up .venv first if needed.
#
#   make demo     demo corpus -> shards -> 2-rank CPU training -> evaluation -> registered model
#   make test     the whole test suite
#
# GPU users pick their torch build before the first setup (setup runs once per .venv: after any
# other target, rm -rf .venv first), e.g.:
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.installed
EXTRAS      ?= test,onnx,s3,gcs
INSTALLER   ?= uv
# DeepSpeed's CPU ranks load a shared-memory all-reduce op it compiles on first use (about a
# minute on 2 cores). Its build names the virtualenv's paths, so it lives in the virtualenv:
# setup builds it once, and no launch (make demo, make test, make train) pays for it again.
# The virtualenv's bin first on PATH for the build and the launches: ninja reads only its own
# build log, so a build by another ninja (a system one) would be rebuilt by the next launch.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
VENV_PATH   := PATH="$(abspath $(VENV))/bin:$$PATH"

# make shards
DEMO_DIR    ?= data/demo
SRC_A       ?= $(DEMO_DIR)/trainA
SRC_B       ?= $(DEMO_DIR)/trainB
OUT         ?= data/shards
WORKERS     ?= 2
SHARD_ARGS  ?=

# make train
CONFIG      ?= configs/demo.yaml
NGPUS       ?= 2
# the launcher's rendezvous port; two trainings at once on one host need two ports
MASTER_PORT ?= 29500
DS_ARGS     ?= --num_gpus $(NGPUS) --master_port $(MASTER_PORT) --log_level warning
ARGS        ?=

# make test: pytest-xdist workers, each running one test file at a time. A launch is mostly
# single-threaded start-up and teardown, and a server test mostly waits, so on 2 cores three
# files side by side fill both cores better still, but the fault tests are timed: two workers.
TEST_WORKERS ?= 2

# make demo-data
DEMO_TRAIN  ?= 2000
DEMO_TEST   ?= 200
DEMO_SIZE   ?= 32

.PHONY: setup demo demo-data shards verify train test test-fast bench bench-gpu gpu-wheels ablation mlflow-server mlflow-ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the build TORCH_SPEC/TORCH_INDEX name, so the project's torch range
	# is already satisfied and pip never pulls a multi-GB CUDA build on its own.
	$(PIP) install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	# The rest with uv where it works (the same packages from the same index, unpacked in
	# parallel: about 20 s here against pip's minute); pip when INSTALLER=pip or uv fails.
	if [ "$(INSTALLER)" = uv ] && $(PIP) install --quiet uv \
	   && $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -e '.[$(EXTRAS)]'; then :; \
	else $(PIP) install --quiet -e '.[$(EXTRAS)]'; fi
	$(VENV_PATH) $(PY) -m launch.training.ops
	touch $@

demo-data: $(STAMP)
	$(PY) -m pipeline.demo --out "$(DEMO_DIR)" --n-train $(DEMO_TRAIN) --n-test $(DEMO_TEST) --size $(DEMO_SIZE) --seed 0

shards: $(STAMP)
	@if [ "$(SRC_A)" = "$(DEMO_DIR)/trainA" ] && [ ! -d "$(SRC_A)" ]; then $(MAKE) --no-print-directory demo-data; fi
	# exit 3 = shards complete, some inputs quarantined (see OUT/quarantine.parquet): not a failure
	$(PY) -m pipeline.shards --src-a "$(SRC_A)" --src-b "$(SRC_B)" --out "$(OUT)" --workers $(WORKERS) $(SHARD_ARGS) || [ $$? -eq 3 ]

verify: $(STAMP)
	$(PY) -m pipeline.shards verify "$(OUT)"

# Validate the config before any rank starts, then hand over to the DeepSpeed launcher.
train: $(STAMP)
	$(PY) -m launch.config "$(CONFIG)" --master-port $(MASTER_PORT) $(ARGS) > /dev/null
	$(VENV_PATH) $(VENV)/bin/deepspeed $(DS_ARGS) launch/train.py --config "$(CONFIG)" $(ARGS)

demo: $(STAMP)
	$(MAKE) --no-print-directory demo-data
	$(PY) -m pipeline.shards --src-a "$(DEMO_DIR)/trainA" --src-b "$(DEMO_DIR)/trainB" --out "$(OUT)" --workers $(WORKERS) --max-per-shard 500 || [ $$? -eq 3 ]
	$(MAKE) --no-print-directory train CONFIG=configs/demo.yaml ARGS='data.shards="$(OUT)" $(ARGS)'

test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(STAMP)
	$(PY) bench/shards.py
	$(PY) bench/loader.py
	$(PY) bench/step.py
	$(PY) bench/train.py

# One CUDA GPU, a few minutes: fp32/bf16/fp16 x compile table at 128 and 256 px, and a 300-step
# bf16 training run through the real launcher (bench/gpu.sh; exits 2 at once without a GPU)
bench-gpu: $(STAMP)
	PY=$(PY) bench/gpu.sh

# Wheels for an offline GPU machine whose Python (GPU_PYTHON) has a CUDA torch and not the rest:
# bench/gpu.sh there installs from .whl/ what that Python lacks (about 10 MB; .whl/ is git-ignored)
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) bench/gpu_wheels.py download --out .whl --python-version $(GPU_PYTHON)

# The paper's ablation on the demo corpus (about 30 min on 2 CPU cores; cached, resumable)
ABLATION_ARGS ?=
ablation: $(STAMP)
	$(PY) bench/ablation.py $(ABLATION_ARGS)

# A team tracking server on PostgreSQL with proxied artifacts, e.g.
#   MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://postgres@127.0.0.1:5432/mlflow make mlflow-server
# mlflow server reads MLFLOW_BACKEND_STORE_URI itself (the envvar of --backend-store-uri), so the
# URI, and any password in it, stays out of the command line (ps, /proc/<pid>/cmdline).
MLFLOW_PORT ?= 5000
mlflow-server: $(STAMP)
	@: "$${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://user@host:5432/db}"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
		--artifacts-destination "$${MLFLOW_ARTIFACTS_DESTINATION:-$(CURDIR)/mlartifacts}" --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# The MLflow UI on a run's embedded store (make mlflow-ui RUN_DIR=runs/demo)
RUN_DIR ?= runs/demo
mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri "sqlite:///$(abspath $(RUN_DIR))/mlflow/mlflow.db" \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf data runs
