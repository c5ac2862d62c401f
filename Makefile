# migrator: `make demo` and `make test` work on a fresh machine of this kind, as root.
VENV    ?= .venv
PY      := $(VENV)/bin/python
LAB     := $(VENV)/bin/migrate-lab
PYTEST_ARGS ?=

.PHONY: setup demo test matrix bench lab-up lab-down clean

setup:                       ## packages (QEMU 10, libvirt 11.3 from bookworm-backports), venv, guest image
	bash scripts/setup.sh

demo: setup                  ## lab up, then the ping_pong scenario hostA <-> hostB with its summary
	$(LAB) up
	$(LAB) status
	$(VENV)/bin/migrate-run -m hostA,hostB ping_pong
	@echo "The lab stays up: 'migrate-lab ssh hostB', 'migrate-lab status'; remove it with 'make lab-down'."

test: setup                  ## the whole suite, against its own lab (never the demo's)
	$(PY) -m pytest $(PYTEST_ARGS)

matrix: setup                ## the fault matrices' every case (make test runs their representative ones)
	$(PY) -m pytest --matrix -m matrix $(PYTEST_ARGS)

bench: setup                 ## benchmarks (tables on stdout)
	$(PY) bench/lab_updown.py
	$(PY) bench/guest_boot.py
	$(PY) bench/ssh_fanout.py
	$(PY) bench/sync_barrier.py
	$(PY) bench/migration_vs_raw.py
	$(PY) bench/discriminating_case.py
	$(PY) bench/run_vs_raw.py
	$(PY) bench/drivers.py
	$(PY) bench/guest_console.py
	$(PY) bench/parallel_vms.py
	$(PY) bench/blackout.py
	$(PY) bench/converge.py
	$(PY) bench/queue_pipelining.py
	$(PY) bench/drain.py
	$(PY) bench/tls.py
	$(PY) bench/storage.py
	$(PY) bench/watch.py
	$(PY) bench/plan.py

lab-up: setup
	$(LAB) up

lab-down:
	$(LAB) down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
