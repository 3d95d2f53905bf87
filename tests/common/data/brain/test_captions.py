"""common.data.brain.captions: fact-based brain MRI captions (canonical for evaluation, random for training)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from monai.transforms import Compose
from monai.utils import set_determinism

from common.data.brain.captions import (
    CAPTION_TEMPLATES,
    OPTIONAL_ATTRIBUTES,
    CanonicalCaptiond,
    CaptionFacts,
    RandBrainCaptiond,
    canonical_caption,
    caption_attributes,
    with_caption_facts,
)
from common.data.brain.phantoms import PhantomGeometry, ventricle_size_word, write_phantom_dataset

FULL = CaptionFacts(
    contrast="T1-weighted",
    plane="axial",
    position_mm=12.0,
    region="lateral ventricles",
    age=67.2,
    sex="female",
    healthy=True,
    ventricle_size="large",
    grey_matter=0.412,
    white_matter=0.381,
    csf=0.207,
)
FULL_CAPTION = (
    "T1-weighted brain MRI, axial slice at z=+12 mm (lateral ventricles), healthy 67-year-old female; "
    "large lateral ventricles; grey matter 41%, white matter 38%, CSF 21%"
)
LIST_TEMPLATE = next(t for t in CAPTION_TEMPLATES if t.name == "list")


@pytest.fixture
def determinism():
    yield set_determinism
    set_determinism(seed=None)  # leave the global seeds as other tests expect them


@pytest.fixture(scope="module")
def phantom_entries(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_phantoms")
    geometry = PhantomGeometry.demo(num_slices=2)
    path = write_phantom_dataset(root, num_subjects=3, geometry=geometry, seed=0, progress=False)
    datalist = json.loads(path.read_text())
    return [e for split in ("training", "validation", "test") for e in datalist[split]]


# -- canonical caption ------------------------------------------------------------------------------------------


def test_canonical_caption_of_full_facts():
    assert canonical_caption(FULL) == FULL_CAPTION
    assert canonical_caption(FULL.to_dict()) == FULL_CAPTION  # a facts dict works too


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (CaptionFacts(), "T1-weighted brain MRI, axial slice"),
        (CaptionFacts(plane=None), "T1-weighted brain MRI"),
        (CaptionFacts(plane=None, region="thalamus"), "T1-weighted brain MRI, slice (thalamus)"),
        (
            CaptionFacts(contrast="FLAIR", plane="coronal", position_mm=-17.46, age_range=(26, 30)),
            "FLAIR brain MRI, coronal slice at y=-17.5 mm, 26-30-year-old subject",
        ),
        (
            CaptionFacts(plane="sagittal", position_mm=-0.01, sex="male"),
            "T1-weighted brain MRI, sagittal slice at x=+0 mm, male",
        ),
        (CaptionFacts(healthy=False), "T1-weighted brain MRI, axial slice, non-healthy subject"),
        (
            CaptionFacts(position_mm=3, ventricle_size="small", csf=0.094),
            "T1-weighted brain MRI, axial slice at z=+3 mm; small lateral ventricles; CSF 9%",
        ),
        (CaptionFacts(plane=None, white_matter=0.5), "T1-weighted brain MRI; white matter 50%"),
    ],
)
def test_canonical_caption_leaves_unknown_facts_out_cleanly(facts, expected):
    assert canonical_caption(facts) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plane": "oblique"}, "plane must be one of"),
        ({"plane": None, "position_mm": 4.0}, "needs a plane"),
        ({"position_mm": float("nan")}, "finite"),
        ({"grey_matter": 1.2}, r"in \[0, 1\]"),
        ({"csf": -0.1}, r"in \[0, 1\]"),
        ({"grey_matter": 0.6, "white_matter": 0.5}, "sum to"),
        ({"age": -1.0}, "age must be >= 0"),
        ({"age": float("inf")}, "finite"),
        ({"age": 40.0, "age_range": (36, 45)}, "not both"),
        ({"age_range": (30, 26)}, "low <= high"),
        ({"sex": "F"}, "sex must be one of"),
        ({"healthy": "yes"}, "healthy must be"),
        ({"ventricle_size": "huge"}, "ventricle_size must be"),
        ({"region": "putamen (left)"}, "region must be"),
        ({"region": " "}, "region must be"),
        ({"contrast": ""}, "contrast must be"),
    ],
)
def test_invalid_facts_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptionFacts(**kwargs)


def test_from_mapping_normalises_and_ignores_evaluation_only_keys():
    facts = CaptionFacts.from_mapping(
        {"sex": "F", "age": 50, "ventricle_volume_ml": 40.0, "subject": "sub-0001", "wmh_volume_ml": 3.2}
    )
    assert (facts.sex, facts.age, facts.ventricle_size, facts.plane) == ("female", 50.0, "large", "axial")
    assert CaptionFacts.from_mapping({"healthy": np.bool_(True)}).healthy is True
    as_json = json.loads(json.dumps(FULL.to_dict()))
    assert CaptionFacts.from_mapping(as_json) == FULL
    ranged = CaptionFacts(age_range=(26, 30))
    assert CaptionFacts.from_mapping(json.loads(json.dumps(ranged.to_dict()))) == ranged


# -- parsing back -----------------------------------------------------------------------------------------------


def _random_facts(rng: np.random.Generator) -> CaptionFacts:
    def maybe(value):
        return value if rng.random() < 0.7 else None

    plane = maybe(str(rng.choice(["axial", "coronal", "sagittal"])))
    fractions = rng.dirichlet([4.0, 4.0, 2.0])
    age_kind = rng.integers(3)
    return CaptionFacts(
        contrast=str(rng.choice(["T1-weighted", "FLAIR"])),
        plane=plane,
        position_mm=maybe(float(rng.uniform(-80, 80))) if plane else None,
        region=maybe(str(rng.choice(["lateral ventricles", "Heschl's gyrus", "superior frontal gyrus"]))),
        age=float(rng.uniform(20, 90)) if age_kind == 1 else None,
        age_range=(26.0, 30.0) if age_kind == 2 else None,
        sex=maybe(str(rng.choice(["female", "male"]))),
        healthy=maybe(bool(rng.random() < 0.5)),
        ventricle_size=maybe(str(rng.choice(["small", "medium", "large"]))),
        grey_matter=maybe(float(fractions[0])),
        white_matter=maybe(float(fractions[1])),
        csf=maybe(float(fractions[2])),
    )


def test_canonical_caption_round_trips_through_caption_attributes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        facts = _random_facts(rng)
        caption = canonical_caption(facts)
        parsed = CaptionFacts.from_mapping(caption_attributes(caption))
        assert canonical_caption(parsed) == caption
        for field in dataclasses.fields(CaptionFacts):
            want, got = getattr(facts, field.name), getattr(parsed, field.name)
            if want is None or isinstance(want, str | bool | tuple):
                assert got == want, (field.name, caption)
            else:  # rounded in the caption: 0.1 mm, whole years, whole percent
                tolerance = {"position_mm": 0.05, "age": 0.5}.get(field.name, 0.005)
                assert abs(got - want) <= tolerance + 1e-9, (field.name, caption)


def test_caption_attributes_of_the_example_and_bad_text():
    assert caption_attributes(FULL_CAPTION) == {
        "contrast": "T1-weighted",
        "plane": "axial",
        "position_mm": 12.0,
        "region": "lateral ventricles",
        "age": 67.0,
        "age_range": None,
        "sex": "female",
        "healthy": True,
        "ventricle_size": "large",
        "grey_matter": 0.41,
        "white_matter": 0.38,
        "csf": 0.21,
    }
    with pytest.raises(ValueError, match="not a canonical"):
        caption_attributes("T1-weighted image of a brain of a 72 year old subject with large ventricles.")
    with pytest.raises(ValueError, match="does not match plane"):
        caption_attributes("T1-weighted brain MRI, axial slice at y=+3 mm")


# -- training captions ------------------------------------------------------------------------------------------


def test_templates_render_every_fact_without_dropout():
    assert len({t.name for t in CAPTION_TEMPLATES}) == len(CAPTION_TEMPLATES) >= 4
    for template in CAPTION_TEMPLATES:
        text = template.render(FULL)
        for needle in ("T1-weighted", "axial", "12 mm", "lateral ventricles", "67", "large", "41"):
            assert needle.lower() in text.lower(), (template.name, needle, text)
        assert text == text.strip() and "  " not in text
    with pytest.raises(ValueError, match="bad format field"):
        dataclasses.replace(LIST_TEMPLATE, name="typo", age="{years}-year-old")


def test_transform_is_reproducible_under_set_determinism(determinism):
    def draws(seed: int) -> list[str]:
        determinism(seed=seed)
        pipeline = Compose([RandBrainCaptiond(keys="facts", caption_key="caption")])
        return [pipeline({"facts": FULL.to_dict()})["caption"] for _ in range(50)]

    first = draws(0)
    assert first == draws(0)
    assert first != draws(1)
    a, b = RandBrainCaptiond(), RandBrainCaptiond()
    a.set_random_state(seed=5)
    b.set_random_state(seed=5)
    assert [a.caption(FULL) for _ in range(20)] == [b.caption(FULL) for _ in range(20)]


def test_transform_keeps_the_facts_and_checks_its_arguments():
    entry = {"image": "x.nii.gz", "facts": FULL.to_dict()}
    out = RandBrainCaptiond(caption_key="prompt")(entry)
    assert out["facts"] == FULL.to_dict() and out["prompt"] and "caption" not in out
    with pytest.raises(ValueError, match="drop_prob"):
        RandBrainCaptiond(drop_prob=1.5)
    with pytest.raises(ValueError, match="templates"):
        RandBrainCaptiond(templates=[])
    with pytest.raises(ValueError, match="sex must be"):
        RandBrainCaptiond()({"facts": {"sex": "unknown"}})


def test_captions_vary_and_every_attribute_is_sometimes_dropped():
    transform = RandBrainCaptiond(drop_prob=0.3)
    transform.set_random_state(seed=0)
    captions = [transform.caption(FULL) for _ in range(500)]
    assert len(set(captions)) > 400
    heads = {t.name: t.head.format(contrast="T1-weighted") for t in CAPTION_TEMPLATES}
    for name, head in heads.items():  # every template is used (heads are unique prefixes)
        assert any(c.lower().startswith(head.lower()) for c in captions), name

    # One template, so that each attribute has one marker; kept about 70% of the time each.
    single = RandBrainCaptiond(drop_prob=0.3, templates=[LIST_TEMPLATE])
    single.set_random_state(seed=1)
    captions = [single.caption(FULL) for _ in range(500)]
    markers = {
        "plane": "axial",
        "position_mm": "z=+12 mm",
        "region": "(lateral ventricles)",
        "age": "67-year-old",
        "sex": "female",
        "healthy": "healthy",
        "ventricle_size": "large lateral ventricles",
        "grey_matter": "grey matter 41%",
        "white_matter": "white matter 38%",
        "csf": "CSF 21%",
    }
    assert set(markers) == set(OPTIONAL_ATTRIBUTES)
    for attribute, marker in markers.items():
        share = np.mean([marker in c for c in captions])
        assert 0.6 < share < 0.8, (attribute, share)


def test_dropout_never_empties_a_caption():
    everything_dropped = RandBrainCaptiond(drop_prob=1.0, shuffle=True)
    everything_dropped.set_random_state(seed=0)
    heads = {t.head.format(contrast="FLAIR") + t.end for t in CAPTION_TEMPLATES}
    facts = dataclasses.replace(FULL, contrast="FLAIR")
    assert {everything_dropped.caption(facts) for _ in range(200)} == heads
    heavy = RandBrainCaptiond(drop_prob=0.9)
    heavy.set_random_state(seed=0)
    assert all("FLAIR" in heavy.caption(facts) for _ in range(200))


def test_shuffle_changes_clause_order_only():
    clauses = LIST_TEMPLATE.clauses(FULL)
    head = LIST_TEMPLATE.head.format(contrast="T1-weighted") + ", "
    shuffled = RandBrainCaptiond(drop_prob=0.0, shuffle=True, templates=[LIST_TEMPLATE])
    shuffled.set_random_state(seed=0)
    captions = [shuffled.caption(FULL) for _ in range(50)]
    assert len(set(captions)) > 40
    for caption in captions:  # no comma inside a list-template clause here, so splitting recovers them
        assert caption.startswith(head)
        assert sorted(caption[len(head) :].split(", ")) == sorted(clauses)
    fixed = RandBrainCaptiond(drop_prob=0.0, shuffle=False, templates=[LIST_TEMPLATE])
    assert {fixed.caption(FULL) for _ in range(20)} == {LIST_TEMPLATE.render(FULL)}


# -- phantoms ---------------------------------------------------------------------------------------------------


def test_phantom_entries_give_valid_facts_and_captions(phantom_entries):
    transform = RandBrainCaptiond()
    transform.set_random_state(seed=0)
    for entry in phantom_entries:
        facts = CaptionFacts.from_phantom_entry(entry)
        assert (facts.plane, facts.position_mm, facts.age) == ("axial", entry["slice_z_mm"], entry["age"])
        assert facts.ventricle_size == ventricle_size_word(entry["ventricle_volume_ml"])
        assert facts.sex is None and facts.healthy is None and facts.region is None
        assert abs(facts.grey_matter + facts.white_matter + facts.csf - 1.0) < 1e-3
        caption = canonical_caption(facts)
        assert caption.startswith(f"T1-weighted brain MRI, axial slice at z=+{entry['slice_z_mm']:.0f} mm, ")
        assert (
            f"{round(entry['age'])}-year-old subject; {facts.ventricle_size} lateral ventricles; grey matter "
            in caption
        )
        assert CaptionFacts.from_mapping(caption_attributes(caption)).ventricle_size == facts.ventricle_size
        out = transform({**entry, "facts": facts.to_dict()})
        assert out["caption"] and out["facts"] == facts.to_dict()
    flair = CaptionFacts.from_phantom_entry(phantom_entries[0], region="thalamus", contrast="FLAIR")
    assert canonical_caption(flair).startswith("FLAIR brain MRI, axial slice at z=+14 mm (thalamus), ")
    with pytest.raises(KeyError, match="slice_z_mm"):
        CaptionFacts.from_phantom_entry({"age": 60.0})


def test_datalists_get_facts_from_phantom_fields_or_keep_their_own(phantom_entries):
    """Phantom entries get facts from their fields, cohort entries keep theirs; the canonical caption is theirs."""
    cohort_entry = {
        "image": "images/sub-1.nii.gz",
        "facts": {"plane": "coronal", "position_mm": -17.5, "age": 30, "sex": "F"},
    }
    entries = with_caption_facts([*phantom_entries[:2], cohort_entry], contrast="T1-weighted")
    assert entries[0]["facts"] == CaptionFacts.from_phantom_entry(phantom_entries[0]).to_dict()
    assert entries[0]["image"] == phantom_entries[0]["image"] and "facts" not in phantom_entries[0], "input untouched"
    assert entries[2]["facts"]["sex"] == "female" and entries[2]["facts"]["plane"] == "coronal"
    captioned = [CanonicalCaptiond()(e) for e in entries]
    assert [c["caption"] for c in captioned] == [canonical_caption(e["facts"]) for e in entries]
    assert captioned[2]["caption"] == "T1-weighted brain MRI, coronal slice at y=-17.5 mm, 30-year-old female"
    with pytest.raises(ValueError, match="images/bad.nii.gz has no usable caption facts.*slice_z_mm"):
        with_caption_facts([{"image": "images/bad.nii.gz", "age": 50}])
    with pytest.raises(ValueError, match="entry 0 has no usable caption facts.*tissue fractions"):
        with_caption_facts([{"facts": {"grey_matter": 0.7, "white_matter": 0.7}}])
