# The two commands of the README: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := dcmtk orthanc orthanc-dicomweb

.PHONY: quickstart test lint system-packages

# Runtime install: the project and its dependencies in ./.venv.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

# Import the bundled sample into ./store on the DirectRunner, one metadata row per stored instance
# into the Parquet table ./metadata, and show what landed there.
quickstart: $(VENV)/.installed
	$(BIN)/dicom-etl import_dicom --input='sample/**.dcm' --store=./store --metadata_destination=./metadata
	@echo "./store now holds $$(find store -name '*.dcm' | wc -l) instances, e.g.:"
	@find store -name '*.dcm' | sort | head -3
	@echo "./metadata (Parquet, schema.json, view.sql), its view through DuckDB:"
	@cd metadata && ../$(BIN)/python -c "import duckdb; duckdb.sql('SELECT Modality, count(*) AS instances, \
	  count(DISTINCT StudyInstanceUID) AS studies FROM (' + open('view.sql').read() + ') GROUP BY 1 ORDER BY 1').show()"

# Debian packages the tests use as independent oracles and servers (root installs them).
system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "please install the Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: system-packages lint
	$(BIN)/python -m pytest
