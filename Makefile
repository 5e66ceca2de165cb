# The README's commands. CI (.ci/run) calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`: every test starts its own servers, brokers and databases
# (ports 0, fresh schemas, key prefixes), so they run side by side; 2 halves the suite's time on
# a 2-core machine. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

.PHONY: install demo test lint serve watch clean bench bench-report web-vendor

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/vitalwire demo

# The browser tests (tests/test_web.py) drive Debian's chromium, and the reverse-proxy tests
# (tests/test_proxy_nginx.py) Debian's nginx: installed here when missing and running as root (as
# CI does); otherwise they skip saying why (fail under VITALWIRE_REQUIRE_SERVICES=1).
# Playwright's own browser downloads are not used.
test: install
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
			>/dev/null 2>&1 || echo "apt-get could not install chromium: the browser tests will say so"; \
	fi
	@if [ ! -x /usr/sbin/nginx ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing nginx for the reverse-proxy tests (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } \
			>/dev/null 2>&1 || echo "apt-get could not install nginx: the proxy tests will say so"; \
	fi
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check src tests

watch: install
	$(BIN)/vitalwire watch

bench: install
	$(BIN)/vitalwire bench --devices 2000 --rate 1 --clients 200 --patients-per-client 20 \
		--duration 20 --against naive --against mqtt://127.0.0.1:1883 --json docs/bench/ward.json

bench-report: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/vitalwire bench --devices 100 --rate 10 --clients 10 --patients-per-client 100 \
		--duration 8 --saturate --repeat 3 --generator node --against naive \
		--against mqtt://127.0.0.1:1883 \
		--json docs/bench/saturation.json
	$(BIN)/python tools/bench_report.py docs/bench/saturation.json docs/bench/saturation.png

# Swagger UI for /docs and the web app's libraries (Preact, htm, uPlot), vendored from npm at
# the versions pinned in the scripts (needs npm)
web-vendor:
	$(PYTHON) tools/vendor_swagger_ui.py
	$(PYTHON) tools/vendor_web.py

clean:
	rm -rf $(VENV) vitalwire.db vitalwire.db-wal vitalwire.db-shm .pytest_cache vitalwire-sim-credentials.json
