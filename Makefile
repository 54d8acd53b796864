# The two commands a new user needs:
#   make demo   - install, start a local Kafka broker, run the whole pipeline on simulated orders, print the summary
#   make test   - install, then run the whole test suite against a real broker and the embedded ClickHouse engine
# Everything is installed by these targets into .venv/ and .cache/ (nothing global).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install kafka bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

kafka:
	bash deploy/kafka/kafka.sh fetch

demo: install kafka
	$(BIN)/csos demo

test: install kafka
	$(BIN)/python -m pytest -q

bench: install kafka
	$(BIN)/csos bench

clean:
	rm -rf var
