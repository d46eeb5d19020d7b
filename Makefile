# Two commands do all the set-up on a fresh machine: `make train` (main job) and `make test` (the test suite).
PYTHON ?= python
# The CPU wheel of torch that this project is developed and tested with; override for a CUDA build,
# e.g. `make train TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install train test test-slow lint

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test]"

# -q: a failed run's error stays one line (accelerate's launcher adds no traceback of its own); the exit status is 1.
train: install
	accelerate launch -q --num_processes 1 training/train.py --preset digits

lint: install
	ruff check .

# The suite (about 10 minutes on 2 cores). Tests marked `slow` (benchmark smoke runs, SIGKILL fault injection,
# torch.compile) run in `make test-slow`, the second step of .ci/run.
test: install
	ruff check .
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	$(PYTHON) -m pytest -q -m slow
