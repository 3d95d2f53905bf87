"""Captions of brain MRI slices built from facts: one canonical phrasing for evaluation, random ones for training.

A slice is described by :class:`CaptionFacts` (contrast, slice plane and MNI position, anatomical region, age or
age range, sex, health, ventricle size word, grey-matter / white-matter / CSF fractions); any fact but the
contrast may be unknown (``None``) and is then left out of every caption. Datalists keep the facts beside the
caption (:meth:`CaptionFacts.to_dict`, a JSON-friendly dict) so that an evaluation can check what a generated
image should show.

*Evaluation* uses the single template of :func:`canonical_caption`, which :func:`caption_attributes` parses back::

    {contrast} brain MRI, {plane} slice at {x|y|z}={+-position} mm ({region}),
    {healthy|non-healthy} {age}-year-old {female|male|subject}; {size} lateral ventricles;
    grey matter {gm}%, white matter {wm}%, CSF {csf}%

(one line; e.g. ``"T1-weighted brain MRI, axial slice at z=+12 mm (lateral ventricles), healthy 67-year-old
female; large lateral ventricles; grey matter 41%, white matter 38%, CSF 21%"``). An age range reads
``26-30-year-old``; unknown facts are left out with their separators.

*Training* uses :class:`RandBrainCaptiond`: one of several phrasings (:data:`CAPTION_TEMPLATES`), each optional
attribute dropped with some probability and the attribute clauses shuffled, so the text encoder sees varied,
partial descriptions of the same facts (and learns that any subset of them may be asked for).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from common.data.brain.phantoms import ventricle_size_word

__all__ = [
    "CAPTION_TEMPLATES",
    "OPTIONAL_ATTRIBUTES",
    "PLANE_AXIS",
    "CaptionFacts",
    "CaptionTemplate",
    "CanonicalCaptiond",
    "RandBrainCaptiond",
    "canonical_caption",
    "caption_attributes",
    "with_caption_facts",
]

#: MNI axis across which each plane is cut; a slice's position is its coordinate along that axis.
PLANE_AXIS = {"sagittal": "x", "coronal": "y", "axial": "z"}
_SEXES = ("female", "male")
_VENTRICLE_SIZES = ("small", "medium", "large")
_FRACTIONS = ("grey_matter", "white_matter", "csf")
#: Largest accepted sum of the tissue fractions (their rounding can push it a little above 1).
_FRACTION_SUM_MAX = 1.01
#: Attributes that a training caption may drop (``"age"`` stands for the age or the age range); never the contrast.
OPTIONAL_ATTRIBUTES = (
    "plane",
    "position_mm",
    "region",
    "age",
    "sex",
    "healthy",
    "ventricle_size",
    "grey_matter",
    "white_matter",
    "csf",
)


def _number(value: float) -> str:
    """``12.0 -> "12"``, ``12.25 -> "12.2"`` (0.1 resolution, no trailing ``.0``)."""
    value = round(float(value), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{value:.0f}" if value.is_integer() else f"{value:.1f}"


def _signed(value: float) -> str:
    """``12 -> "+12"``, ``-3.5 -> "-3.5"``, ``0 -> "+0"``."""
    text = _number(value)
    return text if text.startswith("-") else "+" + text


def _percent(fraction: float) -> int:
    return int(round(100.0 * fraction))


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption may say about one slice; ``None`` means unknown (left out of captions).

    Attributes:
        contrast: leading phrase, always in the caption (``"T1-weighted"``, ``"FLAIR"``).
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        position_mm: the slice's MNI coordinate (mm) along its plane's axis (z / y / x); needs ``plane``.
        region: anatomical structure at the slice (e.g. ``"lateral ventricles"``, or
            :func:`common.data.brain.atlas.dominant_region`); no parentheses or semicolons.
        age: years. age_range: ``(low, high)`` years, for data that only give a range (HCP: ``(26, 30)``);
            at most one of the two.
        sex: ``"female"`` or ``"male"``.
        healthy: ``True`` for a healthy control, ``False`` for a subject with a diagnosis.
        ventricle_size: ``"small"``, ``"medium"`` or ``"large"`` (see
            :func:`common.data.brain.phantoms.ventricle_size_word` for the thresholds).
        grey_matter, white_matter, csf: tissue fractions in [0, 1] of the slice's intracranial area (the
            phantoms' definition: partial volumes summed over the slice, over the intracranial partial volume).
    """

    contrast: str = "T1-weighted"
    plane: str | None = "axial"
    position_mm: float | None = None
    region: str | None = None
    age: float | None = None
    age_range: tuple[float, float] | None = None
    sex: str | None = None
    healthy: bool | None = None
    ventricle_size: str | None = None
    grey_matter: float | None = None
    white_matter: float | None = None
    csf: float | None = None

    def __post_init__(self) -> None:
        def number(name: str) -> None:  # store floats (JSON ints, numpy scalars), reject NaN / inf
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not math.isfinite(float(value)):
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, float(value))

        if not isinstance(self.contrast, str) or not self.contrast.strip():
            raise ValueError(f"contrast must be a non-empty string, got {self.contrast!r}")
        if self.plane is not None and self.plane not in PLANE_AXIS:
            raise ValueError(f"plane must be one of {tuple(PLANE_AXIS)} or None, got {self.plane!r}")
        for name in ("position_mm", "age", *_FRACTIONS):
            number(name)
        if self.position_mm is not None and self.plane is None:
            raise ValueError("position_mm needs a plane (it is the coordinate along the plane's axis)")
        if self.region is not None and (not self.region.strip() or any(c in self.region for c in "();")):
            raise ValueError(f"region must be a non-empty name without '(', ')' or ';', got {self.region!r}")
        if self.age is not None and self.age < 0:
            raise ValueError(f"age must be >= 0 years, got {self.age}")
        if self.age_range is not None:
            if self.age is not None:
                raise ValueError("give age or age_range, not both")
            low, high = (float(v) for v in self.age_range)
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
                raise ValueError(f"age_range must be (low, high) with 0 <= low <= high, got {self.age_range!r}")
            object.__setattr__(self, "age_range", (low, high))
        if self.sex is not None and self.sex not in _SEXES:
            raise ValueError(f"sex must be one of {_SEXES} or None, got {self.sex!r}")
        if self.healthy is not None and not isinstance(self.healthy, bool):
            raise ValueError(f"healthy must be True, False or None, got {self.healthy!r}")
        if self.ventricle_size is not None and self.ventricle_size not in _VENTRICLE_SIZES:
            raise ValueError(f"ventricle_size must be one of {_VENTRICLE_SIZES} or None, got {self.ventricle_size!r}")
        known = {name: getattr(self, name) for name in _FRACTIONS if getattr(self, name) is not None}
        for name, value in known.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction and must be in [0, 1], got {value}")
        if sum(known.values()) > _FRACTION_SUM_MAX:
            raise ValueError(f"tissue fractions sum to {sum(known.values()):.3f} > 1: {known}")

    @classmethod
    def from_mapping(cls, facts: Mapping[str, Any]) -> CaptionFacts:
        """Facts from a dict keyed by the field names (e.g. :meth:`to_dict` output, a datalist's ``facts``).

        Missing keys and ``None`` values are unknown (``plane`` defaults to ``"axial"`` only when the key is
        missing). ``sex`` may also be ``"F"`` / ``"M"`` in any case; ``ventricle_volume_ml`` gives the size word
        when ``ventricle_size`` is absent. Other keys (subject id, WMH volume, ... kept for evaluation) are
        ignored.
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in facts.items() if k in names}
        sex = values.get("sex")
        if isinstance(sex, str):
            values["sex"] = {"f": "female", "m": "male"}.get(sex.strip().lower(), sex.strip().lower())
        if isinstance(values.get("healthy"), np.bool_):
            values["healthy"] = bool(values["healthy"])
        if values.get("ventricle_size") is None and facts.get("ventricle_volume_ml") is not None:
            values["ventricle_size"] = ventricle_size_word(float(facts["ventricle_volume_ml"]))
        if values.get("age_range") is not None:
            values["age_range"] = tuple(values["age_range"])
        return cls(**values)

    @classmethod
    def from_phantom_entry(
        cls, entry: Mapping[str, Any], region: str | None = None, contrast: str = "T1-weighted"
    ) -> CaptionFacts:
        """Facts of one entry of a phantom ``datalist.json`` (:func:`~common.data.brain.phantoms.write_phantom_dataset`).

        Reads ``slice_z_mm`` (axial position), ``age``, ``ventricle_volume_ml`` (-> size word with the phantoms'
        thresholds) and ``gm_fraction`` / ``wm_fraction`` (WMH included) / ``csf_fraction``, which the phantoms
        already store as fractions of the slice's intracranial partial volume. Phantoms have no sex and no
        diagnosis (their atrophy and WMH follow age alone), so ``sex`` and ``healthy`` stay unknown; ``region``
        is the caller's (e.g. :func:`common.data.brain.atlas.dominant_region`), ``contrast`` names the image
        the caption goes with (``"FLAIR"`` for the entry's ``flair``).
        """
        needed = ("slice_z_mm", "age", "ventricle_volume_ml", "gm_fraction", "wm_fraction", "csf_fraction")
        if missing := [key for key in needed if key not in entry]:
            raise KeyError(f"phantom datalist entry lacks {missing}; it has {sorted(entry)}")
        return cls(
            contrast=contrast,
            plane="axial",
            position_mm=entry["slice_z_mm"],
            region=region,
            age=entry["age"],
            ventricle_size=ventricle_size_word(float(entry["ventricle_volume_ml"])),
            grey_matter=entry["gm_fraction"],
            white_matter=entry["wm_fraction"],
            csf=entry["csf_fraction"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (``age_range`` as a list); :meth:`from_mapping` reads it back."""
        data = asdict(self)
        if self.age_range is not None:
            data["age_range"] = list(self.age_range)
        return data

    def known(self, attribute: str) -> bool:
        """Whether an :data:`OPTIONAL_ATTRIBUTES` entry is known (``"age"``: the age or the age range)."""
        if attribute == "age":
            return self.age is not None or self.age_range is not None
        return getattr(self, attribute) is not None


def _as_facts(facts: CaptionFacts | Mapping[str, Any]) -> CaptionFacts:
    return facts if isinstance(facts, CaptionFacts) else CaptionFacts.from_mapping(facts)


# ---------------------------------------------------------------------------------------------------------------
# Canonical caption (evaluation)


def canonical_caption(facts: CaptionFacts | Mapping[str, Any]) -> str:
    """The evaluation caption of ``facts`` (layout in the module docstring); deterministic.

    Numbers: position to 0.1 mm with its sign (``z=+12 mm``, ``y=-17.5 mm``), age in whole years
    (``67-year-old``; an age range ``26-30-year-old``), fractions as whole percentages.
    """
    f = _as_facts(facts)
    caption = f"{f.contrast} brain MRI"
    slice_parts = [f"{f.plane} slice"] if f.plane is not None else []
    if f.position_mm is not None:
        slice_parts.append(f"at {PLANE_AXIS[f.plane]}={_signed(f.position_mm)} mm")
    if f.region is not None:
        slice_parts.append(f"({f.region})")
        if f.plane is None:
            slice_parts.insert(0, "slice")
    if slice_parts:
        caption += ", " + " ".join(slice_parts)
    subject = []
    if f.healthy is not None:
        subject.append("healthy" if f.healthy else "non-healthy")
    if f.age is not None:
        subject.append(f"{int(round(f.age))}-year-old")  # rounded like phantoms.build_caption
    elif f.age_range is not None:
        subject.append(f"{_number(f.age_range[0])}-{_number(f.age_range[1])}-year-old")
    if subject or f.sex is not None:
        caption += ", " + " ".join([*subject, f.sex or "subject"])
    if f.ventricle_size is not None:
        caption += f"; {f.ventricle_size} lateral ventricles"
    tissue = [
        f"{label} {_percent(value)}%"
        for label, value in (("grey matter", f.grey_matter), ("white matter", f.white_matter), ("CSF", f.csf))
        if value is not None
    ]
    if tissue:
        caption += "; " + ", ".join(tissue)
    return caption


_NUM = r"\d+(?:\.\d)?"
_CANONICAL_RE = re.compile(
    r"(?P<contrast>.+?) brain MRI"
    rf"(?:, (?:(?P<plane>{'|'.join(PLANE_AXIS)}) )?slice"
    rf"(?: at (?P<axis>[xyz])=(?P<position>[+-]{_NUM}) mm)?"
    r"(?: \((?P<region>[^();]+)\))?)?"
    r"(?:, (?:(?P<health>healthy|non-healthy) )?"
    rf"(?:(?P<age>{_NUM})(?:-(?P<age_high>{_NUM}))?-year-old )?(?P<sex>female|male|subject))?"
    r"(?:; (?P<size>small|medium|large) lateral ventricles)?"
    r"(?:; (?P<tissue>(?:grey matter|white matter|CSF) \d+%(?:, (?:white matter|CSF) \d+%)*))?"
)
_TISSUE_KEYS = {"grey matter": "grey_matter", "white matter": "white_matter", "CSF": "csf"}


def caption_attributes(caption: str) -> dict[str, Any]:
    """Parse a :func:`canonical_caption` back into its facts: a dict with every :class:`CaptionFacts` field.

    Values carry the caption's rounding (whole years, whole percentages as fractions, 0.1 mm); facts the
    caption leaves out are ``None``. ``CaptionFacts.from_mapping(caption_attributes(c))`` rebuilds the facts.
    Raises ``ValueError`` for text that is not in the canonical layout.
    """
    match = _CANONICAL_RE.fullmatch(caption.strip())
    if match is None:
        raise ValueError(f"not a canonical brain caption: {caption!r}")
    g = match.groupdict()
    plane = g["plane"]
    if g["axis"] is not None and PLANE_AXIS.get(plane) != g["axis"]:
        raise ValueError(f"slice axis {g['axis']!r} does not match plane {plane!r} in {caption!r}")
    age = age_range = None
    if g["age_high"] is not None:
        age_range = (float(g["age"]), float(g["age_high"]))
    elif g["age"] is not None:
        age = float(g["age"])
    attributes: dict[str, Any] = {
        "contrast": g["contrast"],
        "plane": plane,
        "position_mm": float(g["position"]) if g["position"] is not None else None,
        "region": g["region"],
        "age": age,
        "age_range": age_range,
        "sex": g["sex"] if g["sex"] in _SEXES else None,
        "healthy": None if g["health"] is None else g["health"] == "healthy",
        "ventricle_size": g["size"],
        **dict.fromkeys(_FRACTIONS),
    }
    for label, percent in re.findall(r"(grey matter|white matter|CSF) (\d+)%", g["tissue"] or ""):
        attributes[_TISSUE_KEYS[label]] = int(percent) / 100.0
    return attributes


# ---------------------------------------------------------------------------------------------------------------
# Training captions


@dataclass(frozen=True)
class CaptionTemplate:
    """One training phrasing: the wording of the head and of each attribute clause, and how they are joined.

    A caption is ``head + head_separator + separator.join(clauses) + end`` (only ``head + end`` without
    clauses). The clauses, in order before shuffling: the slice (plane, position, region), the subject (health,
    age, sex), the ventricles, grey matter, white matter, CSF. With ``split`` every slice and subject attribute
    is a clause of its own (keyword style); otherwise the slice attributes are joined with spaces into one
    clause (led by ``no_plane`` when the plane is dropped) and so are the subject's (``health age noun``; the
    noun is ``sex_words[2]`` when the sex is unknown or dropped). ``capitalize`` upper-cases the first letter
    of every part (sentence style).

    Format fields: ``{contrast}``, ``{plane}``, ``{axis}`` (x / y / z), ``{signed}`` (``"+12"``), ``{plain}``
    (``"12"``), ``{region}``, ``{age}`` (whole years), ``{low}`` / ``{high}`` (age range), ``{size}``,
    ``{percent}`` (whole percent) and ``{fraction}`` (float, e.g. ``{fraction:.2f}``) in the tissue clauses.
    """

    name: str
    head: str
    head_separator: str
    separator: str
    plane: str
    no_plane: str
    position: str
    region: str
    health_words: tuple[str, str]  # healthy, not healthy
    age: str
    age_range: str
    sex_words: tuple[str, str, str]  # female, male, sex unknown or dropped
    ventricles: str
    grey_matter: str
    white_matter: str
    csf: str
    split: bool = False
    capitalize: bool = False
    end: str = ""

    def __post_init__(self) -> None:
        try:  # a misspelt format field fails here, not in a data-loader worker
            for facts in (_EXAMPLE_FACTS, _EXAMPLE_RANGE_FACTS):
                self.render(facts)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"caption template {self.name!r} has a bad format field: {err!r}") from err

    def clauses(self, facts: CaptionFacts, keep: Collection[str] | None = None) -> list[str]:
        """The attribute clauses of ``facts`` in canonical order; ``keep`` limits them to those attributes."""
        kept = {a for a in OPTIONAL_ATTRIBUTES if facts.known(a) and (keep is None or a in keep)}
        f = facts
        slice_parts = []
        if "plane" in kept:
            slice_parts.append(self.plane.format(plane=f.plane))
        if "position_mm" in kept:
            axis = PLANE_AXIS[f.plane]
            slice_parts.append(
                self.position.format(axis=axis, signed=_signed(f.position_mm), plain=_number(f.position_mm))
            )
        if "region" in kept:
            slice_parts.append(self.region.format(region=f.region))
        subject = []
        if "healthy" in kept:
            subject.append(self.health_words[0 if f.healthy else 1])
        if "age" in kept:
            if f.age is not None:
                subject.append(self.age.format(age=int(round(f.age))))
            else:
                subject.append(self.age_range.format(low=_number(f.age_range[0]), high=_number(f.age_range[1])))
        sex = self.sex_words[_SEXES.index(f.sex)] if "sex" in kept else None
        if self.split:
            clauses = slice_parts + subject + ([sex] if sex else [])
        else:
            clauses = []
            if slice_parts:
                clauses.append(" ".join(slice_parts if "plane" in kept else [self.no_plane, *slice_parts]))
            if subject or sex:
                clauses.append(" ".join([*subject, sex or self.sex_words[2]]))
        if "ventricle_size" in kept:
            clauses.append(self.ventricles.format(size=f.ventricle_size))
        for name in _FRACTIONS:
            if name in kept:
                value = getattr(f, name)
                clauses.append(getattr(self, name).format(percent=_percent(value), fraction=value))
        return clauses

    def render(
        self,
        facts: CaptionFacts,
        keep: Collection[str] | None = None,
        rng: np.random.RandomState | None = None,
    ) -> str:
        """The caption of ``facts`` with the attributes in ``keep`` (all known ones if ``None``).

        With ``rng`` the clauses are shuffled (one permutation drawn from it); the head stays first.
        """
        clauses = self.clauses(facts, keep)
        if rng is not None:
            clauses = [clauses[i] for i in rng.permutation(len(clauses))]
        parts = [self.head.format(contrast=facts.contrast), *clauses]
        if self.capitalize:
            parts = [p[:1].upper() + p[1:] for p in parts]
        text = parts[0] + (self.head_separator + self.separator.join(parts[1:]) if len(parts) > 1 else "")
        return text + self.end


_EXAMPLE_FACTS = CaptionFacts(
    plane="axial",
    position_mm=12.0,
    region="lateral ventricles",
    age=67.0,
    sex="female",
    healthy=True,
    ventricle_size="large",
    grey_matter=0.41,
    white_matter=0.38,
    csf=0.21,
)
_EXAMPLE_RANGE_FACTS = CaptionFacts(age_range=(26.0, 30.0), sex="male", healthy=False)

#: The training phrasings (list, prose, tags, clinical shorthand, short sentence).
CAPTION_TEMPLATES: tuple[CaptionTemplate, ...] = (
    CaptionTemplate(
        name="list",  # the canonical wording with one separator: evaluation prompts stay in distribution
        head="{contrast} brain MRI",
        head_separator=", ",
        separator=", ",
        plane="{plane} slice",
        no_plane="slice",
        position="at {axis}={signed} mm",
        region="({region})",
        health_words=("healthy", "non-healthy"),
        age="{age}-year-old",
        age_range="{low}-{high}-year-old",
        sex_words=("female", "male", "subject"),
        ventricles="{size} lateral ventricles",
        grey_matter="grey matter {percent}%",
        white_matter="white matter {percent}%",
        csf="CSF {percent}%",
    ),
    CaptionTemplate(
        name="prose",
        head="{contrast} MR image of the brain",
        head_separator=". ",
        separator=". ",
        plane="{plane} section",
        no_plane="section",
        position="at {axis} = {plain} mm",
        region="through the {region}",
        health_words=("healthy", "unhealthy"),
        age="{age} year old",
        age_range="{low} to {high} year old",
        sex_words=("woman", "man", "person"),
        ventricles="the lateral ventricles are {size}",
        grey_matter="{percent}% grey matter",
        white_matter="{percent}% white matter",
        csf="{percent}% cerebrospinal fluid",
        capitalize=True,
        end=".",
    ),
    CaptionTemplate(
        name="tags",
        head="brain MRI, {contrast}",
        head_separator=" | ",
        separator=" | ",
        plane="{plane}",
        no_plane="",
        position="{axis} {signed} mm",
        region="{region}",
        health_words=("healthy", "not healthy"),
        age="age {age}",
        age_range="age {low}-{high}",
        sex_words=("female", "male", ""),
        ventricles="ventricles {size}",
        grey_matter="GM {percent}%",
        white_matter="WM {percent}%",
        csf="CSF {percent}%",
        split=True,
    ),
    CaptionTemplate(
        name="clinical",
        head="{contrast} MRI of the head",
        head_separator=": ",
        separator=", ",
        plane="{plane} image",
        no_plane="image",
        position="at {axis} {signed} mm",
        region="at the level of the {region}",
        health_words=("healthy", "non-healthy"),
        age="{age} y/o",
        age_range="{low}-{high} y/o",
        sex_words=("female", "male", "subject"),
        ventricles="ventricular size {size}",
        grey_matter="GM fraction {fraction:.2f}",
        white_matter="WM fraction {fraction:.2f}",
        csf="CSF fraction {fraction:.2f}",
    ),
    CaptionTemplate(
        name="sentence",
        head="a {contrast} brain scan",
        head_separator=": ",
        separator="; ",
        plane="{plane} cut",
        no_plane="cut",
        position="at {axis}={plain} mm",
        region="showing the {region}",
        health_words=("healthy", "unwell"),
        age="{age}-year-old",
        age_range="{low}-{high}-year-old",
        sex_words=("woman", "man", "person"),
        ventricles="{size}-sized ventricles",
        grey_matter="grey matter {percent} percent",
        white_matter="white matter {percent} percent",
        csf="CSF {percent} percent",
    ),
)


class RandBrainCaptiond(RandomizableTransform, MapTransform):
    """A random training caption of the facts under ``keys``, written to ``data[caption_key]``.

    Each call draws a template (uniformly from ``templates``), keeps each optional attribute
    (:data:`OPTIONAL_ATTRIBUTES`, when known) with probability ``1 - drop_prob`` and, with ``shuffle``,
    permutes the attribute clauses; the contrast always leads, so a caption is never empty. The facts may be a
    :class:`CaptionFacts` or a dict (:meth:`CaptionFacts.from_mapping`, e.g. a datalist entry's ``facts``) and
    are left in the data for evaluation. Draws use the transform's own random state: ``set_random_state``, or
    ``monai.utils.set_determinism`` before building the ``Compose``, makes them reproducible.
    """

    def __init__(
        self,
        keys: KeysCollection = "facts",
        caption_key: str = "caption",
        drop_prob: float = 0.3,
        shuffle: bool = True,
        templates: Sequence[CaptionTemplate] = CAPTION_TEMPLATES,
    ) -> None:
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}.")
        templates = tuple(templates)
        if not templates or not all(isinstance(t, CaptionTemplate) for t in templates):
            raise ValueError("templates must be a non-empty sequence of CaptionTemplate")
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.caption_key = caption_key
        self.drop_prob = drop_prob
        self.shuffle = shuffle
        self.templates = templates

    def caption(self, facts: CaptionFacts | Mapping[str, Any]) -> str:
        """One random caption of ``facts``."""
        facts = _as_facts(facts)
        template = self.templates[int(self.R.randint(len(self.templates)))]
        draws = self.R.random_sample(len(OPTIONAL_ATTRIBUTES))  # one per attribute, known or not: fixed stream use
        keep = {a for a, u in zip(OPTIONAL_ATTRIBUTES, draws, strict=True) if u >= self.drop_prob}
        return template.render(facts, keep, self.R if self.shuffle else None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.caption_key] = self.caption(d[key])
        return d


class CanonicalCaptiond(MapTransform):
    """The evaluation caption (:func:`canonical_caption`) of the facts under ``keys``, in ``data[caption_key]``.

    Deterministic: validation and evaluation ask for the same caption of a slice every time.
    """

    def __init__(self, keys: KeysCollection = "facts", caption_key: str = "caption") -> None:
        super().__init__(keys)
        self.caption_key = caption_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.caption_key] = canonical_caption(d[key])
        return d


def with_caption_facts(entries: Sequence[Mapping[str, Any]], contrast: str = "T1-weighted") -> list[dict[str, Any]]:
    """Datalist entries, each with a ``facts`` dict (:meth:`CaptionFacts.to_dict`) that its captions are made of.

    Entries of prepared cohorts (``prepare-brain-cohorts``) carry ``facts`` already: they are checked and kept.
    Phantom entries (``make-brain-phantoms``) get them from their fields (:meth:`CaptionFacts.from_phantom_entry`,
    ``contrast`` naming the image). Every entry is checked here, so a bad one fails before training, named.
    """
    out = []
    for index, entry in enumerate(entries):
        try:
            if "facts" in entry:
                facts = CaptionFacts.from_mapping(entry["facts"])
            else:
                facts = CaptionFacts.from_phantom_entry(entry, contrast=contrast)
        except (KeyError, TypeError, ValueError) as err:
            name = entry.get("image", f"entry {index}")
            raise ValueError(
                f"Datalist entry {name} has no usable caption facts: {err}. Entries need a 'facts' dict "
                "(prepare-brain-cohorts) or the phantom fields (make-brain-phantoms)."
            ) from err
        out.append({**entry, "facts": facts.to_dict()})
    return out
