"""Chest X-ray findings scored by a classifier trained on phantoms: condition adherence of generated radiographs.

A text-to-radiograph model adheres to its conditions when an image generated from a prompt that states a finding
shows it, and one generated from a prompt that negates it does not. :class:`FindingClassifier` scores images for
the findings of :data:`FINDING_LABELS`; :func:`finding_auroc` turns those scores and the prompts' 0/1 intents into
one AUROC per finding (1.0: every stated-finding image scores above every negated-finding image; 0.5: chance).
On real phantoms the same AUROC is the ceiling the metric can reach (``train-finding-classifier`` prints it).

The classifier is a :class:`~common.networks.feature_extractors.PhantomFeatureNet` whose ``K`` outputs are finding
logits, saved by ``tools/train_finding_classifier.py`` in the layout of the phantom feature network, so its pooled
embedding is also the demo FID feature (``build_feature_extractor("phantom", path)`` or
:meth:`FindingClassifier.feature_extractor`).

**Orientation.** The network sees images as MONAI's ``LoadImaged(keys="image", ensure_channel_first=True)``
loads the datalist's PNGs: ``(1, W, H)``, the first spatial axis running across the image (the patient's right
first), the second down it. Images must come in that same layout (the one the bundle trains and generates in),
in [0, 1] (PNG values / 255).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.metrics import compute_roc_auc
from torch import nn

from common.data.cxr.phantoms import FINDINGS
from common.data.cxr.reports import FINDING_CHEXPERT_LABELS
from common.networks.feature_extractors import (
    FeatureExtractor,
    PhantomFeatureNet,
    load_phantom_feature_net,
    phantom_feature_extractor,
)

#: The findings the classifier predicts, in output order: the phantom findings (``facts["present"]`` names).
FINDING_LABELS: tuple[str, ...] = tuple(FINDINGS)

#: What the error for a missing classifier says to do.
FINDING_CLASSIFIER_HOW_TO_GET = (
    "Train one on chest X-ray phantoms (a few CPU minutes) with "
    "`train-finding-classifier --dataset_dir DIR --output FILE`."
)


def finding_targets(facts: Mapping[str, Any], findings: Sequence[str] = FINDING_LABELS) -> torch.Tensor:
    """0/1 targets ``(F,)`` float32 of a phantom's ``facts``: 1 where ``facts["present"]`` lists the finding.

    Subtle findings (borderline heart, thin pneumothorax, ...) are listed in ``present`` and count as present.

    Raises:
        ValueError: ``facts`` has no ``present`` list, or it names a finding phantoms do not know.
    """
    present = facts.get("present") if isinstance(facts, Mapping) else None
    if not isinstance(present, list | tuple):
        raise ValueError("Phantom facts must hold a 'present' list of finding names (common.data.cxr.phantoms).")
    if unknown := sorted(set(present) - set(FINDINGS)):
        raise ValueError(f"Unknown finding(s) {unknown} in facts; phantom findings are {list(FINDINGS)}.")
    return torch.tensor([float(name in present) for name in findings], dtype=torch.float32)


def targets_of_entries(entries: Sequence[Mapping[str, Any]], findings: Sequence[str] = FINDING_LABELS) -> torch.Tensor:
    """0/1 targets ``(N, F)`` float32 of datalist entries that carry phantom ``facts``."""
    missing = [i for i, entry in enumerate(entries) if "facts" not in entry]
    if missing:
        raise ValueError(
            f"Entries {missing[:5]} have no 'facts': finding targets need a phantom data set "
            "(tools/make_cxr_phantoms.py), not a real one."
        )
    if not entries:
        return torch.empty(0, len(findings))
    return torch.stack([finding_targets(entry["facts"], findings) for entry in entries])


def finding_auroc(
    scores: torch.Tensor | Sequence[Sequence[float]],
    targets: torch.Tensor | Sequence[Sequence[float]],
    findings: Sequence[str] = FINDING_LABELS,
) -> dict[str, float | None]:
    """Area under the ROC curve per finding: ``{finding: AUROC}``.

    Args:
        scores: ``(N, F)`` classifier outputs (probabilities or logits; only their order matters).
        targets: ``(N, F)`` 0/1 truth (for condition adherence: 1 where the prompt stated the finding).
        findings: the names of the ``F`` columns.

    Returns:
        AUROC in [0, 1] per finding (ties count one half), or ``None``, with a warning, where the targets hold one
        class only and the AUROC is undefined; never NaN.

    Raises:
        ValueError: shapes disagree, scores are not finite, or targets are not 0/1.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    targets = torch.as_tensor(targets, dtype=torch.float64).cpu()
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(findings):
        raise ValueError(
            f"scores and targets must both be (N, {len(findings)}) for the findings {list(findings)}, "
            f"got {tuple(scores.shape)} and {tuple(targets.shape)}."
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values.")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0 or 1.")
    aurocs: dict[str, float | None] = {}
    for column, name in enumerate(findings):
        truth = targets[:, column]
        positives = int(truth.sum())
        if positives in (0, len(truth)):
            warnings.warn(
                f"AUROC of {name} is undefined: all {len(truth)} targets are {int(positives > 0)}; reported as None.",
                stacklevel=2,
            )
            aurocs[name] = None
            continue
        aurocs[name] = float(compute_roc_auc(scores[:, column], truth))
    return aurocs


class _Probabilities(nn.Module):
    """``sigmoid(network(x))``: finding probabilities ``(B, F)`` of images ``(B, 1, H, W)``."""

    def __init__(self, network: PhantomFeatureNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x))


class FindingClassifier(nn.Module):
    """Callable ``images (N, 1, H, W) in [0, 1] -> finding probabilities (N, F)``: eval mode, no gradients, batched.

    Images must be in the layout described in the module docstring (``(1, W, H)`` as MONAI loads the PNGs) and,
    when the network records it, of the size it was trained on.

    Args:
        network: a trained :class:`PhantomFeatureNet` whose ``F`` outputs are finding logits.
        findings: names of the outputs, in order.
        image_size: ``(H, W)`` the network was trained on; other sizes are refused (``None``: not checked).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        network: PhantomFeatureNet,
        findings: Sequence[str] = FINDING_LABELS,
        image_size: Sequence[int] | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if network.num_targets != len(findings):
            raise ValueError(f"The network has {network.num_targets} outputs for {len(findings)} findings {findings}.")
        self.network = network
        self.findings = tuple(findings)
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None
        self.probabilities = FeatureExtractor(_Probabilities(network), len(self.findings), batch_size=batch_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FindingClassifier:
        """Always stays in eval mode: scoring must not update batch-norm statistics."""
        return super().train(False)

    @classmethod
    def from_weights(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        how_to_get: str = FINDING_CLASSIFIER_HOW_TO_GET,
    ) -> FindingClassifier:
        """The classifier saved by ``tools/train_finding_classifier.py`` at ``path``.

        Raises:
            FileNotFoundError: no file at ``path``; the message says how to train one.
            ValueError: the file is not a finding classifier (e.g. the brain feature network).
        """
        network, state = load_phantom_feature_net(path, how_to_get)
        targets = list(state.get("targets", []))
        if not targets or not set(targets) <= set(FINDINGS) or state.get("outputs") != "logits":
            raise ValueError(
                f"{path} is a phantom feature network for {targets}, not a chest X-ray finding classifier "
                f"(outputs: logits of findings among {list(FINDINGS)}). {how_to_get}"
            )
        return cls(network, targets, state.get("image_size"), batch_size).to(device)

    def feature_extractor(self) -> FeatureExtractor:
        """The FID feature extractor of the same network: pooled embedding ``(N, D)`` of images ``(N, 1, H, W)``."""
        return phantom_feature_extractor(self.network, batch_size=self.probabilities.batch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Finding probabilities ``(N, F)`` (CPU, float32) of ``images`` ``(N, 1, H, W)`` in [0, 1]."""
        if self.image_size is not None and tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"The finding classifier was trained on {self.image_size} images, got {tuple(images.shape[2:])}: "
                "score images of the size it was trained on (or train one for this size)."
            )
        return self.probabilities(images)


class FindingAdherence:
    """Adherence of generated radiographs to the reports they were generated from, for
    :class:`common.evaluation.captioned.CaptionedGeneration`: per-finding AUROC of the finding classifier's
    probability on image ``i`` against the truth of study ``i``.

    The truth is the phantom's ``facts`` where every entry has them, else the report's CheXpert labels
    (:data:`common.data.cxr.reports.FINDING_CHEXPERT_LABELS`; 1 present, 0 absent, uncertain and unmentioned studies left out of that
    finding). Scored on the real test images, the same AUROC is the ceiling.
    """

    description = "the phantom finding classifier's AUROC against each study's truth"

    def __init__(self, classifier: FindingClassifier) -> None:
        self.classifier = classifier

    def __call__(self, entries: Sequence[Mapping[str, Any]], images: torch.Tensor) -> dict[str, Any]:
        """``{"auroc": {finding: AUROC or None}, "mean_auroc": ...}`` of ``images`` ``(N, 1, H, W)``."""
        if len(entries) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {len(entries)} studies.")
        findings = self.classifier.findings
        scores = self.classifier(images).double()
        targets, known = study_truth(entries, findings)
        aurocs: dict[str, float | None] = {}
        with warnings.catch_warnings():  # a finding no test study shows (or all do): None
            warnings.simplefilter("ignore")
            for column, name in enumerate(findings):
                rows = known[:, column]
                auroc = finding_auroc(scores[rows, column : column + 1], targets[rows, column : column + 1], [name])
                aurocs[name] = None if auroc[name] is None else round(auroc[name], 4)
        defined = [v for v in aurocs.values() if v is not None]
        return {"auroc": aurocs, "mean_auroc": round(sum(defined) / len(defined), 4) if defined else None}

    @staticmethod
    def metrics(scores: Mapping[str, Any]) -> dict[str, float | None]:
        """The headline figures of :meth:`__call__`'s scores, by metric name."""
        return {
            "report_adherence_auroc_mean": scores["mean_auroc"],
            **{f"report_adherence_auroc_{name}": value for name, value in scores["auroc"].items()},
        }

    @staticmethod
    def summary(generated: Mapping[str, Any], real: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows of the results table: the generated images' figure beside the real images' (its ceiling)."""
        rows = [
            {
                "measure": f"report adherence AUROC, {name.replace('_', ' ')}",
                "generated": generated["auroc"][name],
                "real": real["auroc"][name],
            }
            for name in generated["auroc"]
        ]
        return [
            {
                "measure": "report adherence AUROC, mean",
                "generated": generated["mean_auroc"],
                "real": real["mean_auroc"],
            },
            *rows,
        ]


def study_truth(entries: Sequence[Mapping[str, Any]], findings: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, known)``, both ``(N, F)``: 0/1 truth per study and finding, and where it is known.

    Phantom ``facts`` (every entry has them) are known everywhere; otherwise CheXpert ``labels`` 1.0 / 0.0 are.
    """
    if entries and all("facts" in entry for entry in entries):
        targets = targets_of_entries(entries, findings)
        return targets, torch.ones_like(targets, dtype=torch.bool)
    targets = torch.zeros(len(entries), len(findings))
    known = torch.zeros(len(entries), len(findings), dtype=torch.bool)
    for i, entry in enumerate(entries):
        labels = entry.get("labels") or {}
        for j, name in enumerate(findings):
            value = labels.get(FINDING_CHEXPERT_LABELS[name])
            if value in (0.0, 1.0):
                targets[i, j], known[i, j] = float(value), True
    return targets, known
