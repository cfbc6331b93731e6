# The two commands a newcomer needs (both set up .venv first, both idempotent):
#   make demo   -- the DisCo chain on the small default (CPU, 2 ranks)
#   make test   -- the test suite
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/python launchers/demo.py
test: setup
	.venv/bin/python -m pytest tests
