"""common.evaluation.findings: finding targets from phantom facts, per-finding AUROC, the finding classifier."""

from __future__ import annotations

import pytest
import torch

from common.data.cxr.phantoms import FINDINGS, CXRPhantomGenerator
from common.evaluation.findings import (
    FINDING_LABELS,
    FindingAdherence,
    FindingClassifier,
    finding_auroc,
    finding_targets,
    study_truth,
    targets_of_entries,
)
from common.networks.feature_extractors import PhantomFeatureNet

SMALL = {"channels": (4, 4, 8, 8), "depths": (1, 1, 1, 1)}


def _network(num_targets: int = len(FINDING_LABELS), seed: int = 0) -> PhantomFeatureNet:
    torch.manual_seed(seed)
    return PhantomFeatureNet(**SMALL, num_targets=num_targets)


def test_labels_are_the_phantom_findings():
    assert FINDING_LABELS == FINDINGS
    assert FINDING_LABELS[:3] == ("cardiomegaly", "pleural_effusion", "pneumothorax")


def test_targets_mark_listed_findings_subtle_ones_included():
    facts = {"present": ["pneumothorax", "support_devices"], "pneumothorax": {"subtle": True}}
    assert finding_targets(facts).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert finding_targets({"present": []}).sum() == 0
    assert finding_targets(facts, ["support_devices", "nodule"]).tolist() == [1.0, 0.0]


def test_targets_of_generated_phantoms_match_their_facts():
    """Across real phantom facts (drawn without rendering), a target is 1 exactly where the finding is described."""
    generator = CXRPhantomGenerator(size=32, seed=3)
    facts = [generator.facts(generator.parameters(patient, 0)) for patient in range(40)]
    targets = targets_of_entries([{"facts": f} for f in facts])
    assert targets.shape == (40, len(FINDING_LABELS)) and targets.dtype == torch.float32
    expected = torch.tensor([[float(f[name] is not None) for name in FINDING_LABELS] for f in facts])
    torch.testing.assert_close(targets, expected)
    assert 0 < targets.sum() < targets.numel()


def test_bad_facts_are_refused():
    with pytest.raises(ValueError, match="present"):
        finding_targets({"ctr": 0.5})
    with pytest.raises(ValueError, match="fracture"):
        finding_targets({"present": ["fracture"]})
    with pytest.raises(ValueError, match="no 'facts'"):
        targets_of_entries([{"image": "a.png"}])


def test_auroc_perfect_inverted_and_ties():
    targets = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    scores = torch.tensor([[0.1, 0.1, 0.5], [0.2, 0.2, 0.5], [0.8, 0.8, 0.5], [0.9, 0.9, 0.5]])
    aurocs = finding_auroc(scores, targets, ["perfect", "inverted", "ties"])
    assert aurocs == {"perfect": 1.0, "inverted": 0.0, "ties": 0.5}


def test_auroc_matches_the_rank_formula():
    """AUROC = P(score of a positive > score of a negative), ties counted one half (Mann-Whitney U)."""
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(50, 6, generator=g) < 0.4).float()
    scores = torch.randint(0, 8, (50, 6), generator=g).float() + targets  # ties, and some signal
    aurocs = finding_auroc(scores, targets)
    for i, name in enumerate(FINDING_LABELS):
        pos, neg = scores[targets[:, i] == 1, i], scores[targets[:, i] == 0, i]
        wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
        assert aurocs[name] == pytest.approx(float(wins.mean()))


def test_auroc_of_a_single_class_is_none_with_a_warning():
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([[0.2, 0.1, 0.9], [0.3, 0.7, 0.1]])
    with pytest.warns(UserWarning, match="all 2 targets are 1"):
        aurocs = finding_auroc(scores, targets, ["always", "b", "c"])
    assert aurocs == {"always": None, "b": 1.0, "c": 1.0}


def test_auroc_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        finding_auroc(torch.rand(4, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        finding_auroc(torch.rand(4, 6), torch.ones(3, 6))
    with pytest.raises(ValueError, match="NaN"):
        finding_auroc(torch.full((2, 6), float("nan")), torch.tensor([[0.0] * 6, [1.0] * 6]))
    with pytest.raises(ValueError, match="0 or 1"):
        finding_auroc(torch.rand(2, 6), torch.full((2, 6), -1.0))  # CheXpert "uncertain" is not a target


def test_classifier_outputs_probabilities_per_finding():
    classifier = FindingClassifier(_network(), image_size=(32, 32), batch_size=3)
    classifier.train()  # stays in eval mode: batch-norm statistics must not move
    assert not classifier.training
    images = torch.rand(7, 1, 32, 32, requires_grad=True)
    probabilities = classifier(images)
    assert probabilities.shape == (7, len(FINDING_LABELS)) and probabilities.dtype == torch.float32
    assert ((probabilities > 0) & (probabilities < 1)).all() and not probabilities.requires_grad
    torch.testing.assert_close(probabilities[2:3], classifier(images[2:3]))  # independent of the batch
    torch.testing.assert_close(probabilities, torch.sigmoid(classifier.network(images.detach())))
    assert classifier.feature_extractor()(images).shape == (7, 8)  # pooled embedding: the FID feature


def test_classifier_refuses_another_size_and_output_count():
    with pytest.raises(ValueError, match=r"trained on \(32, 32\)"):
        FindingClassifier(_network(), image_size=(32, 32))(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="4 outputs for 6 findings"):
        FindingClassifier(_network(num_targets=4))


def test_from_weights_refuses_a_brain_feature_network_and_says_how_to_train(tmp_path):
    path = tmp_path / "brain.pt"
    net = _network()
    config = {"channels": list(net.channels), "depths": list(net.depths), "num_targets": 6}
    targets = ["age", "ventricle_volume_ml", "gm_fraction", "wm_fraction", "csf_fraction", "wmh_volume_ml"]
    torch.save({"feature_network": net.state_dict(), "network_config": config, "targets": targets}, path)
    with pytest.raises(ValueError, match="not a chest X-ray finding classifier"):
        FindingClassifier.from_weights(path)
    with pytest.raises(FileNotFoundError, match="train-finding-classifier"):
        FindingClassifier.from_weights(tmp_path / "missing.pt")


class _ReadsTruth:
    """A classifier whose probability of finding ``j`` is pixel ``(0, 0, j)`` of the image: it sees what is drawn."""

    findings = ("cardiomegaly", "pleural_effusion", "pneumothorax")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, : len(self.findings)].float()


def _images(rows) -> torch.Tensor:
    images = torch.zeros(len(rows), 1, 4, 4)
    images[:, 0, 0, :3] = torch.tensor(rows, dtype=torch.float32)
    return images


def test_study_truth_reads_phantom_facts_or_else_the_report_labels():
    facts = [{"facts": {"present": ["cardiomegaly"]}}, {"facts": {"present": []}}]
    targets, known = study_truth(facts, ("cardiomegaly", "pneumothorax"))
    assert targets.tolist() == [[1.0, 0.0], [0.0, 0.0]] and known.all()
    labelled = [
        {"labels": {"Cardiomegaly": 1.0, "Pneumothorax": -1.0}},  # uncertain: not known
        {"labels": {"Cardiomegaly": 0.0}},  # pneumothorax not mentioned: not known
    ]
    targets, known = study_truth(labelled, ("cardiomegaly", "pneumothorax"))
    assert targets[:, 0].tolist() == [1.0, 0.0] and known.tolist() == [[True, False], [True, False]]


def test_finding_adherence_is_one_for_images_that_show_their_studies_and_chance_for_constant_ones():
    entries = [
        {"facts": {"present": ["cardiomegaly", "pleural_effusion"]}},
        {"facts": {"present": ["cardiomegaly"]}},
        {"facts": {"present": []}},
        {"facts": {"present": ["pleural_effusion"]}},
    ]
    truthful = _images([[0.9, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.1], [0.2, 0.9, 0.1]])
    adherence = FindingAdherence(_ReadsTruth())
    scores = adherence(entries, truthful)
    # no study shows a pneumothorax: its AUROC is undefined (None) and left out of the mean
    assert scores == {"auroc": {"cardiomegaly": 1.0, "pleural_effusion": 1.0, "pneumothorax": None}, "mean_auroc": 1.0}
    constant = adherence(entries, _images([[0.5, 0.5, 0.5]] * 4))
    assert constant["auroc"]["cardiomegaly"] == 0.5 and constant["mean_auroc"] == 0.5
    assert adherence.metrics(scores) == {
        "report_adherence_auroc_mean": 1.0,
        "report_adherence_auroc_cardiomegaly": 1.0,
        "report_adherence_auroc_pleural_effusion": 1.0,
        "report_adherence_auroc_pneumothorax": None,
    }
    rows = adherence.summary(constant, scores)
    assert rows[0] == {"measure": "report adherence AUROC, mean", "generated": 0.5, "real": 1.0}
    assert rows[1]["measure"] == "report adherence AUROC, cardiomegaly"
    with pytest.raises(ValueError, match="3 images for 4 studies"):
        adherence(entries, truthful[:3])
