"""A MONAI Label app serving the project's bundles: a viewer (3D Slicer, OHIF) asks it to run one on the image it shows.

Each bundle is declared below, by name and kind; none needs code of its own. Start it (in the MONAI Label
environment, ``make label-setup``) from the repository root::

    .venv-label/bin/monailabel start_server --app tools/monailabel_app --studies STUDIES_DIR

``--conf bundles_dir DIR`` points at another folder of bundles (default: the repository's ``bundles/``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib.infers import BundleGenerationTask, BundleTranslationTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
#: Image-to-image tasks: task name -> (bundle, description, the options the viewer may set, with defaults).
TRANSLATIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "flair_to_t1": (
        "flair_to_t1_controlnet",
        "Synthetic T1w from the FLAIR volume shown (slice by slice, 2 mm axial slices)",
        {"seed": 0, "num_inference_steps": 50, "guidance_scale": 1.0},
    ),
}
#: Text-to-image tasks: task name -> (bundle, description, options with defaults); generated images join the datastore.
GENERATIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "text_to_t1": (
        "brain_t1_ldm",
        "Brain T1w slices generated from the prompt",
        {
            "prompt": "T1-weighted image of a brain of a 70 year old subject with medium ventricles.",
            "num_samples": 1,
            "seed": 0,
            "num_inference_steps": 50,
            "guidance_scale": 2.0,
        },
    ),
    "text_to_brain_unclip": (
        "brain_unclip",
        "Brain T1w slices generated from a caption through CLIP, a diffusion prior and a decoder (unCLIP)",
        {
            "prompt": "T1-weighted brain MRI, axial slice at z=+13 mm, 70-year-old subject; large lateral ventricles",
            "num_samples": 1,
            "seed": 0,
            "num_inference_steps": 50,
            "prior_guidance_scale": 2.0,
            "decoder_guidance_scale": 3.0,
        },
    ),
    "text_to_cxr": (
        "cxr_ldm",
        "Chest X-rays generated from report text",
        {
            "prompt": "Small left pleural effusion.",
            "num_samples": 1,
            "seed": 0,
            "num_inference_steps": 50,
            "guidance_scale": 7.0,
        },
    ),
}


class GenerativeBundlesApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = Path(conf.get("bundles_dir", BUNDLES))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MONAI generative bundles",
            description="FLAIR to T1w translation and text to brain MRI / chest X-ray generation",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, (bundle, description, config) in TRANSLATIONS.items():
            infers[name] = BundleTranslationTask(self.bundles_dir / bundle, description, config)
        for name, (bundle, description, config) in GENERATIONS.items():
            infers[name] = BundleGenerationTask(self.bundles_dir / bundle, self.datastore(), description, config)
        missing = [name for name, task in infers.items() if not task.is_valid()]
        if missing:
            raise ValueError(f"Bundles not found under {self.bundles_dir} for the tasks {missing}.")
        return infers
