# The two commands of the README. Both set up .venv on a fresh machine first (pip only: it takes torch from
# this machine's local wheels; see README).
PY := .venv/bin/python

.PHONY: run test setup ui

run: setup
	$(PY) -m rekd.search sparse_kd

test: setup
	$(PY) -m pytest -q

# The MLflow UI over the results of `make run`, on 127.0.0.1:5000 until Ctrl-C.
ui: setup
	$(PY) -m rekd.ui rekd-results

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --quiet --upgrade pip
	$(PY) -m pip install --quiet --quiet -e '.[test]'
	touch $@
