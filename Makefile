# The commands a newcomer needs (all set up .venv first, all idempotent):
#   make demo       -- the DisCo chain on the small default (CPU, 2 ranks)
#   make test       -- the whole test suite (CI runs it; a real SLURM cluster must be up: slurm/local-cluster.sh start)
#   make test-fast  -- unit tests and one 2-rank engine test, for everyday work (under 3 minutes on 2 cores)
#   make lint       -- ruff's linter and formatter check (CI runs it); `make format` rewrites the files
.PHONY: setup demo test test-fast lint format
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/python launchers/demo.py
test: setup
	.venv/bin/python -m pytest tests
test-fast: setup
	.venv/bin/python -m pytest tests -m "not slow"
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
