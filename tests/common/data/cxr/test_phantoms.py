"""common.data.cxr.phantoms: procedural chest radiographs whose findings are known facts of each image."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from common.data.cxr.datalist import CHEXPERT_LABELS, ENTRY_KEYS, LABEL_VALUES, SPLITS
from common.data.cxr.phantoms import (
    CTR_BORDERLINE_RANGE,
    CTR_ENLARGED_RANGE,
    CTR_NORMAL_RANGE,
    FINDINGS,
    LOBES,
    CentralLine,
    Consolidation,
    CXRPhantomGenerator,
    Devices,
    Effusion,
    EndotrachealTube,
    FindingPrevalence,
    Nodule,
    Pacemaker,
    Pneumothorax,
    patient_id,
    resolve_size,
    study_id,
    write_cxr_phantom_dataset,
)

SIZE = 128
NO_FINDINGS = {
    "pleural_effusion": None,
    "pneumothorax": None,
    "consolidation": None,
    "nodule": None,
    "devices": Devices(),
}


@pytest.fixture(scope="module")
def generator() -> CXRPhantomGenerator:
    return CXRPhantomGenerator("demo", seed=0)


@pytest.fixture(scope="module")
def normal(generator):
    """Parameters of a study without findings (CTR 0.44), upright (no rotation)."""
    params = generator.parameters(3, 0).with_findings(ctr=0.44, **NO_FINDINGS)
    return dataclasses.replace(params, acquisition=dataclasses.replace(params.acquisition, rotation_deg=0.0))


@pytest.fixture(scope="module")
def normal_image(generator, normal):
    return generator.render(normal)


def _widest(mask: np.ndarray) -> int:
    """Largest horizontal extent (pixels, first to last column) of a mask over its rows."""
    rows = [np.flatnonzero(row) for row in mask]
    return max((cols[-1] - cols[0] + 1 for cols in rows if cols.size), default=0)


def _extent(mask: np.ndarray) -> int:
    """Horizontal extent (pixels) of a mask over all rows: the CTR's heart width (its widest points on the right
    and on the left lie at different heights)."""
    columns = np.flatnonzero(mask.any(axis=0))
    return columns[-1] - columns[0] + 1


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)  # (row, column)


def test_sizes_and_ids():
    assert resolve_size("demo") == 128 and resolve_size("full") == 512 and resolve_size(64) == 64
    assert resolve_size("96") == 96
    for bad in ("huge", 16, True, 2.5):
        with pytest.raises(ValueError):
            resolve_size(bad)
    assert patient_id(7) == "p00007" and study_id(7, 1) == "s0000701"
    with pytest.raises(ValueError):
        study_id(1, 100)


def test_image_masks_and_facts(generator):
    phantom = generator.study(0, 0)
    assert phantom.image.shape == (SIZE, SIZE) and phantom.image.dtype == np.float32
    assert 0.0 <= phantom.image.min() and phantom.image.max() <= 1.0
    assert set(phantom.masks) == {"thorax", "lungs", "heart", *FINDINGS}
    assert all(m.shape == (SIZE, SIZE) and m.dtype == bool for m in phantom.masks.values())
    facts = phantom.facts
    assert json.loads(json.dumps(facts)) == facts  # JSON-ready
    assert set(facts["present"]) <= set(FINDINGS)
    for name in FINDINGS:
        assert (facts[name] is not None) == (name in facts["present"])
        assert phantom.masks[name].any() == (name in facts["present"]), name
    assert facts == generator.facts(phantom.parameters)  # facts without drawing
    assert 7 <= facts["anatomy"]["posterior_ribs"] <= 12
    assert facts["acquisition"]["view"] == "PA"


def test_deterministic_from_seed_and_index(generator):
    image = generator.study(2, 1).image
    again = CXRPhantomGenerator("demo", seed=0).study(2, 1)
    assert again.image.tobytes() == image.tobytes()
    assert not np.array_equal(CXRPhantomGenerator("demo", seed=1).study(2, 1).image, image)
    assert not np.array_equal(generator.study(3, 1).image, image)
    # the studies of one patient share the anatomy, not the acquisition
    first, second = generator.parameters(2, 0), generator.parameters(2, 1)
    assert first.anatomy == second.anatomy and first.acquisition != second.acquisition


def test_any_size_shows_the_same_patient():
    small = CXRPhantomGenerator(64, seed=0).study(5, 0)
    large = CXRPhantomGenerator(256, seed=0).study(5, 0)
    assert small.facts == large.facts
    shrunk = large.image.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.corrcoef(shrunk.ravel(), small.image.ravel())[0, 1] > 0.95


def test_normal_anatomy(normal_image):
    image, masks = normal_image.image, normal_image.masks
    lungs, heart = masks["lungs"], masks["heart"]
    assert 0.2 < lungs.mean() < 0.5 and heart.sum() > 200
    assert image[lungs].mean() + 0.2 < image[heart].mean()  # dark lungs, bright heart
    # the heart bulges to the patient's left, the image's right
    assert _centroid(heart)[1] > SIZE / 2 + 2
    # the right dome (image left) is higher than the left dome
    bottom = np.array([np.flatnonzero(col).max() if col.any() else -1 for col in masks["thorax"].T])
    columns = np.arange(SIZE)
    lung_columns = bottom > 0
    right_dome = bottom[lung_columns & (columns < SIZE / 2)].min()
    left_dome = bottom[lung_columns & (columns > SIZE / 2)].min()
    assert right_dome < left_dome
    # posterior ribs: bright bands crossing the lungs, so a lung column goes up and down many times
    column = image[:, int(np.argwhere(lungs)[:, 1].min()) + 8]
    band = ndi.gaussian_filter1d(column.astype(np.float64), 1.0)
    peaks = np.flatnonzero((band[1:-1] > band[:-2]) & (band[1:-1] > band[2:]))
    assert len(peaks) >= 6


@pytest.mark.parametrize("rotation", [0.0, 2.5])
def test_cardiothoracic_ratio_follows_ctr(generator, normal, rotation):
    params = dataclasses.replace(normal, acquisition=dataclasses.replace(normal.acquisition, rotation_deg=rotation))
    measured = []
    for ctr in (0.42, 0.5, 0.58, 0.65):
        masks = generator.render(params.with_findings(ctr=ctr)).masks
        measured.append(_extent(masks["heart"]) / _widest(masks["thorax"]))
        assert measured[-1] == pytest.approx(ctr, abs=0.025)
    assert np.all(np.diff(measured) > 0)


def test_cardiomegaly_enlarges_the_bright_silhouette(generator, normal, normal_image):
    big = generator.render(normal.with_findings(ctr=0.62))
    grown = big.masks["heart"] & ~normal_image.masks["heart"]
    assert grown.sum() > 100
    assert (big.image[grown] - normal_image.image[grown]).mean() > 0.15  # lung turned into heart
    assert big.facts["cardiomegaly"] == {"severity": "severe", "subtle": False}
    assert normal_image.facts["cardiomegaly"] is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_raises_the_lower_lateral_zone_of_its_side(generator, normal, normal_image, side):
    wet = generator.render(normal.with_findings(pleural_effusion=Effusion(side, "large", {side: 0.45})))
    thorax = normal_image.masks["thorax"]
    rows, cols = np.nonzero(thorax)
    top, bottom = rows.min(), rows.max()
    centre = (cols.min() + cols.max()) / 2
    half_width = (cols.max() - cols.min()) / 2
    r, c = np.mgrid[:SIZE, :SIZE]
    lower_lateral = thorax & (r > top + 0.6 * (bottom - top)) & (np.abs(c - centre) > 0.45 * half_width)
    this_side = (c < centre) if side == "right" else (c > centre)  # the patient's right is on the image's left
    change = wet.image - normal_image.image
    assert change[lower_lateral & this_side].mean() > 0.12
    assert abs(change[lower_lateral & ~this_side].mean()) < 0.01
    assert wet.masks["pleural_effusion"][this_side].sum() > 100 and not wet.masks["pleural_effusion"][~this_side].any()
    # a small effusion only blunts the costophrenic angle: low and lateral
    small = generator.render(normal.with_findings(pleural_effusion=Effusion(side, "small", {side: 0.15})))
    fluid = small.masks["pleural_effusion"]
    assert 5 < fluid.sum() < wet.masks["pleural_effusion"].sum() / 3
    assert _centroid(fluid)[0] > top + 0.75 * (bottom - top)
    assert (small.image - normal_image.image)[fluid].mean() > 0.1


def test_pneumothorax_is_dark_and_has_no_lung_markings(generator, normal, normal_image):
    ptx = generator.render(normal.with_findings(pneumothorax=Pneumothorax("right", "moderate", 0.25)))
    space = ptx.masks["pneumothorax"]
    assert space.sum() > 150
    assert _centroid(space)[1] < SIZE / 2  # right side: image left
    assert normal_image.markings[space].mean() > 0.02  # the normal lung has markings there ...
    core = ndi.binary_erosion(space)  # away from the anti-aliased edge
    assert core.sum() > 100 and ptx.markings[core].max() < 1e-3  # ... the pneumothorax none
    assert (normal_image.image - ptx.image)[space].mean() > 0.03  # and it is darker
    # the vessels that the normal image shows there are gone from the image with the pneumothorax
    vessels = normal_image.markings[core]
    assert np.corrcoef(normal_image.image[core], vessels)[0, 1] > 0.25
    assert abs(np.corrcoef(ptx.image[core], vessels)[0, 1]) < 0.15
    # the visceral pleural line: the lung edge just medial to the space is brighter than the space
    edge = ndi.binary_dilation(space, iterations=1) & ~space & ptx.masks["lungs"]
    assert ptx.image[edge].mean() > ptx.image[space].mean() + 0.08
    assert not ptx.masks["pneumothorax"][:, SIZE // 2 + 10 :].any()  # the left lung is untouched


@pytest.mark.parametrize("lobe", LOBES)
def test_consolidation_fills_its_lobe(generator, normal, normal_image, lobe):
    sick = generator.render(normal.with_findings(consolidation=Consolidation(lobe, 1.0, 0.85, texture_seed=5)))
    region = sick.masks["consolidation"]
    assert region.sum() > 60
    assert (sick.image - normal_image.image)[region].mean() > 0.15
    row, column = _centroid(region)
    assert (column < SIZE / 2) == lobe.startswith("right")
    rows = np.nonzero(normal_image.masks["thorax"])[0]
    relative = (row - rows.min()) / (rows.max() - rows.min())
    expected = {"upper": (0.0, 0.5), "middle": (0.4, 0.8), "lower": (0.55, 1.0)}[lobe.split()[1]]
    assert expected[0] < relative < expected[1], relative


def test_nodule_is_a_small_round_opacity_in_the_lung(generator, normal, normal_image):
    params = normal.with_findings(nodule=Nodule("left", "mid", (0.55, 0.85), 20.0))
    sick = generator.render(params)
    blob = sick.masks["nodule"]
    # 20 mm over 14 cm per thorax half-width: radius in pixels
    radius = 1.0 / 14.0 * normal.anatomy.thorax_scale * SIZE
    assert blob.sum() == pytest.approx(np.pi * radius**2, rel=0.35)
    assert normal_image.masks["lungs"][blob].all()
    assert (sick.image - normal_image.image)[blob].mean() > 0.15
    assert np.abs(sick.image - normal_image.image)[~ndi.binary_dilation(blob, iterations=2)].max() < 1e-6


def test_support_devices_are_bright_lines(generator, normal, normal_image):
    devices = Devices(EndotrachealTube(4.0), CentralLine("right", "internal jugular", 0.7), Pacemaker(2))
    with_devices = generator.render(normal.with_findings(devices=devices))
    drawn = with_devices.masks["support_devices"]
    assert drawn.sum() > 100
    assert (with_devices.image - normal_image.image)[drawn].mean() > 0.15
    assert set(with_devices.facts["support_devices"]) == {"endotracheal_tube", "central_line", "pacemaker"}
    assert with_devices.facts["present"] == ["support_devices"]


def test_prevalence_and_subtlety(generator):
    odds = FindingPrevalence()
    draws = [generator.parameters(i, 0).findings for i in range(300)]
    shown = {name: np.mean([name in f.present() for f in draws]) for name in FINDINGS}
    for name in FINDINGS:
        assert shown[name] == pytest.approx(getattr(odds, name), abs=0.08), name
    normal = np.mean([not (set(f.present()) - {"support_devices"}) for f in draws])
    assert normal == pytest.approx(odds.expected_normal_fraction, abs=0.08)
    assert 0.2 < odds.expected_normal_fraction < 0.3
    ctrs = np.array([f.ctr for f in draws])
    ranges = (CTR_NORMAL_RANGE, CTR_BORDERLINE_RANGE, CTR_ENLARGED_RANGE)
    assert all(any(lo - 0.02 <= c <= hi + 0.02 for lo, hi in ranges) for c in ctrs)

    always_subtle = CXRPhantomGenerator("demo", seed=0, prevalence=FindingPrevalence(subtle=1.0, nodule=1.0))
    facts = [always_subtle.facts(always_subtle.parameters(i, 0)) for i in range(40)]
    for fact in facts:
        for name in ("cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "nodule"):
            assert fact[name] is None or fact[name]["subtle"] is True
    assert sum(f["nodule"] is not None for f in facts) > 30  # a nodule is left out only with no room for it

    none = CXRPhantomGenerator("demo", seed=0, prevalence=FindingPrevalence(**dict.fromkeys(FINDINGS, 0.0)))
    assert all(not none.parameters(i, 0).findings.present() for i in range(30))
    with pytest.raises(ValueError, match="probability"):
        FindingPrevalence(pneumothorax=1.5)
    with pytest.raises(ValueError, match="unknown prevalence"):
        FindingPrevalence.from_mapping({"fracture": 0.1})


def test_dataset_is_split_by_patient(tmp_path):
    path = write_cxr_phantom_dataset(tmp_path, num_patients=6, size=48, seed=3, studies_per_patient=2, progress=False)
    assert path == tmp_path / "datalist.json"
    data = json.loads(path.read_text())
    assert data["image_size"] == [48, 48] and data["seed"] == 3 and data["generator"] == "common.data.cxr.phantoms"
    patients = {split: {e["patient"] for e in data[split]} for split in SPLITS}
    assert all(patients.values())
    assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values())) == 6  # disjoint
    assert {split: sorted(ids) for split, ids in patients.items()} == data["patients"]
    entries = [e for split in SPLITS for e in data[split]]
    assert len(entries) == 12 and len({e["study"] for e in entries}) == 12
    for entry in entries:
        assert set(ENTRY_KEYS) <= set(entry) and {"labels", "facts"} <= set(entry)
        assert entry["sentences"] and all(s.strip() for s in entry["sentences"])
        assert " ".join(entry["sentences"]) == f"{entry['findings']} {entry['impression']}".strip()
        assert set(entry["labels"]) <= set(CHEXPERT_LABELS) and set(entry["labels"].values()) <= set(
            LABEL_VALUES.values()
        )
        with Image.open(tmp_path / entry["image"]) as png:
            assert png.mode == "L" and png.size == (48, 48)
    same = CXRPhantomGenerator(48, seed=3).study(0, 1).image
    first = next(e for e in entries if e["study"] == study_id(0, 1))
    stored = np.asarray(Image.open(tmp_path / first["image"]), dtype=np.float32) / 255
    assert np.abs(stored - same).max() <= 0.5 / 255 + 1e-6

    # rewriting with fewer patients leaves no stale images behind
    write_cxr_phantom_dataset(tmp_path, num_patients=3, size=48, seed=3, studies_per_patient=1, progress=False)
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="leave none for validation"):
        write_cxr_phantom_dataset(tmp_path / "x", num_patients=2, size=48, progress=False)
    assert not (tmp_path / "x").exists()
