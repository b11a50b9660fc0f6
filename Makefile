# The two commands of the README: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
AIRFLOW_VENV := .venv-airflow
DEBIAN_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb tesseract-ocr

.PHONY: quickstart test lint system-packages

# Runtime install: the project, its dependencies and the duckdb command in ./.venv.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[cli]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet --editable '.[cli,test]'
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

# Airflow with its Google and Beam providers, for tests/test_airflow_dag.py, in an environment of its own:
# it brings some 250 packages (2 GB) that the pipelines never use, its pins move with Airflow's releases,
# and the DAG runs the pipelines with the project's own interpreter anyway. About 3 minutes from PyPI.
$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet 'apache-airflow>=3.0' 'apache-airflow-providers-google>=22.8' \
	  'apache-airflow-providers-apache-beam>=5.0'
	touch $@

# The tests' FHIR server (medplum's fhir-router, tests/fhir_server/server.mjs), from package-lock.json.
FHIR_SERVER := tests/fhir_server
$(FHIR_SERVER)/node_modules/.installed: $(FHIR_SERVER)/package.json $(FHIR_SERVER)/package-lock.json
	npm ci --prefix $(FHIR_SERVER) --no-audit --no-fund
	touch $@

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: system-packages lint $(AIRFLOW_VENV)/.installed $(FHIR_SERVER)/node_modules/.installed
	$(BIN)/python -m pytest -n auto --maxprocesses=4
