# segflow developer entry points. `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
MEDIAPIPE_VENV := .venv-mediapipe
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-extended test-slow test-containers test-mediapipe docs golden clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: synthetic dataset -> full DAG (train, evaluate, export, push); prints the run folder and mean IoU
demo: install
	$(BIN)/segflow demo-data data/demo
	$(BIN)/segflow run configs/demo.yaml --output runs/demo-$(RUN_ID)

## test: the default suite (unit + Beam DirectRunner + kfp.local integration) in 2 pytest-xdist workers, each test file
## in one of them (its module fixtures are built once); a plain `pytest` stays serial
test: install
	$(BIN)/pytest -n 2 --dist loadfile

## test-extended: whole-DAG and multi-process runs kept out of the default suite's 15 minutes (about 20 min); CI runs it
test-extended: install
	$(BIN)/pytest -m extended

## test-slow: full runs on the real datasets in ../shared/datasets (skipped when absent)
test-slow: install
	$(BIN)/pytest -m slow

## test-containers: build the CPU image from a fresh Debian base (containers/build.sh: podman or Docker, root
## for debootstrap), run the demo DAG in containers and in-process, compare the summaries; prints its duration
CONTAINER_BUILD_FLAGS ?= --fresh-base
test-containers: install
	@start=$$(date +%s); \
	if command -v podman >/dev/null || command -v docker >/dev/null; then \
	  containers/build.sh $(CONTAINER_BUILD_FLAGS) || exit 1; \
	else echo "test-containers: neither podman nor docker is installed; the image is not built"; fi; \
	$(BIN)/pytest -m containers -rs tests/cluster/test_containers.py; status=$$?; \
	echo "test-containers: $$(( $$(date +%s) - start )) s"; exit $$status

## test-mediapipe: MediaPipe Tasks' ImageSegmenter (in its own environment, .venv-mediapipe: MediaPipe needs
## absl-py 2, the training stack pins 1.x) runs the tflite_fp32 and tflite_int8 exports as they are and agrees with
## `segflow predict`; prints its duration
$(MEDIAPIPE_VENV)/.installed-stamp: tests/export/requirements-mediapipe.txt
	$(PYTHON) -m venv $(MEDIAPIPE_VENV)
	$(MEDIAPIPE_VENV)/bin/pip install --quiet --upgrade pip==25.3
	$(MEDIAPIPE_VENV)/bin/pip install --quiet -r tests/export/requirements-mediapipe.txt
	touch $@

test-mediapipe: install $(MEDIAPIPE_VENV)/.installed-stamp
	@start=$$(date +%s); \
	$(BIN)/pytest -m mediapipe -rs -s tests/export/test_mediapipe.py; status=$$?; \
	echo "test-mediapipe: $$(( $$(date +%s) - start )) s"; exit $$status

## docs: the documentation site (mkdocs.yml, docs/) into site/, with --strict (a broken link or a page missing from
## the nav fails); the reference pages for the CLI, the config keys and the Python API are generated from the code first
docs: install
	$(BIN)/python -m segflow.reference docs/reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## golden: rewrite tests/golden/pipeline.yaml, pipeline-kfold.yaml and pipeline-cluster.yaml after an intended change of the compiled pipeline,
## configs/segflow.schema.json after a change of the config models, docs/reference/*.md after one of the CLI or the API
golden: install
	SEGFLOW_UPDATE_GOLDEN=1 $(BIN)/pytest tests/pipelines/test_pipeline.py tests/cluster/test_cluster.py tests/config/test_config.py tests/test_reference.py -k "golden or schema or reference_pages"

clean:
	rm -rf $(VENV) $(MEDIAPIPE_VENV) runs data model-registry site
