"""The chest X-ray datalist: one layout for phantoms and prepared MIMIC-CXR, so one set of configs reads both.

``datalist.json`` (MONAI decathlon style, paths relative to the file) holds ``training``, ``validation`` and
``test`` lists, split by patient (:func:`common.data.splits.split_subjects`), and a ``patients`` map of the same
split. Each entry:

- ``image``: a square 8-bit grayscale PNG, the radiograph as a reader sees it (row 0 at the top of the chest, the
  patient's right on the left of the image);
- ``patient`` and ``study``: identifiers (MIMIC's ``p10000032`` / ``s50414267``, or the phantom's);
- ``findings`` and ``impression``: the report sections as text (either may be ``""``);
- ``sentences``: the sentences of both sections, findings first, none empty; training draws prompts from them;
- ``labels`` (phantoms, or where a labeller's output is given): ``{CheXpert label: value}`` with the values of
  :data:`LABEL_VALUES`; a label not mentioned is absent.

Top-level keys besides the splits describe the data set (``description``, ``generator``, ``image_size``, ...).
"""

from __future__ import annotations

#: The 14 observations of the CheXpert labeller (Irvin et al., 2019), in its order; MIMIC-CXR uses the same.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: CheXpert's label values: stated present, stated absent, uncertain ("may represent", "cannot exclude").
LABEL_VALUES: dict[str, float] = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0}

#: Keys every entry of a chest X-ray datalist has.
ENTRY_KEYS: tuple[str, ...] = ("image", "patient", "study", "findings", "impression", "sentences")

SPLITS: tuple[str, ...] = ("training", "validation", "test")
