"""Radiology reports of phantom chest radiographs, written from their facts, and the CheXpert labels they state.

:func:`build_report` turns the ``facts`` of a phantom (:mod:`common.data.cxr.phantoms`) into a report with a
findings and an impression section, choosing among several phrasings (:data:`TEMPLATES`) with a random
generator, so the same facts are worded differently across studies.

**Wording.** A finding the image shows is stated with its side and size words ("Large left pleural
effusion."); a *subtle* one (``facts[name]["subtle"]``: borderline heart size, a small effusion, a thin apical
pneumothorax, faint consolidation, a small nodule) is stated with uncertainty words ("possible", "may represent",
"cannot be excluded", "questionable", "borderline", "upper limits of normal", "concerning for"). An absent
finding is either not mentioned or negated ("No pleural effusion.", "No pneumothorax."); studies without
pathology read like "The lungs are clear. Heart size is normal." / "No acute cardiopulmonary process.".

**Label rules** (values of :data:`~common.data.cxr.datalist.LABEL_VALUES`; names of
:data:`~common.data.cxr.datalist.CHEXPERT_LABELS`):

1. Every sentence comes from a :class:`Template` that states one certainty (positive 1.0, negative 0.0 or
   uncertain -1.0) about a fixed set of labels; a sentence never mixes certainties.
2. Findings map to labels: cardiomegaly -> ``Cardiomegaly``; pleural effusion -> ``Pleural Effusion``;
   pneumothorax -> ``Pneumothorax``; consolidation -> ``Consolidation`` and ``Lung Opacity`` (an opacity is
   stated), and "may represent pneumonia" -> ``Pneumonia`` -1.0, "atelectasis or consolidation" ->
   ``Atelectasis`` -1.0 too; nodule -> ``Lung Lesion``; tubes, lines, pacemaker -> ``Support Devices``.
   Negations map to the label they name: "No focal consolidation." -> ``Consolidation`` 0.0 only (it does not
   deny other opacities), "No focal airspace opacity." -> ``Lung Opacity`` 0.0; "mediastinal contours are normal" -> ``Enlarged Cardiomediastinum`` 0.0; "No pulmonary
   edema." -> ``Edema`` 0.0; "No acute osseous abnormality." -> ``Fracture`` 0.0. Sentences that name no finding
   ("The lungs are clear.", "Low lung volumes.", "No acute cardiopulmonary process.") carry no label.
3. A report's label is the CheXpert aggregate of its sentences: 1.0 if any sentence is positive, else -1.0 if any
   is uncertain, else 0.0 if any negates it; a label no sentence mentions is absent.
4. ``No Finding`` is 1.0 when no label other than ``Support Devices`` is 1.0 or -1.0, and absent otherwise.

Since every finding present in the image is reported (positive, or uncertain when subtle) and absent findings are
only ever negated, a label is 1.0 or -1.0 exactly when the image shows that finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from common.data.cxr.datalist import CHEXPERT_LABELS, LABEL_VALUES

__all__ = ["TEMPLATES", "Report", "Sentence", "Template", "aggregate_labels", "build_report"]

POSITIVE, NEGATIVE, UNCERTAIN = "positive", "negative", "uncertain"


@dataclass(frozen=True)
class Template:
    """One phrasing: ``text`` with ``{placeholders}``, the ``certainty`` it states and about which ``labels``."""

    text: str
    certainty: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.certainty not in LABEL_VALUES:
            raise ValueError(f"certainty must be one of {sorted(LABEL_VALUES)}, got {self.certainty!r}")
        if unknown := [label for label in self.labels if label not in CHEXPERT_LABELS]:
            raise ValueError(f"unknown CheXpert label(s) {unknown}")

    def render(self, **words: str) -> Sentence:
        text = self.text.format(**words)
        text = text[0].upper() + text[1:]
        return Sentence(text, {label: LABEL_VALUES[self.certainty] for label in self.labels})


@dataclass(frozen=True)
class Sentence:
    """A report sentence and the labels it states (``{label: value}``)."""

    text: str
    labels: Mapping[str, float]


@dataclass(frozen=True)
class Report:
    """A phantom's report: section texts, their sentences (findings first) and the aggregated CheXpert labels."""

    findings: str
    impression: str
    sentences: tuple[str, ...]
    labels: dict[str, float]


def _t(certainty: str, labels: Iterable[str], *texts: str) -> tuple[Template, ...]:
    return tuple(Template(text, certainty, tuple(labels)) for text in texts)


_CARDIO = ("Cardiomegaly",)
_MEDIASTINUM = ("Enlarged Cardiomediastinum",)
_EFFUSION = ("Pleural Effusion",)
_PTX = ("Pneumothorax",)
_CONSOLIDATION = ("Consolidation", "Lung Opacity")
_LESION = ("Lung Lesion",)
_DEVICES = ("Support Devices",)

#: The CheXpert label that reports each phantom finding (rule 2 of the module docstring): the truth of a real study
#: whose images have no phantom facts (``common.evaluation.findings.study_truth``).
FINDING_CHEXPERT_LABELS: dict[str, str] = {
    "cardiomegaly": _CARDIO[0],
    "pleural_effusion": _EFFUSION[0],
    "pneumothorax": _PTX[0],
    "consolidation": _CONSOLIDATION[0],
    "nodule": _LESION[0],
    "support_devices": _DEVICES[0],
}

#: Every phrasing, by topic ``"<subject>.<section>.<kind>"``. Placeholders: ``side`` (right / left / bilateral),
#: ``size``, ``severity``, ``adverb``, ``lobe``, ``zone``, ``diameter``, ``effusion`` (effusion / effusions),
#: ``angle``, ``cm``, ``vein``, ``line_side``.
TEMPLATES: dict[str, tuple[Template, ...]] = {
    # heart and mediastinum
    "heart.findings.normal": _t(
        NEGATIVE,
        _CARDIO,
        "Heart size is normal.",
        "The heart is not enlarged.",
        "Normal heart size.",
        "The cardiac silhouette is within normal limits.",
    ),
    "heart_mediastinum.findings.normal": _t(
        NEGATIVE,
        _CARDIO + _MEDIASTINUM,
        "Heart size and mediastinal contours are normal.",
        "The heart and mediastinum are within normal limits.",
        "Normal heart size and mediastinal contours.",
    ),
    "mediastinum.findings.normal": _t(NEGATIVE, _MEDIASTINUM, "The mediastinal contours are normal."),
    "cardiomediastinal.findings.normal": _t(
        NEGATIVE,
        _MEDIASTINUM,
        "The cardiomediastinal silhouette is within normal limits.",
        "Normal cardiomediastinal silhouette.",
    ),
    "heart.findings.borderline": _t(
        UNCERTAIN,
        _CARDIO,
        "Heart size is borderline.",
        "The cardiac silhouette is at the upper limits of normal.",
        "Borderline cardiomegaly.",
        "Possible mild cardiomegaly.",
    ),
    "heart.findings.enlarged": _t(
        POSITIVE,
        _CARDIO,
        "{severity} cardiomegaly.",
        "The heart is {adverb} enlarged.",
        "The cardiac silhouette is {adverb} enlarged.",
        "There is {severity} enlargement of the cardiac silhouette.",
    ),
    "heart.impression.borderline": _t(
        UNCERTAIN, _CARDIO, "Borderline heart size.", "Possible mild cardiomegaly.", "Borderline cardiomegaly."
    ),
    "heart.impression.enlarged": _t(POSITIVE, _CARDIO, "{severity} cardiomegaly.", "Cardiomegaly.", "Enlarged heart."),
    # pleural effusion
    "pleural_effusion.findings.positive": _t(
        POSITIVE,
        _EFFUSION,
        "{size} {side} pleural {effusion}.",
        "There is a {size} {side} pleural {effusion}.",
        "{size} {side} pleural {effusion} blunting {angle}.",
    ),
    "pleural_effusion.findings.large": _t(
        POSITIVE,
        _EFFUSION,
        "Large {side} pleural {effusion} with a meniscus along the lateral chest wall.",
        "Large {side} pleural {effusion} obscuring the {side} hemidiaphragm.",
    ),
    "pleural_effusion.findings.uncertain": _t(
        UNCERTAIN,
        _EFFUSION,
        "Blunting of {angle} may represent a small pleural {effusion}.",
        "Possible small {side} pleural {effusion}.",
        "A small {side} pleural {effusion} cannot be excluded.",
    ),
    "pleural_effusion.findings.negative": _t(
        NEGATIVE, _EFFUSION, "No pleural effusion.", "There is no pleural effusion.", "No pleural effusions."
    ),
    "pleural_effusion.impression.positive": _t(
        POSITIVE, _EFFUSION, "{size} {side} pleural {effusion}.", "{side} pleural {effusion}, {size}."
    ),
    "pleural_effusion.impression.uncertain": _t(
        UNCERTAIN,
        _EFFUSION,
        "Possible small {side} pleural {effusion}.",
        "Small {side} pleural {effusion} cannot be excluded.",
    ),
    # pneumothorax
    "pneumothorax.findings.positive": _t(
        POSITIVE,
        _PTX,
        "There is a {size} {side} pneumothorax.",
        "{size} {side} pneumothorax with a visible visceral pleural line.",
        "A {size} {side} apicolateral pneumothorax is present.",
        "{size} {side} pneumothorax with a lucent pleural space lateral to the visceral pleural line.",
    ),
    "pneumothorax.findings.uncertain": _t(
        UNCERTAIN,
        _PTX,
        "A tiny {side} apical pneumothorax cannot be excluded.",
        "Possible small {side} apical pneumothorax.",
        "Questionable thin {side} apical pleural line, possibly a small pneumothorax.",
    ),
    "pneumothorax.findings.negative": _t(
        NEGATIVE, _PTX, "No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."
    ),
    "pleura.findings.negative": _t(
        NEGATIVE,
        _EFFUSION + _PTX,
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pneumothorax or pleural effusion.",
    ),
    "pneumothorax.impression.positive": _t(
        POSITIVE, _PTX, "{size} {side} pneumothorax.", "{side} pneumothorax, {size} in size."
    ),
    "pneumothorax.impression.uncertain": _t(
        UNCERTAIN,
        _PTX,
        "Possible small {side} apical pneumothorax.",
        "Small {side} apical pneumothorax cannot be excluded.",
    ),
    # consolidation
    "consolidation.findings.positive": _t(
        POSITIVE,
        _CONSOLIDATION,
        "Consolidation in the {lobe} lobe.",
        "There is {lobe} lobe consolidation.",
        "Airspace opacity in the {lobe} lobe consistent with consolidation.",
        "Focal consolidation is present in the {lobe} lobe.",
    ),
    "consolidation.findings.uncertain": _t(
        UNCERTAIN,
        _CONSOLIDATION,
        "Possible early consolidation in the {lobe} lobe.",
        "Subtle {lobe} lobe consolidation cannot be excluded.",
        "Questionable faint consolidation in the {lobe} lobe.",
    )
    + _t(UNCERTAIN, ("Atelectasis",) + _CONSOLIDATION, "Possible {lobe} lobe atelectasis or consolidation."),
    "consolidation.findings.negative": _t(
        NEGATIVE, ("Consolidation",), "No focal consolidation.", "There is no focal consolidation."
    ),
    "opacity.findings.negative": _t(NEGATIVE, ("Lung Opacity",), "No focal airspace opacity."),
    "consolidation.impression.positive": _t(
        POSITIVE, _CONSOLIDATION, "{lobe} lobe consolidation.", "Consolidation in the {lobe} lobe."
    ),
    "consolidation.impression.uncertain": _t(
        UNCERTAIN,
        _CONSOLIDATION,
        "Possible early {lobe} lobe consolidation.",
        "Questionable {lobe} lobe consolidation.",
    ),
    "pneumonia.impression.uncertain": _t(
        UNCERTAIN,
        ("Pneumonia",),
        "Findings may represent pneumonia.",
        "Findings are concerning for pneumonia in the appropriate clinical setting.",
    ),
    # nodule
    "nodule.findings.positive": _t(
        POSITIVE,
        _LESION,
        "A {diameter} nodule is seen in the {side} {zone} lung zone.",
        "There is a {diameter} rounded nodule in the {side} {zone} lung.",
        "{diameter} pulmonary nodule in the {side} {zone} lung zone.",
    ),
    "nodule.findings.uncertain": _t(
        UNCERTAIN,
        _LESION,
        "Possible {diameter} nodule in the {side} {zone} lung zone.",
        "A questionable {diameter} nodule projects over the {side} {zone} lung zone.",
    ),
    "nodule.findings.negative": _t(NEGATIVE, _LESION, "No suspicious pulmonary nodule."),
    "nodule.impression.positive": _t(
        POSITIVE,
        _LESION,
        "{diameter} {side} lung nodule; CT is recommended for further evaluation.",
        "{side} {zone} lung nodule.",
    ),
    "nodule.impression.uncertain": _t(
        UNCERTAIN, _LESION, "Possible {side} lung nodule; CT could be considered.", "Questionable {side} lung nodule."
    ),
    # support devices
    "endotracheal_tube.findings.positive": _t(
        POSITIVE,
        _DEVICES,
        "Endotracheal tube terminates {cm} cm above the carina.",
        "The endotracheal tube tip is {cm} cm above the carina.",
        "Endotracheal tube in standard position, {cm} cm above the carina.",
    ),
    "central_line.findings.positive": _t(
        POSITIVE,
        _DEVICES,
        "{line_side} {vein} central venous catheter terminates in the SVC.",
        "{line_side} {vein} central line with its tip in the superior vena cava.",
        "A {line_side} {vein} catheter ends in the lower SVC.",
    ),
    "pacemaker.findings.single": _t(
        POSITIVE,
        _DEVICES,
        "Left chest wall pacemaker with a lead in the right ventricle.",
        "Left-sided pacemaker; its lead terminates in the right ventricle.",
    ),
    "pacemaker.findings.dual": _t(
        POSITIVE,
        _DEVICES,
        "Left-sided dual-chamber pacemaker with leads in the right atrium and right ventricle.",
        "Left chest wall pacemaker with right atrial and right ventricular leads.",
    ),
    "devices.impression.positive": _t(
        POSITIVE, _DEVICES, "Support devices in standard position.", "Support devices as described."
    ),
    # no labels, or other labels negated
    "lungs.findings.clear": _t(
        NEGATIVE, (), "The lungs are clear.", "Lungs are well expanded and clear.", "The lungs are clear bilaterally."
    ),
    "volumes.findings.low": _t(NEGATIVE, (), "Low lung volumes.", "Lung volumes are low."),
    "edema.findings.negative": _t(NEGATIVE, ("Edema",), "No pulmonary edema.", "There is no pulmonary edema."),
    "bones.findings.negative": _t(
        NEGATIVE, ("Fracture",), "No acute osseous abnormality.", "No displaced fracture is seen."
    ),
    "normal.impression": _t(
        NEGATIVE,
        (),
        "No acute cardiopulmonary process.",
        "No acute cardiopulmonary abnormality.",
        "No acute intrathoracic process.",
    ),
    "normal.impression.no_devices": _t(NEGATIVE, (), "Normal chest radiograph."),
}

_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_PATHOLOGY_LABELS = tuple(label for label in CHEXPERT_LABELS if label not in ("No Finding", "Support Devices"))


def aggregate_labels(sentences: Iterable[Sentence]) -> dict[str, float]:
    """CheXpert aggregate of the sentences' labels, plus ``No Finding`` (rules 3 and 4 of the module docstring).

    Returns ``{label: value}`` in :data:`CHEXPERT_LABELS` order, only for labels that are mentioned.
    """
    mentions: dict[str, set[float]] = {}
    for sentence in sentences:
        for label, value in sentence.labels.items():
            mentions.setdefault(label, set()).add(value)
    labels: dict[str, float] = {}
    for label, values in mentions.items():
        for value in (LABEL_VALUES[POSITIVE], LABEL_VALUES[UNCERTAIN], LABEL_VALUES[NEGATIVE]):
            if value in values:
                labels[label] = value
                break
    if not any(labels.get(label, 0.0) != 0.0 for label in _PATHOLOGY_LABELS):
        labels["No Finding"] = LABEL_VALUES[POSITIVE]
    return {label: labels[label] for label in CHEXPERT_LABELS if label in labels}


class _Writer:
    """Chooses phrasings with ``rng``; every choice goes through :meth:`say`."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def say(self, *topics: str, **words: str) -> Sentence:
        options = [template for topic in topics for template in TEMPLATES[topic]]
        return options[int(self.rng.integers(len(options)))].render(**words)

    def chance(self, probability: float) -> bool:
        return bool(self.rng.uniform() < probability)


def _side_words(side: str) -> dict[str, str]:
    if side == "both":
        return {"side": "bilateral", "effusion": "effusions", "angle": "both costophrenic angles"}
    return {"side": side, "effusion": "effusion", "angle": f"the {side} costophrenic angle"}


def _diameter(mm: float) -> str:
    return f"{round(mm)} mm" if mm < 10 else f"{mm / 10:.1f} cm"


def _heart(w: _Writer, facts: Mapping) -> tuple[list[Sentence], list[Sentence]]:
    finding = facts.get("cardiomegaly")
    if finding is None:
        if w.chance(0.35):
            return [w.say("heart_mediastinum.findings.normal")], []
        said = [w.say("heart.findings.normal")] if w.chance(0.8) else []
        mediastinum = ("mediastinum.findings.normal", "cardiomediastinal.findings.normal")
        return said + ([w.say(*mediastinum)] if w.chance(0.4) else []), []
    mediastinum = [w.say("mediastinum.findings.normal")] if w.chance(0.3) else []
    if finding["subtle"]:
        return [w.say("heart.findings.borderline"), *mediastinum], [w.say("heart.impression.borderline")]
    words = {"severity": finding["severity"], "adverb": _SEVERITY_ADVERB[finding["severity"]]}
    findings = [w.say("heart.findings.enlarged", **words), *mediastinum]
    return findings, [w.say("heart.impression.enlarged", **words)]


def _effusion(w: _Writer, finding: Mapping) -> tuple[list[Sentence], list[Sentence]]:
    words = {**_side_words(finding["side"]), "size": finding["volume"]}
    if finding["subtle"]:
        return [w.say("pleural_effusion.findings.uncertain", **words)], [
            w.say("pleural_effusion.impression.uncertain", **words)
        ]
    topics = ["pleural_effusion.findings.positive"]
    if finding["volume"] == "large" and finding["side"] != "both":
        topics.append("pleural_effusion.findings.large")
    return [w.say(*topics, **words)], [w.say("pleural_effusion.impression.positive", **words)]


def _pneumothorax(w: _Writer, finding: Mapping) -> tuple[list[Sentence], list[Sentence]]:
    words = {"side": finding["side"], "size": finding["size"]}
    kind = "uncertain" if finding["subtle"] else "positive"
    return [w.say(f"pneumothorax.findings.{kind}", **words)], [w.say(f"pneumothorax.impression.{kind}", **words)]


def _consolidation(w: _Writer, finding: Mapping) -> tuple[list[Sentence], list[Sentence]]:
    words = {"lobe": finding["lobe"]}
    if finding["subtle"]:
        return [w.say("consolidation.findings.uncertain", **words)], [
            w.say("consolidation.impression.uncertain", **words)
        ]
    impression = [w.say("consolidation.impression.positive", **words)]
    if w.chance(0.5):
        impression.append(w.say("pneumonia.impression.uncertain"))
    return [w.say("consolidation.findings.positive", **words)], impression


def _nodule(w: _Writer, finding: Mapping) -> tuple[list[Sentence], list[Sentence]]:
    words = {"side": finding["side"], "zone": finding["zone"], "diameter": _diameter(finding["diameter_mm"])}
    kind = "uncertain" if finding["subtle"] else "positive"
    return [w.say(f"nodule.findings.{kind}", **words)], [w.say(f"nodule.impression.{kind}", **words)]


def _devices(w: _Writer, devices: Mapping) -> list[Sentence]:
    said = []
    if (tube := devices.get("endotracheal_tube")) is not None:
        said.append(w.say("endotracheal_tube.findings.positive", cm=f"{tube['tip_above_carina_cm']:.1f}"))
    if (line := devices.get("central_line")) is not None:
        said.append(w.say("central_line.findings.positive", line_side=line["side"], vein=line["vein"]))
    if (pacer := devices.get("pacemaker")) is not None:
        said.append(w.say("pacemaker.findings.dual" if pacer["leads"] == 2 else "pacemaker.findings.single"))
    return said


def build_report(facts: Mapping, rng: np.random.Generator) -> Report:
    """The report of a phantom with ``facts`` (see :mod:`common.data.cxr.phantoms`), worded with ``rng``.

    Findings section order: devices, lung volumes, heart and mediastinum, lungs, pleura, edema, bones.
    Impression: the findings present, most urgent first, or a normal statement.
    """
    w = _Writer(rng)
    findings: list[Sentence] = []
    impression: list[Sentence] = []
    devices = facts.get("support_devices")
    if devices:
        findings += _devices(w, devices)
    if facts.get("anatomy", {}).get("posterior_ribs", 10) <= 8 and w.chance(0.7):
        findings.append(w.say("volumes.findings.low"))

    heart_findings, heart_impression = _heart(w, facts)
    findings += heart_findings

    effusion, ptx = facts.get("pleural_effusion"), facts.get("pneumothorax")
    consolidation, nodule = facts.get("consolidation"), facts.get("nodule")
    by_finding: dict[str, tuple[list[Sentence], list[Sentence]]] = {}
    if consolidation is not None:
        by_finding["consolidation"] = _consolidation(w, consolidation)
    if nodule is not None:
        by_finding["nodule"] = _nodule(w, nodule)
    if effusion is not None:
        by_finding["pleural_effusion"] = _effusion(w, effusion)
    if ptx is not None:
        by_finding["pneumothorax"] = _pneumothorax(w, ptx)

    # lungs
    if consolidation is None and nodule is None and effusion is None and ptx is None and w.chance(0.7):
        findings.append(w.say("lungs.findings.clear"))
    for name in ("consolidation", "nodule"):
        findings += by_finding.get(name, ([], []))[0]
    if consolidation is None and w.chance(0.45):
        findings.append(w.say("consolidation.findings.negative"))
    if consolidation is None and nodule is None and w.chance(0.1):
        findings.append(w.say("opacity.findings.negative"))
    if nodule is None and w.chance(0.05):
        findings.append(w.say("nodule.findings.negative"))

    # pleura
    for name in ("pleural_effusion", "pneumothorax"):
        findings += by_finding.get(name, ([], []))[0]
    if effusion is None and ptx is None and w.chance(0.6):
        findings.append(w.say("pleura.findings.negative"))
    else:
        if effusion is None and w.chance(0.7):
            findings.append(w.say("pleural_effusion.findings.negative"))
        if ptx is None and w.chance(0.7):
            findings.append(w.say("pneumothorax.findings.negative"))
    if w.chance(0.25):
        findings.append(w.say("edema.findings.negative"))
    if w.chance(0.3):
        findings.append(w.say("bones.findings.negative"))

    for name in ("pneumothorax", "consolidation", "pleural_effusion"):
        impression += by_finding.get(name, ([], []))[1]
    impression += heart_impression
    impression += by_finding.get("nodule", ([], []))[1]
    if not impression:
        topics = ("normal.impression",) if devices else ("normal.impression", "normal.impression.no_devices")
        impression.append(w.say(*topics))
    if devices and w.chance(0.4):
        impression.append(w.say("devices.impression.positive"))
    if not findings:  # only a study without pathology can get here: say so rather than leave the section empty
        findings.append(w.say("lungs.findings.clear"))

    sentences = findings + impression
    return Report(
        findings=" ".join(s.text for s in findings),
        impression=" ".join(s.text for s in impression),
        sentences=tuple(s.text for s in sentences),
        labels=aggregate_labels(sentences),
    )
