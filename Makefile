# The two commands of the README. Both set up .venv on a fresh machine first (pip only: it takes torch from
# this machine's local wheels; see README).
PY := .venv/bin/python

.PHONY: run test setup

run: setup
	$(PY) -m rekd.search sparse_kd

test: setup
	$(PY) -m pytest -q

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@
