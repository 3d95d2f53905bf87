"""common.data.cxr.reports: report wording agrees with the CheXpert labels and with the facts of the image."""

from __future__ import annotations

import re
import string

import numpy as np
import pytest

from common.data.cxr.datalist import CHEXPERT_LABELS, LABEL_VALUES
from common.data.cxr.phantoms import FINDINGS, CXRPhantomGenerator, FindingPrevalence
from common.data.cxr.reports import (
    FINDING_CHEXPERT_LABELS,
    TEMPLATES,
    Sentence,
    Template,
    aggregate_labels,
    build_report,
)

# An independent, keyword-based reading of a sentence, in the spirit of the CheXpert labeller: which labels a
# sentence mentions, and whether it affirms, negates or hedges them.
MENTIONS = {
    "Enlarged Cardiomediastinum": r"mediastin",
    "Cardiomegaly": r"\bheart\b|cardiac|cardiomegaly",
    "Lung Opacity": r"opacit|consolidation",
    "Lung Lesion": r"nodule",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia",
    "Atelectasis": r"atelecta",
    "Pneumothorax": r"pneumothorax",
    "Pleural Effusion": r"effusion",
    "Fracture": r"osseous|fracture",
    "Support Devices": r"\btube\b|catheter|central line|pacemaker|\bleads?\b|support devices",
}
UNCERTAIN = re.compile(
    r"\bpossible\b|\bpossibly\b|may represent|cannot be excluded|questionable|borderline|upper limits of normal"
    r"|concerning for|could be considered"
)
NEGATED = re.compile(r"^no\b|\bno\b|\bnot\b|\bnormal\b|\bwithout\b|\bclear\b")


def read_sentence(text: str) -> dict[str, float]:
    lower = text.lower()
    labels = [label for label, pattern in MENTIONS.items() if re.search(pattern, lower)]
    if UNCERTAIN.search(lower):
        value = LABEL_VALUES["uncertain"]
    elif NEGATED.search(lower):
        value = LABEL_VALUES["negative"]
    else:
        value = LABEL_VALUES["positive"]
    if value == LABEL_VALUES["negative"]:
        # denying consolidation does not deny every opacity (module rule 2)
        labels = [label for label in labels if not (label == "Lung Opacity" and "opacit" not in lower)]
    return dict.fromkeys(labels, value)


SAMPLE_WORDS = {
    "side": ["right", "left", "bilateral"],
    "size": ["small", "moderate", "large"],
    "severity": ["mild", "moderate", "severe"],
    "adverb": ["mildly", "markedly"],
    "lobe": ["right upper", "right middle", "left lower"],
    "zone": ["upper", "mid", "lower"],
    "diameter": ["8 mm", "2.1 cm"],
    "effusion": ["effusion", "effusions"],
    "angle": ["the right costophrenic angle", "both costophrenic angles"],
    "cm": ["4.5"],
    "vein": ["internal jugular", "subclavian"],
    "line_side": ["right", "left"],
}


def _renderings(template: Template):
    fields = [f for _, f, _, _ in string.Formatter().parse(template.text) if f]
    for i in range(3):
        yield template.render(**{f: SAMPLE_WORDS[f][i % len(SAMPLE_WORDS[f])] for f in fields})


@pytest.mark.parametrize("topic", sorted(TEMPLATES))
def test_every_phrasing_states_exactly_its_labels(topic):
    for template in TEMPLATES[topic]:
        for sentence in _renderings(template):
            assert not sentence.text[0].islower() and sentence.text.endswith(".")
            assert read_sentence(sentence.text) == dict(sentence.labels), sentence.text


@pytest.fixture(scope="module")
def studies():
    """Facts and reports of 400 studies (no images drawn), with a few subtle findings."""
    generator = CXRPhantomGenerator("demo", seed=0, prevalence=FindingPrevalence(subtle=0.3))
    out = []
    for patient in range(200):
        for study in range(2):
            facts = generator.facts(generator.parameters(patient, study))
            out.append((facts, build_report(facts, generator.report_rng(patient, study))))
    return out


def test_reports_are_well_formed(studies):
    for _, report in studies:
        assert report.sentences and all(s.strip() == s and s for s in report.sentences)
        assert report.findings and report.impression
        assert " ".join(report.sentences) == f"{report.findings} {report.impression}"
        assert list(report.labels) == [label for label in CHEXPERT_LABELS if label in report.labels]
        assert set(report.labels.values()) <= set(LABEL_VALUES.values())


def test_labels_are_what_the_sentences_say(studies):
    for _, report in studies:
        read = aggregate_labels(Sentence(text, read_sentence(text)) for text in report.sentences)
        assert read == report.labels, report.sentences


LABEL_OF = FINDING_CHEXPERT_LABELS  # the map the reports must follow: checked below against generated reports


def test_labels_agree_with_the_image_facts(studies):
    subtle_seen = set()
    for facts, report in studies:
        labels = report.labels
        for name in FINDINGS:
            value = labels.get(LABEL_OF[name])
            finding = facts[name]
            if finding is None:
                assert value in (None, 0.0), (name, report.sentences)  # absent: not mentioned or negated
            elif name != "support_devices" and finding["subtle"]:
                assert value == -1.0, (name, report.sentences)  # subtle: hedged
                subtle_seen.add(name)
            else:
                assert value == 1.0, (name, report.sentences)
        if facts["consolidation"] is not None:
            assert labels["Lung Opacity"] == labels["Consolidation"]
        pathology = set(facts["present"]) - {"support_devices"}
        assert (labels.get("No Finding") == 1.0) == (not pathology)
        assert "No Finding" not in labels or labels["No Finding"] == 1.0
    assert subtle_seen == set(FINDINGS) - {"support_devices"}


def test_wording_varies_and_states_sides_and_sizes(studies):
    effusions = [(f, r) for f, r in studies if f["pleural_effusion"] and not f["pleural_effusion"]["subtle"]]
    assert len({r.findings for _, r in effusions}) > 20
    for facts, report in effusions:
        side = {"both": "bilateral"}.get(facts["pleural_effusion"]["side"], facts["pleural_effusion"]["side"])
        text = report.findings.lower()
        assert side in text and facts["pleural_effusion"]["volume"] in text
    normal = [r for f, r in studies if not f["present"]]
    assert len(normal) > 50
    assert any("No pleural effusion" in r.findings or "no pleural effusion" in r.findings for r in normal)
    assert any("No pneumothorax" in r.findings for r in normal)
    assert any("The lungs are clear." in r.findings for r in normal)
    assert any(s in r.findings for r in normal for s in ("Heart size is normal.", "Normal heart size."))
    impressions = {r.impression for r in normal}
    assert impressions <= {
        "No acute cardiopulmonary process.",
        "No acute cardiopulmonary abnormality.",
        "No acute intrathoracic process.",
        "Normal chest radiograph.",
    }
    same_facts = studies[0][0]
    texts = {build_report(same_facts, np.random.default_rng(i)).findings for i in range(30)}
    assert len(texts) > 5


def test_aggregation_rules():
    def said(**labels):
        return Sentence("x", labels)

    labels = aggregate_labels(
        [said(Pneumothorax=0.0), said(Pneumothorax=-1.0), said(Cardiomegaly=-1.0), said(Cardiomegaly=1.0)]
    )
    assert labels == {"Cardiomegaly": 1.0, "Pneumothorax": -1.0}  # positive > uncertain > negative
    assert aggregate_labels([said(**{"Pleural Effusion": 0.0, "Support Devices": 1.0})]) == {
        "No Finding": 1.0,
        "Pleural Effusion": 0.0,
        "Support Devices": 1.0,
    }
    assert aggregate_labels([]) == {"No Finding": 1.0}


def test_template_checks_its_vocabulary():
    with pytest.raises(ValueError, match="certainty"):
        Template("Odd.", "likely", ("Cardiomegaly",))
    with pytest.raises(ValueError, match="unknown CheXpert"):
        Template("Odd.", "positive", ("Cardiac Arrest",))
