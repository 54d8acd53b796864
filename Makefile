# The two commands a new user needs:
#   make demo   - install, start a local Kafka broker, run the whole pipeline on simulated orders, print the summary
#   make test   - install, then run the whole test suite against a real broker and the embedded ClickHouse engine
# Everything is installed by these targets: Python packages into .venv/, Kafka into .cache/, and (make test
# only) Debian's chromium package for the browser test and Debian's prometheus package for the metrics tests,
# with apt-get.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install kafka browser prometheus pkits bench clean

# A worker's hot modules are compiled (setup.py, mypyc; streams/core/native.py lists them) by the pip install below; after an edit or a pull
# changed one of them, the check exits 1 and the package is reinstalled, which rebuilds them.
install: $(STAMP)
	@$(BIN)/python -c 'import sys, streams.core.native as n; sys.exit(n.main())' || \
	    $(BIN)/python -m pip install --quiet --no-deps -e .

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

kafka:
	bash deploy/kafka/kafka.sh fetch

# Debian's Chromium and its driver for the review page's browser test (tests/browser/test_review_browser.py).
# Playwright drives /usr/bin/chromium; it never downloads a browser of its own. Needs root (apt-get).
browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)

# Debian's Prometheus (2.42, with promtool) for tests/unit/test_prometheus_files.py (promtool checks deploy/prometheus)
# and tests/e2e/test_metrics.py (a real Prometheus scrapes the session's worker and sink and evaluates the alert
# rules). Installed the same way as chromium: Debian's package, with apt-get (needs root). The package's service
# is not used: the test starts its own server on a free port.
prometheus:
	command -v promtool >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

# NIST PKITS (RFC 5280 path and CRL conformance data) for tests/unit/test_pkits.py: not in this repository;
# taken from the pyhanko-certvalidator source distribution (the same version as the dependency), which ships
# the PKITS certificates, CRLs and expected results under tests/fixtures/nist_pkits.
PKITS_VERSION := 0.33.0
PKITS := .cache/pkits/nist_pkits/pkits.json

pkits: $(PKITS)

$(PKITS): | $(STAMP)
	mkdir -p .cache/pkits
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: pyhanko-certvalidator==$(PKITS_VERSION) -d .cache/pkits
	tar xzf .cache/pkits/pyhanko_certvalidator-$(PKITS_VERSION).tar.gz -C .cache/pkits --strip-components=3 \
	    pyhanko_certvalidator-$(PKITS_VERSION)/tests/fixtures/nist_pkits
	test -f $@

demo: install kafka
	$(BIN)/csos demo

test: install kafka browser prometheus pkits
	$(BIN)/python -m pytest -q
	CSOS_RUNTIME=kafka $(BIN)/python -m pytest -q tests/e2e

bench: install kafka
	$(BIN)/csos bench

clean:
	rm -rf var
