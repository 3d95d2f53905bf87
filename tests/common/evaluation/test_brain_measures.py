"""common.evaluation.brain_measures: tissue fractions and ventricle area from the image, adherence scores."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from common.data.brain.captions import CaptionFacts
from common.evaluation.brain_measures import (
    SliceMeasures,
    adherence_scores,
    measure_slice,
    measure_slices,
    measurement_ceiling,
)

LEVELS = (0.15, 0.5, 0.85)  # CSF, GM, WM intensities of the synthetic slices


def synthetic_brain(
    shape=(96, 112), ventricle_radius: float = 8.0, sulcus: bool = True, noise: float = 0.01, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elliptic "brain": GM rim, WM core, a central CSF disk (ventricle) and a CSF notch at the edge (sulcus).

    Returns the image, the label map (0 background, 1 CSF, 2 GM, 3 WM) and the ventricle mask.
    """
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    cr, cc = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    radius = np.hypot((rows - cr) / 40.0, (cols - cc) / 48.0)
    labels = np.where(radius <= 1.0, np.where(radius > 0.72, 2, 3), 0)
    ventricle = np.hypot(rows - cr, cols - cc) <= ventricle_radius
    labels[ventricle] = 1
    if sulcus:  # a strip of CSF from the brain's edge inwards: reaches the surface, so not a ventricle
        labels[int(cr) - 1 : int(cr) + 2, int(cc) + 34 : int(cc) + 49] = np.where(
            labels[int(cr) - 1 : int(cr) + 2, int(cc) + 34 : int(cc) + 49] > 0, 1, 0
        )
    values = np.array((0.0, *LEVELS))[labels]
    rng = np.random.default_rng(seed)
    image = np.where(labels > 0, values + rng.normal(0.0, noise, shape), 0.0)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels, ventricle


def true_fractions(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel(), minlength=4)[1:].astype(np.float64)
    return counts / counts.sum()


# ---------------------------------------------------------------------------------------------------------------
# measure_slice on synthetic slices


@pytest.mark.parametrize("ventricle_radius", [6.0, 12.0])
def test_raw_fractions_recover_three_tissue_areas(ventricle_radius):
    image, labels, _ = synthetic_brain(ventricle_radius=ventricle_radius)
    m = measure_slice(image, calibrate=False)
    np.testing.assert_allclose(
        [m.raw_csf_fraction, m.raw_gm_fraction, m.raw_wm_fraction], true_fractions(labels), atol=0.01
    )
    assert (m.csf_fraction, m.gm_fraction, m.wm_fraction) == (m.raw_csf_fraction, m.raw_gm_fraction, m.raw_wm_fraction)
    np.testing.assert_allclose(m.class_means, LEVELS, atol=0.02)
    assert m.brain_area_mm2 == pytest.approx((labels > 0).sum() * 4.0)


def test_calibrated_fractions_sum_to_one_and_follow_the_raw_ones():
    small = measure_slice(synthetic_brain(ventricle_radius=5.0)[0])
    large = measure_slice(synthetic_brain(ventricle_radius=14.0)[0])
    for m in (small, large):
        assert m.csf_fraction + m.gm_fraction + m.wm_fraction == pytest.approx(1.0)
    assert large.csf_fraction > small.csf_fraction and large.raw_csf_fraction > small.raw_csf_fraction


def test_a_smooth_bias_field_is_corrected():
    image, labels, _ = synthetic_brain()
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    field = np.exp(0.12 * (rows - rows.mean()) / 48.0 - 0.08 * ((cols - cols.mean()) / 56.0) ** 2)
    biased = np.clip(image * field, 0.0, 1.0)
    m = measure_slice(biased, calibrate=False)
    np.testing.assert_allclose(
        [m.raw_csf_fraction, m.raw_gm_fraction, m.raw_wm_fraction], true_fractions(labels), atol=0.02
    )


@pytest.mark.parametrize("spacing", [2.0, 1.0, (1.0, 1.5)])
def test_ventricle_area_of_a_central_dark_blob(spacing):
    image, _, ventricle = synthetic_brain(ventricle_radius=9.0)
    m = measure_slice(image, spacing_mm=spacing)
    pixel_area = spacing * spacing if np.isscalar(spacing) else spacing[0] * spacing[1]
    # The edge notch (sulcus) is CSF too, but reaches the brain's surface: not counted.
    assert m.ventricle_area_mm2 == pytest.approx(ventricle.sum() * pixel_area, rel=0.03)
    assert m.ventricle_fraction == pytest.approx(m.ventricle_area_mm2 / m.brain_area_mm2)


def test_no_central_csf_means_no_ventricle():
    image, _, _ = synthetic_brain(ventricle_radius=0.0)
    # A CSF blob off-centre (still deep in the brain) is not a ventricle either.
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    image[np.hypot(rows - 47.5, cols - 25.0) <= 4] = LEVELS[0]
    m = measure_slice(image)
    assert m.ventricle_area_mm2 == 0.0
    assert m.ventricle_volume_ml_estimate == 0.0 and m.ventricle_size == "small"


def test_input_layouts_and_validation():
    image, _, _ = synthetic_brain()
    reference = measure_slice(image)
    assert measure_slice(torch.from_numpy(image)[None]) == reference
    assert measure_slices(image[None, None].repeat(2, axis=0)) == [reference, reference]
    assert set(reference.to_dict()) >= {"csf_fraction", "ventricle_area_mm2", "ventricle_fraction", "ventricle_size"}
    with pytest.raises(ValueError, match="shape"):
        measure_slice(image[None, None])
    with pytest.raises(ValueError, match="must lie in"):
        measure_slice(image * 2.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        measure_slice(image, spacing_mm=0.0)
    with pytest.warns(UserWarning, match="brain pixels"):
        empty = measure_slice(np.zeros((32, 32), dtype=np.float32))
    assert math.isnan(empty.csf_fraction) and empty.brain_area_mm2 == 0.0 and empty.ventricle_size is None


# ---------------------------------------------------------------------------------------------------------------
# Real phantom slices


@pytest.fixture(scope="module")
def phantom_slices():
    """20 T1w slices of 4 phantom subjects (seed 0) with datalist-like entries."""
    from common.data.brain.phantoms import BrainPhantomGenerator, PhantomGeometry

    generator = BrainPhantomGenerator(PhantomGeometry.demo(num_slices=5), seed=0)
    entries, images = [], {}
    for index in range(4):
        subject = generator.subject(index)
        for s, facts in enumerate(subject.slice_facts):
            key = f"{subject.subject_id}_{s}"
            images[key] = subject.t1[s]
            entries.append({"image": key, "ventricle_volume_ml": subject.facts["ventricle_volume_ml"], **facts})
    return entries, images


def test_measured_csf_fraction_follows_the_phantom_facts(phantom_slices):
    entries, images = phantom_slices
    loaded = []
    ceiling = measurement_ceiling(entries, lambda e: loaded.append(e["image"]) or images[e["image"]])
    assert loaded == [e["image"] for e in entries]
    # Calibration (module docstring): r = 0.987, MAE 0.003 on 500 slices; any 4 subjects gave r >= 0.975.
    csf = ceiling["csf_fraction"]
    assert csf["pearson_r"] > 0.9 and csf["mae"] < 0.01 and csf["num_pairs"] == 20
    assert ceiling["gm_fraction"]["num_pairs"] == ceiling["wm_fraction"]["num_pairs"] == 20
    vent = ceiling["ventricle"]
    assert vent["requested"] == "ventricle_volume_ml" and vent["num_pairs"] == 20
    assert vent["pearson_r"] > 0.6 and vent["mae_ml"] < 15.0  # r = 0.89, MAE 4 ml on 500 slices


# ---------------------------------------------------------------------------------------------------------------
# adherence_scores


def measures(csf, gm=None, wm=None, area=None, volume=None) -> list[SliceMeasures]:
    n = len(csf)
    gm = gm if gm is not None else [0.4] * n
    wm = wm if wm is not None else [1 - c - g for c, g in zip(csf, gm, strict=True)]
    area = area if area is not None else [100.0] * n
    volume = volume if volume is not None else [30.0] * n
    return [
        SliceMeasures(c, g, w, a, 5000.0, v, c, g, w, (0.05, 0.5, 0.9))
        for c, g, w, a, v in zip(csf, gm, wm, area, volume, strict=True)
    ]


def test_adherence_scores_on_hand_made_pairs():
    requested = [
        {"csf_fraction": 0.10, "gm_fraction": 0.40, "wm_fraction": 0.50, "ventricle_volume_ml": 20.0},
        {"csf_fraction": 0.15, "gm_fraction": 0.45, "wm_fraction": 0.40, "ventricle_volume_ml": 30.0},
        {"csf_fraction": 0.20, "gm_fraction": 0.42, "wm_fraction": 0.38, "ventricle_volume_ml": 45.0},
        {"csf_fraction": 0.25, "gm_fraction": 0.39, "wm_fraction": 0.36, "ventricle_volume_ml": 60.0},
    ]
    got_csf = [0.12, 0.14, 0.22, 0.24]
    got_gm = [0.41, 0.44, 0.40, 0.40]
    measured = measures(got_csf, got_gm, area=[500.0, 900.0, 800.0, 1500.0], volume=[20.0, 26.0, 40.0, 70.0])
    scores = adherence_scores(requested, measured)
    want_csf = [r["csf_fraction"] for r in requested]
    assert scores["csf_fraction"]["pearson_r"] == pytest.approx(stats.pearsonr(want_csf, got_csf).statistic)
    assert scores["csf_fraction"]["mae"] == pytest.approx((0.02 + 0.01 + 0.02 + 0.01) / 4)
    assert scores["csf_fraction"]["num_pairs"] == 4
    assert scores["gm_fraction"]["mae"] == pytest.approx((0.01 + 0.01 + 0.02 + 0.01) / 4)
    vent = scores["ventricle"]
    assert vent["requested"] == "ventricle_volume_ml" and vent["num_pairs"] == 4
    assert vent["pearson_r"] == pytest.approx(stats.pearsonr([20, 30, 45, 60], [500, 900, 800, 1500]).statistic)
    assert vent["spearman_r"] == pytest.approx(0.8)
    assert vent["mae_ml"] == pytest.approx((0 + 4 + 5 + 10) / 4)
    # words of the requests: small, medium, large, large; of the estimates: small, medium, large, large
    assert vent["size_word_accuracy"] == 1.0


def test_adherence_with_size_words_caption_facts_and_missing_values():
    requested = [
        CaptionFacts(csf=0.1, grey_matter=0.5, ventricle_size="small"),
        {"csf": 0.2, "grey_matter": 0.45, "ventricle_size": "medium"},
        {"csf_fraction": 0.3, "ventricle_size": "large"},
        {"csf_fraction": None},  # nothing requested
    ]
    measured = measures([0.1, 0.25, 0.3, 0.2], area=[300.0, 200.0, 900.0, 50.0], volume=[20.0, 20.0, 50.0, 20.0])
    with pytest.warns(UserWarning, match="gm_fraction is undefined .measured values are constant"):
        scores = adherence_scores(requested, measured)  # 2 pairs, but every measured GM fraction is 0.4
    assert scores["csf_fraction"]["num_pairs"] == 3
    assert scores["csf_fraction"]["mae"] == pytest.approx(0.05 / 3)
    assert scores["gm_fraction"]["num_pairs"] == 2
    assert scores["wm_fraction"]["num_pairs"] == 0 and scores["wm_fraction"]["mae"] is None
    vent = scores["ventricle"]
    assert vent["requested"] == "ventricle_size" and vent["num_pairs"] == 3
    assert vent["pearson_r"] is None and vent["mae_ml"] is None
    assert vent["spearman_r"] == pytest.approx(0.5)  # ranks (0, 1, 2) against areas ranked (2, 1, 3)
    assert vent["size_word_accuracy"] == pytest.approx(2 / 3)


def test_adherence_is_none_on_constant_input_and_skips_nan_measures():
    requested = [{"csf_fraction": 0.15, "gm_fraction": g} for g in (0.3, 0.4, 0.5)]
    measured = measures([0.1, 0.2, math.nan], gm=[0.35, 0.4, 0.45], wm=[0.5, 0.4, 0.4])
    with pytest.warns(UserWarning, match="csf_fraction is undefined .requested values are constant"):
        scores = adherence_scores(requested, measured)
    assert scores["csf_fraction"]["pearson_r"] is None
    assert scores["csf_fraction"]["num_pairs"] == 2 and scores["csf_fraction"]["mae"] == pytest.approx(0.05)
    assert scores["gm_fraction"]["pearson_r"] == pytest.approx(1.0) and scores["gm_fraction"]["num_pairs"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = adherence_scores(requested[:1], measured[:1])
    assert one["csf_fraction"]["pearson_r"] is None and one["ventricle"]["num_pairs"] == 0


def test_adherence_validation():
    with pytest.raises(ValueError, match="2 requested facts but 1"):
        adherence_scores([{}, {}], measures([0.1]))
    with pytest.raises(TypeError, match="SliceMeasures"):
        adherence_scores([{}], [{"csf_fraction": 0.1}])
    with pytest.raises(ValueError, match="ventricle_size"):
        adherence_scores([{"ventricle_size": "huge"}], measures([0.1]))
    with pytest.raises(ValueError, match="at least one"):
        measurement_ceiling([], lambda e: e)
