"""Procedural frontal (PA) chest radiographs with known findings, and the data set of them with reports.

Each study is a deterministic function of ``(seed, patient index, study index)``; an image of any square size
(``demo`` = 128, ``full`` = 512) shows the same patient, because everything is drawn in a resolution-free
patient frame (:mod:`common.data.cxr.anatomy`: units of the inner thorax half-width, about 14 cm; ``x`` to the
patient's left = the image's right; ``y`` down from the lung apices).

**Model.** The image is a sum of densities ``d`` (about 0.55 for the full body thickness of soft tissue, less
where lung air is, more where bone or metal is), then a film response that flattens dense regions,
``e = (1 - exp(-1.5 * gain * d)) / (1 - exp(-1.5 * 1.1))``, then ``image = clip(e, 0, 1) ** gamma`` plus Gaussian
noise, clipped to [0, 1] (float32, row 0 at the top, the patient's right on the image's left). Bones are drawn
weaker outside aerated lung (film processing and scatter hide them over the heart and abdomen).

- *Body*: soft tissue (neck, shoulders, chest wall, abdomen) thickest in the middle; air outside is black.
- *Lungs*: two outlines (:class:`~.anatomy.LungShape`) with rounded apices, lateral walls, diaphragmatic domes
  (the right dome higher) meeting the chest wall in acute costophrenic angles; air darkens them, most in the
  middle. The mediastinum (superior mediastinum, aortic knob, pulmonary trunk and the heart) is cut out of them.
- *Heart*: a tilted ellipse (:class:`~.anatomy.HeartShape`) on a broad base that rests on the diaphragm. Its
  horizontal extent (the sum of its greatest reaches right and left of the midline, which lie at different
  heights, as the CTR is measured) is exactly the cardiothoracic ratio (CTR) times the thorax width (between the
  inner rib margins), one third right of the midline, two thirds left. An enlarged heart grows sideways and down;
  its widest point stays above the left dome.
- *Airways and vessels*: trachea and main bronchi (dark), hila (bright), a branching vessel tree per lung (lung
  markings) that fades towards the periphery.
- *Bones*: 12 posterior ribs per side (curved bands with brighter cortices), fainter anterior ribs, clavicles,
  the spine (vertebral bodies, discs, pedicles), humeral heads. Gastric bubble under the left dome.

Patient variation: thorax size, body habitus, dome heights, heart shape, rib spacing, vessel tree (per patient);
inspiration depth (lung height, so 8-11 posterior ribs above the right dome), in-plane rotation (+-3 deg),
position, exposure gain, gamma and noise (per study).

**Findings** (drawn independently per study with :class:`FindingPrevalence`; cardiomegaly per patient):

- *cardiomegaly*: CTR 0.40-0.48 when absent; 0.55-0.65 when present; a ``subtle`` one is borderline, 0.50-0.545;
- *pleural effusion* (right, left or both): fluid fills the lung from the base up to ``height_fraction`` of the
  lung height at the chest wall, with a meniscus that rises laterally and a hazy upper edge; small (0.14-0.20,
  subtle 0.09-0.12: a blunted costophrenic angle), moderate (0.24-0.33), large (0.40-0.55, the dome is lost);
- *pneumothorax* (one side, the other one than a unilateral effusion): the lung collapses towards its medial base
  by ``fraction`` (small 0.12-0.18, subtle 0.07-0.10, moderate 0.20-0.30, large 0.32-0.45), fully in height and
  at the apex, less in width lower down, so the gap is widest apically and laterally; there the pleural space is
  darker than lung and has no lung markings, bounded by the bright visceral pleural line;
- *consolidation* (lobe: right upper / middle / lower, left upper / lower): a fluffy opacity (ellipse modulated
  by smooth noise) that removes the air of its lobe, with dark air bronchograms; a subtle one is smaller and
  fainter. The right middle lobe abuts the right heart border, the lower lobes the domes (silhouette signs);
- *nodule*: a round opacity 12-28 mm across (subtle 7-10 mm), placed inside visible aerated lung (clear of the
  mediastinum, fluid and pneumothorax; left out in the rare study where no such place is found);
- *support devices*: endotracheal tube (tip 2.5-6 cm above the carina), central venous line (right internal
  jugular or left subclavian, tip in the SVC), pacemaker (left infraclavicular generator, one or two leads).

**Facts** (``CXRPhantom.facts``, JSON-ready) are the truth of the image: ``present`` (names of
:data:`FINDINGS` shown), ``ctr``, one entry per finding name (``None`` when absent, else a dict: side, size words,
parameters, ``subtle``), ``anatomy`` and ``acquisition``. Reports (:mod:`.reports`) are written from the facts
alone. Masks of the rendered structures (``thorax``, ``lungs``, ``heart``, one per finding) come with each image.

These are demonstration data with known ground truth: plausible, not photoreal, not a model of a population.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.cxr.anatomy import (
    CM_PER_UNIT,
    Frame,
    HeartShape,
    LungShape,
    curve_band,
    ellipse_margin,
    polyline_distance,
    rounded_box_margin,
    side_sign,
    smooth_curve,
    smooth_noise,
    soft_step,
    splat_segments,
    vessel_tree,
)
from common.data.cxr.datalist import SPLITS
from common.data.splits import split_generated_subjects
from common.io.atomic import atomic_path, write_json

__all__ = [
    "CTR_BORDERLINE_RANGE",
    "CTR_ENLARGED_RANGE",
    "CTR_NORMAL_RANGE",
    "FINDINGS",
    "LOBES",
    "SIZES",
    "Acquisition",
    "CXRPhantom",
    "CXRPhantomGenerator",
    "CentralLine",
    "Consolidation",
    "Devices",
    "Effusion",
    "EndotrachealTube",
    "FindingPrevalence",
    "Findings",
    "Nodule",
    "Pacemaker",
    "PatientAnatomy",
    "Pneumothorax",
    "StudyParameters",
    "cardiomegaly_severity",
    "patient_id",
    "resolve_size",
    "study_id",
    "write_cxr_phantom_dataset",
]

#: Named image sizes (pixels per side).
SIZES: dict[str, int] = {"demo": 128, "full": 512}
MIN_SIZE = 32
MAX_STUDIES_PER_PATIENT = 99  # study ids hold two digits

#: The findings a phantom can show, in report order of importance; keys of ``facts`` and ``facts["present"]``.
FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "support_devices",
)
#: Lobes a consolidation can fill (side first).
LOBES: tuple[str, ...] = ("right upper", "right middle", "right lower", "left upper", "left lower")

CTR_NORMAL_RANGE = (0.40, 0.48)
CTR_BORDERLINE_RANGE = (0.50, 0.545)
CTR_ENLARGED_RANGE = (0.55, 0.65)
_REFERENCE_CTR = 0.45  # the heart of this CTR sits at the patient's reference height; others grow from its top

_EFFUSION_HEIGHTS = {"small": (0.14, 0.2), "moderate": (0.24, 0.33), "large": (0.4, 0.55)}
_EFFUSION_VOLUME_ODDS = {"small": 0.4, "moderate": 0.35, "large": 0.25}
_SUBTLE_EFFUSION_HEIGHT = (0.09, 0.12)
_PNEUMOTHORAX_FRACTIONS = {"small": (0.12, 0.18), "moderate": (0.20, 0.30), "large": (0.32, 0.45)}
_SUBTLE_PNEUMOTHORAX_FRACTION = (0.07, 0.10)
_NODULE_DIAMETER_MM = (12.0, 28.0)
_SUBTLE_NODULE_DIAMETER_MM = (7.0, 10.0)

# Densities of the tone model (before gain and gamma).
_AIR = 0.45  # darkening by fully aerated lung
_RIB, _ANTERIOR_RIB, _CLAVICLE, _SPINE, _HUMERUS = 0.11, 0.04, 0.15, 0.07, 0.2
_HEART, _FLUID = 0.07, 0.04  # extra density of the heart and of pleural fluid over plain soft tissue
_VESSEL, _BRONCHOGRAM = 0.11, 0.08
_NODULE, _PLEURAL_LINE = 0.3, 0.16
_LINE, _TUBE_STRIPE, _PACEMAKER = 0.45, 0.5, 0.75
_JOIN = 0.03  # smoothness (units) of the union of mediastinal shapes
_TONE = 1.5  # film response: image = (1 - exp(-_TONE * density)) / (1 - exp(-_TONE * _WHITE))
_WHITE = 1.1


def resolve_size(size: str | int) -> int:
    """Pixels per side of ``"demo"``, ``"full"`` or an integer >= 32."""
    if isinstance(size, str) and size in SIZES:
        return SIZES[size]
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"size must be one of {', '.join(SIZES)} or an integer >= {MIN_SIZE}, got {size!r}")
    try:
        value = int(size)
    except ValueError:
        raise ValueError(
            f"unknown size {size!r}: choose one of {', '.join(SIZES)} or an integer >= {MIN_SIZE}"
        ) from None
    if value < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {value}")
    return value


def patient_id(index: int) -> str:
    """Phantom patient label: ``7 -> "p00007"``."""
    return f"p{int(index):05d}"


def study_id(patient: int, study: int) -> str:
    """Phantom study label, unique over the data set: patient 7, study 1 -> ``"s0000701"``."""
    if not 0 <= int(study) <= MAX_STUDIES_PER_PATIENT:
        raise ValueError(f"study index must be in [0, {MAX_STUDIES_PER_PATIENT}], got {study}")
    return f"s{int(patient):05d}{int(study):02d}"


def cardiomegaly_severity(ctr: float) -> str | None:
    """``None`` below CTR 0.50, ``borderline`` below 0.55, then ``mild`` / ``moderate`` (from 0.58) / ``severe`` (0.62)."""
    if ctr < 0.50:
        return None
    if ctr < 0.55:
        return "borderline"
    if ctr < 0.58:
        return "mild"
    return "moderate" if ctr < 0.62 else "severe"


# ---------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class FindingPrevalence:
    """Probability that a study shows each finding (drawn independently), and that a shown finding is subtle.

    A subtle finding is smaller or fainter and its report uses uncertain wording (CheXpert label -1.0).
    The defaults give every finding enough positives in a demo set and about 25 % studies without any
    pathology (:attr:`expected_normal_fraction`; support devices do not count as pathology).
    """

    cardiomegaly: float = 0.30
    pleural_effusion: float = 0.30
    pneumothorax: float = 0.25
    consolidation: float = 0.20
    nodule: float = 0.15
    support_devices: float = 0.20
    subtle: float = 0.15

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"prevalence of {name} must be a probability in [0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, float] | None) -> FindingPrevalence:
        """Defaults overridden by ``values``; an unknown name is a ``ValueError``."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown prevalence name(s) {unknown}: choose from {sorted(known)}")
        return cls(**values)

    @property
    def expected_normal_fraction(self) -> float:
        """Expected fraction of studies with no pathology (no finding but support devices)."""
        return math.prod(1.0 - getattr(self, name) for name in FINDINGS if name != "support_devices")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PatientAnatomy:
    """What stays the same across a patient's studies (lengths in patient-frame units)."""

    thorax_scale: float  # image widths per unit (the thorax is 2 units wide)
    body_half_width: float
    soft_tissue: float  # density of the full body thickness
    right_dome_height: float
    left_base_drop: float  # left costophrenic angle below the right one
    left_dome_flattening: float  # left dome this much less high than the right
    heart_offset: float  # heart centre shift (y) from its default
    heart_aspect: float
    heart_tilt_deg: float
    rib_start: float  # y of the first posterior rib's medial end
    rib_spacing: float
    rib_curvature: float
    rib_half_thickness: float
    clavicle_y: float
    hilum_offset: float
    vessel_seed: int


@dataclass(frozen=True)
class Acquisition:
    """How one study was taken: inspiration, positioning, exposure."""

    lung_height: float  # apex to right costophrenic angle (units): deeper inspiration, taller lungs
    rotation_deg: float
    shift: tuple[float, float]  # (u, v) offset of the thorax on the image (image widths)
    apex_v: float  # image row (fraction of the height) of the lung apices before the shift
    gain: float
    gamma: float
    noise_sigma: float


@dataclass(frozen=True)
class Effusion:
    side: str  # "right", "left" or "both"
    volume: str  # "small", "moderate", "large"
    height_fraction: dict[str, float]  # per side: fluid height at the chest wall / lung height
    subtle: bool = False

    @property
    def sides(self) -> tuple[str, ...]:
        return ("right", "left") if self.side == "both" else (self.side,)


@dataclass(frozen=True)
class Pneumothorax:
    side: str
    size: str  # "small", "moderate", "large"
    fraction: float  # the lung collapses by this fraction towards its medial base
    subtle: bool = False


@dataclass(frozen=True)
class Consolidation:
    lobe: str  # one of LOBES
    extent: float  # radius scale of the opacity (1 = a lobe-sized region)
    density: float  # fraction of the lobe's air replaced at the core
    texture_seed: int
    subtle: bool = False

    @property
    def side(self) -> str:
        return self.lobe.split()[0]


@dataclass(frozen=True)
class Nodule:
    side: str
    zone: str  # "upper", "mid", "lower" lung zone
    centre: tuple[float, float]  # (x, y) units
    diameter_mm: float
    subtle: bool = False


@dataclass(frozen=True)
class EndotrachealTube:
    tip_above_carina_cm: float


@dataclass(frozen=True)
class CentralLine:
    side: str  # side of the venous access
    vein: str  # "internal jugular" or "subclavian"
    tip_y: float  # units; in the superior vena cava


@dataclass(frozen=True)
class Pacemaker:
    leads: int  # 1 (right ventricle) or 2 (right atrium and ventricle)


@dataclass(frozen=True)
class Devices:
    endotracheal_tube: EndotrachealTube | None = None
    central_line: CentralLine | None = None
    pacemaker: Pacemaker | None = None

    @property
    def any(self) -> bool:
        return any(d is not None for d in (self.endotracheal_tube, self.central_line, self.pacemaker))


@dataclass(frozen=True)
class Findings:
    """The findings of one study; ``None`` means absent. ``ctr`` is always set."""

    ctr: float
    pleural_effusion: Effusion | None = None
    pneumothorax: Pneumothorax | None = None
    consolidation: Consolidation | None = None
    nodule: Nodule | None = None
    devices: Devices = field(default_factory=Devices)

    def present(self) -> tuple[str, ...]:
        """Names of :data:`FINDINGS` this study shows."""
        shown = {
            "cardiomegaly": cardiomegaly_severity(self.ctr) is not None,
            "pleural_effusion": self.pleural_effusion is not None,
            "pneumothorax": self.pneumothorax is not None,
            "consolidation": self.consolidation is not None,
            "nodule": self.nodule is not None,
            "support_devices": self.devices.any,
        }
        return tuple(name for name in FINDINGS if shown[name])


@dataclass(frozen=True)
class StudyParameters:
    """Every draw of one study; :meth:`CXRPhantomGenerator.render` turns it into an image."""

    seed: int
    patient: int
    study: int
    anatomy: PatientAnatomy
    acquisition: Acquisition
    findings: Findings

    def with_findings(self, **changes) -> StudyParameters:
        """A copy with some findings replaced (e.g. ``pneumothorax=None``); anatomy, acquisition, noise are kept."""
        return dataclasses.replace(self, findings=dataclasses.replace(self.findings, **changes))


@dataclass
class CXRPhantom:
    """One rendered study: the radiograph, masks of what it shows, and the facts."""

    image: np.ndarray  # (size, size) float32 in [0, 1]
    masks: dict[str, np.ndarray] = field(repr=False)  # (size, size) bool: thorax, lungs, heart, one per finding
    markings: np.ndarray = field(repr=False)  # (size, size) float32 lung markings (vessels) as drawn
    facts: dict
    parameters: StudyParameters = field(repr=False)


# ---------------------------------------------------------------------------------------------------------------
# The thorax of one study: shapes shared by drawing and by placing findings


def _smooth_union(*margins):
    """Union of shapes whose outlines blend over about :data:`_JOIN` units (a soft maximum of the margins)."""
    return (_JOIN * np.logaddexp.reduce(np.stack(margins) / _JOIN, axis=0)).astype(np.float32)


class _Thorax:
    """Lungs, heart and mediastinum of a study in the patient frame (margins in units, > 0 inside)."""

    def __init__(self, anatomy: PatientAnatomy, acquisition: Acquisition, ctr: float):
        a = anatomy
        base = acquisition.lung_height
        self.lungs = {
            "right": LungShape(base_y=base, dome_height=a.right_dome_height, cardiophrenic_drop=0.35),
            "left": LungShape(
                base_y=base + a.left_base_drop,
                dome_height=a.right_dome_height - a.left_dome_flattening,
                cardiophrenic_drop=0.35,
            ),
        }
        self.heart = self._place_heart(a, ctr)
        self.carina_y = 0.55 + 0.5 * a.hilum_offset
        self.hila = {"right": (-0.27, 0.82 + a.hilum_offset), "left": (0.27, 0.74 + a.hilum_offset)}

    def _place_heart(self, a: PatientAnatomy, ctr: float) -> HeartShape:
        """The heart of this CTR: an enlarged heart grows sideways and down more than up, as it rests on the
        diaphragm under the great vessels; its widest point on the left stays above the left dome (else the CTR
        could not be measured)."""

        def heart_at(centre_y: float, ratio: float = ctr) -> HeartShape:
            return HeartShape.from_ctr(ratio, centre_y, aspect=a.heart_aspect, tilt_deg=a.heart_tilt_deg)

        reference = heart_at(self.lungs["left"].dome_peak_y - 0.17 + a.heart_offset, _REFERENCE_CTR)
        top = reference.centre[1] - reference.half_height
        grown = heart_at(0.0).half_height
        heart = heart_at(top + grown - 0.35 * (grown - reference.half_height))
        apex_x, apex_y = heart.extreme_points()[1]
        sink = apex_y - (float(self.lungs["left"].dome_y(np.array(apex_x))) - 0.06)
        return heart_at(heart.centre[1] - sink) if sink > 0 else heart

    @staticmethod
    def side_coordinate(side: str, x):
        return side_sign(side) * x

    def lung_margin(self, side: str, x, y):
        return self.lungs[side].margin(self.side_coordinate(side, x), y)

    def cardiac_margin(self, x, y):
        """The heart ellipse joined to a broad base that rests on the diaphragm (so no lung shows beneath it)."""
        (cx, cy), hw = self.heart.centre, self.heart.half_width
        base = ellipse_margin(x, y, (cx, cy + 0.35), (0.85 * hw, 0.45))
        return _smooth_union(self.heart.margin(x, y), base)

    def mediastinum_margin(self, x, y):
        """Superior mediastinum (SVC on the right), aortic knob, pulmonary trunk and heart, smoothly joined."""
        superior = np.minimum(np.minimum(x + 0.16, 0.12 - x), self.heart.centre[1] - y)
        knob = ellipse_margin(x, y, (0.12, 0.47), (0.1, 0.08))
        trunk = ellipse_margin(x, y, (0.15, 0.68), (0.08, 0.08))
        return _smooth_union(self.cardiac_margin(x, y), superior, knob, trunk)

    def diaphragm_y(self, x):
        """y of the diaphragm under each x (right dome for x < 0, left dome for x >= 0)."""
        x = np.asarray(x)
        return np.where(x < 0, self.lungs["right"].dome_y(-x), self.lungs["left"].dome_y(x))

    def fluid_top_y(self, side: str, height_fraction: float, s):
        """Upper edge of pleural fluid: ``height_fraction`` of the lung height at the wall, lower medially."""
        lung = self.lungs[side]
        meniscus = 0.08 + 0.25 * height_fraction
        return lung.base_y * (1.0 - height_fraction) + meniscus * (1.0 - np.clip(s, 0.0, 1.0) ** 2)

    def collapsed_lung_margin(self, side: str, fraction: float, x, y):
        """Margin of the lung collapsed by ``fraction`` towards its medial base (a pneumothorax).

        Heights shrink by ``fraction`` towards the base; widths by ``fraction`` at the apex and less lower down,
        as air rises in an upright patient: the gap is widest at the apex and laterally, narrow at the base.
        """
        lung = self.lungs[side]
        anchor_s, anchor_y = 0.12, lung.base_y - 0.1
        s = self.side_coordinate(side, x)
        keep_y = 1.0 - fraction
        keep_s = 1.0 - fraction * np.clip(0.35 + 0.65 * (anchor_y - y) / anchor_y, 0.35, 1.0)
        inner = lung.margin(anchor_s + (s - anchor_s) / keep_s, anchor_y + (y - anchor_y) / keep_y)
        return inner * np.minimum(keep_s, keep_y)

    def posterior_ribs_above_right_dome(self, anatomy: PatientAnatomy) -> int:
        """Posterior ribs whose centre line crosses the mid-clavicular line (s = 0.5) above the right dome."""
        s = 0.5
        dome = float(self.lungs["right"].dome_y(np.array(s)))
        levels = _rib_levels(anatomy) + anatomy.rib_curvature * ((s - 0.3) ** 2 - 0.09)
        return int((levels < dome).sum())


def _rib_levels(anatomy: PatientAnatomy, count: int = 12) -> np.ndarray:
    k = np.arange(count)
    return anatomy.rib_start + anatomy.rib_spacing * k * (1.0 + 0.015 * k)


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _body(frame: Frame, anatomy: PatientAnatomy) -> tuple[np.ndarray, np.ndarray]:
    """Body coverage and soft-tissue density (size, size): neck, shoulders, chest wall, abdomen."""
    x, y = frame.x, frame.y
    neck, shoulder, chest = 0.4, 1.6, anatomy.body_half_width

    def smoothstep(t):
        t = np.clip(t, 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    half = neck + (shoulder - neck) * smoothstep((y + 0.6) / 0.35) - (shoulder - chest) * smoothstep((y + 0.2) / 0.7)
    inset = half - np.abs(x)
    coverage = soft_step(inset, frame.edge(0.02))
    thickness = np.sqrt(np.clip(inset / 0.6, 0.0, 1.0))
    return coverage, anatomy.soft_tissue * thickness


def _bones(frame: Frame, anatomy: PatientAnatomy, edge: float) -> np.ndarray:
    """Density of ribs, clavicles, spine and humeral heads (size, size)."""
    x, y = frame.x, frame.y
    s = np.abs(x)[None]
    yy = y[None]
    levels = _rib_levels(anatomy)[:, None, None]
    c = anatomy.rib_curvature
    posterior_y = levels + c * ((s - 0.3) ** 2 - 0.09)
    posterior = curve_band(s, yy, posterior_y, 2 * c * (s - 0.3), anatomy.rib_half_thickness, edge)
    posterior = posterior * soft_step(1.1 - s, 0.08) * soft_step(s - 0.13, 0.04)
    lateral_y = levels + c * (0.49 - 0.09)
    anterior_y = lateral_y + 0.45 * (1.0 - s) + 0.3 * (1.0 - s) ** 2
    anterior_slope = -0.45 - 0.6 * (1.0 - s)
    anterior = curve_band(s, yy, anterior_y, anterior_slope, anatomy.rib_half_thickness * 1.2, edge)
    anterior = anterior * soft_step(1.05 - s, 0.06) * np.clip((s - 0.3) / 0.35, 0.0, 1.0)
    density = _RIB * posterior.sum(axis=0) + _ANTERIOR_RIB * anterior.sum(axis=0)

    s2 = np.abs(x)
    t = (s2 - 0.1) / 1.15
    clavicle_y = anatomy.clavicle_y - 0.3 * t + 0.03 * np.sin(2 * np.pi * t)
    clavicle_slope = (-0.3 + 0.03 * 2 * np.pi * np.cos(2 * np.pi * t)) / 1.15
    clavicle = curve_band(s2, y, clavicle_y, clavicle_slope, 0.05, edge) * soft_step(s2 - 0.1, edge)
    density = density + _CLAVICLE * clavicle * soft_step(1.3 - s2, 0.05)

    # vertebrae: one per rib level, a disc between two, pedicles as paired ovals
    phase = np.mod((y - anatomy.rib_start) / anatomy.rib_spacing, 1.0)
    disc = np.exp(-(((phase - 0.55) / 0.07) ** 2))
    column = soft_step(0.13 - np.abs(x), edge)
    pedicle = np.exp(-(((np.abs(x) - 0.085) / 0.03) ** 2 + ((phase - 0.2) / 0.12) ** 2))
    density = density + _SPINE * column * (1.0 - 0.3 * disc + 0.3 * pedicle)

    for sign in (-1.0, 1.0):
        head = ellipse_margin(x, y, (sign * 1.55, -0.3), (0.3, 0.3))
        density = density + _HUMERUS * soft_step(head, edge) * (0.7 + 0.3 * np.clip(head / 0.1, 0.0, 1.0))
    return density.astype(np.float32)


def _draw_line(frame: Frame, canvas: np.ndarray, mask: np.ndarray, points, half_width: float, density: float) -> None:
    """Add a radio-opaque line (tube, catheter, lead) through ``points`` onto ``canvas`` (in place)."""
    found = polyline_distance(frame, points, reach=half_width + 2 * frame.pixel)
    if found is None:
        return
    box, distance = found
    coverage = soft_step(half_width - distance, frame.edge())
    canvas[box] += density * coverage
    mask[box] |= coverage >= 0.5


def _draw_devices(frame: Frame, thorax: _Thorax, devices: Devices) -> tuple[np.ndarray, np.ndarray]:
    """Density and mask (size, size) of support devices."""
    canvas = np.zeros((frame.size, frame.size), dtype=np.float32)
    mask = np.zeros((frame.size, frame.size), dtype=bool)
    line_width = max(0.011, 0.45 * frame.pixel)
    if (tube := devices.endotracheal_tube) is not None:
        tip = thorax.carina_y - tube.tip_above_carina_cm / CM_PER_UNIT
        _draw_line(frame, canvas, mask, [(0.0, -1.5), (0.0, tip)], 0.05, 0.05)  # the plastic tube, faint
        _draw_line(frame, canvas, mask, [(0.03, -1.5), (0.03, tip)], line_width, _TUBE_STRIPE)
    if (line := devices.central_line) is not None:
        if line.vein == "internal jugular":
            sign = side_sign(line.side)
            ctrl = [(sign * 0.45, -1.0), (sign * 0.36, -0.35), (sign * 0.22, 0.1), (-0.1, 0.38), (-0.1, line.tip_y)]
        else:
            sign = side_sign(line.side)
            ctrl = [(sign * 0.95, 0.12), (sign * 0.65, 0.1), (sign * 0.3, 0.16), (-0.04, 0.32), (-0.1, line.tip_y)]
        _draw_line(frame, canvas, mask, smooth_curve(np.array(ctrl)), line_width, _LINE)
    if (pacer := devices.pacemaker) is not None:
        centre, half = (0.78, 0.2), (0.17, 0.12)
        box = frame.window(np.array([centre[0] - half[0], centre[0] + half[0]]), np.array([0.08, 0.32]), 0.05)
        if box is not None:
            margin = rounded_box_margin(frame.x[box], frame.y[box], centre, half)
            coverage = soft_step(margin, frame.edge())
            inner = soft_step(rounded_box_margin(frame.x[box], frame.y[box], (0.75, 0.2), (0.09, 0.07)), frame.edge())
            canvas[box] += _PACEMAKER * coverage * (1.0 - 0.25 * inner)
            mask[box] |= coverage >= 0.5
        heart = thorax.heart
        (cx, cy), hw = heart.centre, heart.half_width
        route = [(0.64, 0.14), (0.38, 0.08), (0.08, 0.22), (-0.1, 0.5), (-0.14, cy - 0.25)]
        ventricle = [*route, (-0.05, cy + 0.1), (cx + 0.35 * hw, cy + 0.25 * heart.semi_minor)]
        _draw_line(frame, canvas, mask, smooth_curve(np.array(ventricle)), line_width, _LINE)
        if pacer.leads == 2:
            atrium = [*route[:-1], (-0.16, cy - 0.4), (-0.1, cy - 0.3), (-0.02, cy - 0.38)]
            _draw_line(frame, canvas, mask, smooth_curve(np.array(atrium)), line_width, _LINE)
    return canvas, mask


def _consolidation_opacity(frame: Frame, thorax: _Thorax, finding: Consolidation) -> np.ndarray:
    """Fraction (size, size) of the lobe's air replaced: an ellipse around the lobe, its edge made fluffy."""
    side, level = finding.lobe.split()
    lung = thorax.lungs[side]
    s = thorax.side_coordinate(side, frame.x)
    centres = {"upper": (0.55, 0.26 * lung.base_y), "middle": (0.32, 0.6 * lung.base_y)}
    centres["lower"] = (0.56, lung.dome_peak_y - 0.1)
    radii = {"upper": (0.4, 0.26 * lung.base_y), "middle": (0.34, 0.15 * lung.base_y), "lower": (0.42, 0.3)}
    centre, (rs, ry) = centres[level], radii[level]
    rs, ry = rs * finding.extent, ry * finding.extent
    core = 1.0 - ((s - centre[0]) / rs) ** 2 - ((frame.y - centre[1]) / ry) ** 2
    noise = smooth_noise(frame, np.random.default_rng(finding.texture_seed), 0.1, (-1.2, 1.2, -0.2, 2.2))
    opacity = np.clip((core + 0.32 * noise) / 0.3, 0.0, 1.0)
    return (finding.density * opacity).astype(np.float32)


@dataclass
class _LungFields:
    """Per-pixel fields (size, size) of the lungs of one study, in [0, 1] unless said otherwise."""

    envelope: np.ndarray  # inside either lung outline (before the mediastinum is cut out)
    aerated: np.ndarray  # lung not hidden by the mediastinum
    air: np.ndarray  # air thickness (0-1.05), what darkens the image
    pleural_space: np.ndarray  # pneumothorax: air outside the collapsed lung
    pleural_line: np.ndarray  # density of the visceral pleural line
    fluid: np.ndarray  # pleural effusion
    consolidation: np.ndarray  # share of the air replaced by consolidation


def _lung_fields(frame: Frame, thorax: _Thorax, findings: Findings, outside_mediastinum: np.ndarray) -> _LungFields:
    """Aerated lung of both sides, with the air that a pneumothorax adds and effusion and consolidation take away."""
    x, y, edge = frame.x, frame.y, frame.edge()
    zeros = np.zeros_like(x)
    envelopes, air = {}, {}
    pleural_space, pleural_line, fluid, consolidation = zeros, zeros, zeros, zeros
    for side in ("right", "left"):
        margin = thorax.lung_margin(side, x, y)
        envelopes[side] = envelope = soft_step(margin, edge)
        depth = 0.55 + 0.45 * np.clip(margin / 0.3, 0.0, 1.0) ** 0.7  # the lung is thin at its borders
        air[side] = envelope * outside_mediastinum * depth
        if (ptx := findings.pneumothorax) is not None and ptx.side == side:
            collapsed = thorax.collapsed_lung_margin(side, ptx.fraction, x, y)
            inside = soft_step(collapsed, edge)
            pleural_space = envelope * outside_mediastinum * (1.0 - inside)
            # the pleural space holds more air than lung of full depth; the collapsed lung is a little denser
            air[side] = air[side] * (1.0 - pleural_space) * (1.0 - 0.15 * inside) + 1.05 * pleural_space
            width = frame.edge(0.008)
            visible = soft_step(margin - width, edge) * outside_mediastinum
            pleural_line = _PLEURAL_LINE * np.exp(-((collapsed / width) ** 2)) * visible
        if (effusion := findings.pleural_effusion) is not None and side in effusion.sides:
            top = thorax.fluid_top_y(side, effusion.height_fraction[side], thorax.side_coordinate(side, x))
            fill = soft_step(y - top, 0.07) * envelope
            air[side] = air[side] * (1.0 - fill)
            fluid = np.maximum(fluid, fill)
    if (cons := findings.consolidation) is not None:
        consolidation = _consolidation_opacity(frame, thorax, cons) * envelopes[cons.side] * outside_mediastinum
        air[cons.side] = air[cons.side] * (1.0 - consolidation)
    envelope = np.maximum(envelopes["right"], envelopes["left"])
    return _LungFields(
        envelope=envelope,
        aerated=envelope * outside_mediastinum,
        air=air["right"] + air["left"],
        pleural_space=pleural_space,
        pleural_line=pleural_line,
        fluid=fluid,
        consolidation=consolidation,
    )


def _lung_markings(frame: Frame, thorax: _Thorax, anatomy: PatientAnatomy, lungs: _LungFields) -> np.ndarray:
    """Vessel trees of both hila (size, size, in [0, 1)), only in aerated lung: none in a pneumothorax or fluid."""
    rng = np.random.default_rng(anatomy.vessel_seed)
    trees = [vessel_tree(rng, thorax.hila[side], side) for side in ("right", "left")]
    starts, ends, weights, levels = (np.concatenate(parts) for parts in zip(*trees, strict=True))
    trunk = levels < 2  # the central vessels are wider
    vessels = splat_segments(frame, starts[trunk], ends[trunk], weights[trunk], width=0.022)
    vessels += splat_segments(frame, starts[~trunk], ends[~trunk], weights[~trunk], width=0.009)
    visible = lungs.aerated * (1.0 - lungs.pleural_space) * (1.0 - lungs.fluid)
    return ((1.0 - np.exp(-1.4 * vessels)) * visible).astype(np.float32)


def _airways_and_hila(frame: Frame, thorax: _Thorax) -> np.ndarray:
    """Density (size, size) of the hila (bright), trachea, main bronchi and gastric bubble (dark)."""
    x, y, edge = frame.x, frame.y, frame.edge()
    density = np.zeros_like(x)
    for hx, hy in thorax.hila.values():
        density += 0.05 * np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / (2 * 0.09**2))
    density -= 0.14 * soft_step(np.minimum(0.065 - np.abs(x), thorax.carina_y - y), edge)
    for end in ((-0.27, thorax.carina_y + 0.24), (0.29, thorax.carina_y + 0.3)):
        if (found := polyline_distance(frame, [(0.0, thorax.carina_y - 0.02), end], reach=0.06)) is not None:
            box, distance = found
            density[box] -= 0.08 * soft_step(0.045 - distance, edge)
    bubble_y = float(thorax.lungs["left"].dome_y(np.array(0.5))) + 0.14
    bubble = ellipse_margin(x, y, (0.5, bubble_y), (0.16, 0.09))
    density -= 0.12 * soft_step(np.minimum(bubble, bubble_y + 0.03 - y), edge)  # flat bottom: air-fluid level
    return density


def _nodule(frame: Frame, nodule: Nodule) -> tuple[np.ndarray, np.ndarray]:
    """Density and mask (size, size) of a nodule: a sphere seen in projection."""
    radius = nodule.diameter_mm / 20.0 / CM_PER_UNIT
    distance = np.hypot(frame.x - nodule.centre[0], frame.y - nodule.centre[1])
    coverage = soft_step(radius - distance, frame.edge())
    thickness = np.sqrt(np.clip(1.0 - (distance / radius) ** 2, 0.0, 1.0))
    return _NODULE * coverage * (0.55 + 0.45 * thickness), coverage >= 0.5


def _film(density: np.ndarray, acquisition: Acquisition, noise_rng: np.random.Generator) -> np.ndarray:
    """Film response, gamma and noise: densities to a float32 image in [0, 1]."""
    exposure = (1.0 - np.exp(-_TONE * acquisition.gain * density)) / (1.0 - math.exp(-_TONE * _WHITE))
    image = np.clip(exposure, 0.0, 1.0) ** acquisition.gamma
    return np.clip(image + noise_rng.normal(0.0, acquisition.noise_sigma, image.shape), 0.0, 1.0).astype(np.float32)


def _render(parameters: StudyParameters, size: int) -> CXRPhantom:
    a, acq, f = parameters.anatomy, parameters.acquisition, parameters.findings
    thorax = _Thorax(a, acq, f.ctr)
    centre = (0.5 + acq.shift[0], acq.apex_v + acq.shift[1] + a.thorax_scale * acq.lung_height / 2)
    frame = Frame.create(size, a.thorax_scale, acq.rotation_deg, centre, (0.0, acq.lung_height / 2))
    x, y, edge = frame.x, frame.y, frame.edge()

    body, density = _body(frame, a)
    outside_mediastinum = soft_step(-thorax.mediastinum_margin(x, y), edge)
    heart = soft_step(thorax.cardiac_margin(x, y), edge)
    above_diaphragm = y < thorax.diaphragm_y(x)
    lungs = _lung_fields(frame, thorax, f, outside_mediastinum)
    markings = _lung_markings(frame, thorax, a, lungs)

    density = density - _AIR * lungs.air + _FLUID * lungs.fluid + lungs.pleural_line
    density = density + _HEART * heart * soft_step(thorax.diaphragm_y(x) - y, 0.05) + _airways_and_hila(frame, thorax)
    # bones show best against aerated lung: film processing and scatter flatten them over dense regions
    density = density + _bones(frame, a, edge) * body * (0.35 + 0.65 * lungs.aerated)
    density = density + markings * (_VESSEL * (1.0 - lungs.consolidation) - _BRONCHOGRAM * lungs.consolidation)
    masks = {"nodule": np.zeros(x.shape, bool)}
    if f.nodule is not None:
        nodule, masks["nodule"] = _nodule(frame, f.nodule)
        density = density + nodule
    devices, masks["support_devices"] = _draw_devices(frame, thorax, f.devices)
    density = density + devices
    noise_rng = np.random.default_rng([parameters.seed, _NOISE_STREAM, parameters.patient, parameters.study])
    image = _film(density * body, acq, noise_rng)

    masks["thorax"] = lungs.envelope >= 0.5
    masks["lungs"] = lungs.aerated >= 0.5
    masks["heart"] = (heart >= 0.5) & above_diaphragm
    masks["cardiomegaly"] = masks["heart"] if "cardiomegaly" in f.present() else np.zeros(x.shape, bool)
    masks["pleural_effusion"] = lungs.fluid >= 0.5
    masks["pneumothorax"] = lungs.pleural_space >= 0.5
    cons_density = f.consolidation.density if f.consolidation is not None else 1.0
    masks["consolidation"] = lungs.consolidation >= 0.4 * cons_density
    return CXRPhantom(
        image=image, masks=masks, markings=markings, facts=_facts(parameters, thorax), parameters=parameters
    )


# ---------------------------------------------------------------------------------------------------------------
# Facts


def _facts(parameters: StudyParameters, thorax: _Thorax) -> dict:
    """JSON-ready truth of a study (see the module docstring)."""
    f, a, acq = parameters.findings, parameters.anatomy, parameters.acquisition
    severity = cardiomegaly_severity(f.ctr)
    facts: dict = {"present": list(f.present()), "ctr": round(f.ctr, 3)}
    facts["cardiomegaly"] = None if severity is None else {"severity": severity, "subtle": severity == "borderline"}
    e = f.pleural_effusion
    facts["pleural_effusion"] = None
    if e is not None:
        facts["pleural_effusion"] = {
            "side": e.side,
            "volume": e.volume,
            "height_fraction": {k: round(v, 3) for k, v in e.height_fraction.items()},
            "subtle": e.subtle,
        }
    p = f.pneumothorax
    facts["pneumothorax"] = None
    if p is not None:
        facts["pneumothorax"] = {"side": p.side, "size": p.size, "fraction": round(p.fraction, 3), "subtle": p.subtle}
    c = f.consolidation
    facts["consolidation"] = None
    if c is not None:
        facts["consolidation"] = {"lobe": c.lobe, "side": c.side, "extent": round(c.extent, 3), "subtle": c.subtle}
    n = f.nodule
    facts["nodule"] = None
    if n is not None:
        facts["nodule"] = {
            "side": n.side,
            "zone": n.zone,
            "diameter_mm": round(n.diameter_mm, 1),
            "centre": [round(n.centre[0], 3), round(n.centre[1], 3)],
            "subtle": n.subtle,
        }
    d = f.devices
    facts["support_devices"] = None
    if d.any:
        devices: dict = {}
        if d.endotracheal_tube is not None:
            devices["endotracheal_tube"] = {"tip_above_carina_cm": round(d.endotracheal_tube.tip_above_carina_cm, 1)}
        if d.central_line is not None:
            devices["central_line"] = {"side": d.central_line.side, "vein": d.central_line.vein, "tip": "SVC"}
        if d.pacemaker is not None:
            devices["pacemaker"] = {"side": "left", "leads": d.pacemaker.leads}
        facts["support_devices"] = devices
    facts["anatomy"] = {
        "thorax_width_fraction": round(2 * a.thorax_scale, 3),
        "posterior_ribs": thorax.posterior_ribs_above_right_dome(a),
        "lung_height_cm": round(acq.lung_height * CM_PER_UNIT, 1),
    }
    facts["acquisition"] = {
        "view": "PA",
        "rotation_deg": round(acq.rotation_deg, 2),
        "gain": round(acq.gain, 3),
        "gamma": round(acq.gamma, 3),
        "noise_sigma": round(acq.noise_sigma, 4),
    }
    return facts


# ---------------------------------------------------------------------------------------------------------------
# Drawing the parameters

_PATIENT_STREAM, _STUDY_STREAM, _NOISE_STREAM, _REPORT_STREAM = 1, 2, 3, 4


class CXRPhantomGenerator:
    """Phantom chest radiographs of ``size`` x ``size`` pixels, deterministic from ``seed``.

    ``parameters(patient, study)`` draws a study, ``render(parameters)`` draws its image (also after changing
    findings with :meth:`StudyParameters.with_findings`), ``study(patient, study)`` does both.
    """

    def __init__(self, size: str | int = "demo", seed: int = 0, prevalence: FindingPrevalence | None = None):
        self.size = resolve_size(size)
        self.seed = int(seed)
        self.prevalence = prevalence if prevalence is not None else FindingPrevalence()

    def report_rng(self, patient: int, study: int) -> np.random.Generator:
        """The random stream that words the report of a study."""
        return np.random.default_rng([self.seed, _REPORT_STREAM, int(patient), int(study)])

    def anatomy(self, patient: int) -> tuple[PatientAnatomy, float]:
        """The patient's anatomy and cardiothoracic ratio (cardiomegaly is a property of the patient)."""
        rng = np.random.default_rng([self.seed, _PATIENT_STREAM, int(patient)])
        anatomy = PatientAnatomy(
            thorax_scale=rng.uniform(0.33, 0.39),
            body_half_width=rng.uniform(1.12, 1.3),
            soft_tissue=rng.uniform(0.5, 0.56),
            right_dome_height=rng.uniform(0.26, 0.36),
            left_base_drop=rng.uniform(0.02, 0.06),
            left_dome_flattening=rng.uniform(0.02, 0.06),
            heart_offset=rng.uniform(-0.05, 0.05),
            heart_aspect=rng.uniform(1.25, 1.45),
            heart_tilt_deg=rng.uniform(30.0, 42.0),
            rib_start=rng.uniform(-0.1, -0.06),
            rib_spacing=rng.uniform(0.14, 0.15),
            rib_curvature=rng.uniform(0.6, 0.8),
            rib_half_thickness=rng.uniform(0.036, 0.044),
            clavicle_y=rng.uniform(0.16, 0.26),
            hilum_offset=rng.uniform(-0.04, 0.04),
            vessel_seed=int(rng.integers(2**31)),
        )
        enlarged, subtle = rng.uniform(size=2)
        if enlarged < self.prevalence.cardiomegaly:
            ctr = rng.uniform(*(CTR_BORDERLINE_RANGE if subtle < self.prevalence.subtle else CTR_ENLARGED_RANGE))
        else:
            ctr = rng.uniform(*CTR_NORMAL_RANGE)
        return anatomy, float(ctr)

    def parameters(self, patient: int, study: int = 0) -> StudyParameters:
        """Every draw of study ``study`` of patient ``patient``."""
        anatomy, ctr = self.anatomy(patient)
        streams = np.random.SeedSequence([self.seed, _STUDY_STREAM, int(patient), int(study)]).spawn(6)
        rngs = [np.random.default_rng(s) for s in streams]
        acquisition = self._acquisition(rngs[0])
        ctr = float(np.clip(ctr + rngs[0].normal(0.0, 0.004), 0.38, 0.67))  # the same heart, measured again
        thorax = _Thorax(anatomy, acquisition, ctr)
        effusion = self._effusion(rngs[1])
        pneumothorax = self._pneumothorax(rngs[2], effusion)
        consolidation = self._consolidation(rngs[3])
        nodule = self._nodule(rngs[4], thorax, effusion, pneumothorax)
        devices = self._devices(rngs[5])
        findings = Findings(ctr, effusion, pneumothorax, consolidation, nodule, devices)
        return StudyParameters(self.seed, int(patient), int(study), anatomy, acquisition, findings)

    def render(self, parameters: StudyParameters) -> CXRPhantom:
        return _render(parameters, self.size)

    @staticmethod
    def facts(parameters: StudyParameters) -> dict:
        """The facts of a study without drawing it (the same dict as ``render(parameters).facts``)."""
        thorax = _Thorax(parameters.anatomy, parameters.acquisition, parameters.findings.ctr)
        return _facts(parameters, thorax)

    def study(self, patient: int, study: int = 0) -> CXRPhantom:
        return self.render(self.parameters(patient, study))

    # -- per-finding draws: each from its own stream, so one prevalence does not shift the others' draws --------

    @staticmethod
    def _acquisition(rng: np.random.Generator) -> Acquisition:
        return Acquisition(
            lung_height=rng.uniform(1.5, 1.88),
            rotation_deg=rng.uniform(-3.0, 3.0),
            shift=(rng.uniform(-0.02, 0.02), rng.uniform(-0.015, 0.015)),
            apex_v=rng.uniform(0.1, 0.14),
            gain=rng.uniform(0.93, 1.1),
            gamma=rng.uniform(0.85, 1.2),
            noise_sigma=rng.uniform(0.006, 0.02),
        )

    def _shown(self, rng: np.random.Generator, prevalence: float) -> tuple[bool, bool]:
        present, subtle = rng.uniform(size=2)
        return bool(present < prevalence), bool(subtle < self.prevalence.subtle)

    def _effusion(self, rng: np.random.Generator) -> Effusion | None:
        present, subtle = self._shown(rng, self.prevalence.pleural_effusion)
        side = str(rng.choice(["right", "left", "both"], p=[0.35, 0.35, 0.3]))
        volume = str(rng.choice(list(_EFFUSION_VOLUME_ODDS), p=list(_EFFUSION_VOLUME_ODDS.values())))
        span = _SUBTLE_EFFUSION_HEIGHT if subtle else _EFFUSION_HEIGHTS[volume]
        heights = {s: float(rng.uniform(*span)) for s in ("right", "left")}
        if not present:
            return None
        sides = ("right", "left") if side == "both" else (side,)
        return Effusion(side, "small" if subtle else volume, {s: heights[s] for s in sides}, subtle)

    def _pneumothorax(self, rng: np.random.Generator, effusion: Effusion | None) -> Pneumothorax | None:
        present, subtle = self._shown(rng, self.prevalence.pneumothorax)
        side = str(rng.choice(["right", "left"]))
        size = str(rng.choice(list(_PNEUMOTHORAX_FRACTIONS), p=[0.4, 0.35, 0.25]))
        fraction = float(rng.uniform(*(_SUBTLE_PNEUMOTHORAX_FRACTION if subtle else _PNEUMOTHORAX_FRACTIONS[size])))
        if not present:
            return None
        if effusion is not None and effusion.side == side:  # keep a hydropneumothorax out of the demo
            side = "left" if side == "right" else "right"
        return Pneumothorax(side, "small" if subtle else size, fraction, subtle)

    def _consolidation(self, rng: np.random.Generator) -> Consolidation | None:
        present, subtle = self._shown(rng, self.prevalence.consolidation)
        lobe = str(rng.choice(LOBES))
        extent = rng.uniform(0.5, 0.65) if subtle else rng.uniform(0.8, 1.1)
        density = rng.uniform(0.45, 0.55) if subtle else rng.uniform(0.75, 0.95)
        seed = int(rng.integers(2**31))
        return Consolidation(lobe, float(extent), float(density), seed, subtle) if present else None

    def _nodule(
        self, rng: np.random.Generator, thorax: _Thorax, effusion: Effusion | None, ptx: Pneumothorax | None
    ) -> Nodule | None:
        present, subtle = self._shown(rng, self.prevalence.nodule)
        diameter = float(rng.uniform(*(_SUBTLE_NODULE_DIAMETER_MM if subtle else _NODULE_DIAMETER_MM)))
        side = str(rng.choice(["right", "left"]))
        lung = thorax.lungs[side]
        s = rng.uniform(0.3, 0.85, 64)
        y = rng.uniform(0.18, 0.85, 64) * lung.base_y
        if not present:
            return None
        radius = diameter / 20.0 / CM_PER_UNIT
        x = side_sign(side) * s
        ok = (thorax.lung_margin(side, x, y) > radius + 0.08) & (thorax.mediastinum_margin(x, y) < -(radius + 0.06))
        if effusion is not None and side in effusion.sides:
            ok &= y < thorax.fluid_top_y(side, effusion.height_fraction[side], s) - radius - 0.1
        if ptx is not None and ptx.side == side:
            ok &= thorax.collapsed_lung_margin(side, ptx.fraction, x, y) > radius + 0.05
        if not ok.any():  # no room in that lung (e.g. a large effusion and a pneumothorax): no nodule
            return None
        i = int(np.argmax(ok))
        relative = y[i] / lung.base_y
        zone = "upper" if relative < 0.4 else ("mid" if relative < 0.68 else "lower")
        return Nodule(side, zone, (float(x[i]), float(y[i])), diameter, subtle)

    def _devices(self, rng: np.random.Generator) -> Devices:
        present = rng.uniform() < self.prevalence.support_devices
        which = rng.uniform(size=3) < 0.5
        which[int(rng.integers(3))] = True  # at least one device when devices are present
        tube = EndotrachealTube(float(rng.uniform(2.5, 6.0)))
        vein = str(rng.choice(["internal jugular", "subclavian"], p=[0.6, 0.4]))
        line = CentralLine("right" if vein == "internal jugular" else "left", vein, float(rng.uniform(0.62, 0.78)))
        pacer = Pacemaker(int(rng.choice([1, 2])))
        if not present:
            return Devices()
        return Devices(tube if which[0] else None, line if which[1] else None, pacer if which[2] else None)


# ---------------------------------------------------------------------------------------------------------------
# Data set writer

_IMAGE_RE = re.compile(r"^p\d{5}_s\d{7}\.png$")


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")


def write_cxr_phantom_dataset(
    output_dir,
    num_patients: int,
    size: str | int = "demo",
    seed: int = 0,
    studies_per_patient: int = 2,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    prevalence: FindingPrevalence | None = None,
    progress: bool = True,
) -> Path:
    """Write ``num_patients * studies_per_patient`` phantom radiographs and their ``datalist.json``; returns its path.

    Files: ``output_dir/images/p00007_s0000701.png`` (8-bit grayscale, ``size`` x ``size``) and
    ``output_dir/datalist.json`` in the layout of :mod:`common.data.cxr.datalist` (entries with image, patient,
    study, findings, impression, sentences, labels, facts; split by patient with
    :func:`~common.data.splits.split_subjects`). Every file is written atomically, the datalist last; phantom
    images of an earlier run that this one did not write are removed.

    Raises:
        ValueError: before anything is written, for bad counts, size, fractions or prevalence, or when a split
            that was asked for would get no patient.
    """
    from tqdm.auto import tqdm

    from common.data.cxr.reports import build_report

    num_patients, studies_per_patient = int(num_patients), int(studies_per_patient)
    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}")
    if not 1 <= studies_per_patient <= MAX_STUDIES_PER_PATIENT + 1:
        raise ValueError(
            f"studies_per_patient must be in [1, {MAX_STUDIES_PER_PATIENT + 1}], got {studies_per_patient}"
        )
    generator = CXRPhantomGenerator(size, seed=seed, prevalence=prevalence)
    splits = split_generated_subjects(num_patients, val_fraction, test_fraction, seed, noun="patients")
    split_of = {index: name for name, ids in splits.items() for index in ids}

    output_dir = Path(output_dir)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list] = {name: [] for name in SPLITS}
    written: set[str] = set()
    total = num_patients * studies_per_patient
    with tqdm(total=total, desc="chest X-ray phantoms", unit="image", disable=not progress) as bar:
        for patient in range(num_patients):
            for study in range(studies_per_patient):
                phantom = generator.study(patient, study)
                report = build_report(phantom.facts, generator.report_rng(patient, study))
                pid, sid = patient_id(patient), study_id(patient, study)
                name = f"{pid}_{sid}.png"
                _save_png(image_dir / name, phantom.image)
                written.add(name)
                entries[split_of[patient]].append(
                    {
                        "image": f"images/{name}",
                        "patient": pid,
                        "study": sid,
                        "findings": report.findings,
                        "impression": report.impression,
                        "sentences": list(report.sentences),
                        "labels": dict(report.labels),
                        "facts": phantom.facts,
                    }
                )
                bar.update()
    for stale in image_dir.iterdir():
        if _IMAGE_RE.match(stale.name) and stale.name not in written:
            stale.unlink()
    datalist = {
        "description": (
            "Procedural frontal (PA) chest radiograph phantoms with radiology reports and known findings "
            "(cardiomegaly, pleural effusion, pneumothorax, consolidation, nodule, support devices); "
            "demonstration data with known ground truth, not real patients. Labels follow CheXpert "
            "(1 positive, 0 negative, -1 uncertain; absent: not mentioned), facts are the truth of each image."
        ),
        "generator": "common.data.cxr.phantoms",
        "image_size": [generator.size, generator.size],
        "seed": int(seed),
        "num_patients": num_patients,
        "studies_per_patient": studies_per_patient,
        "prevalence": generator.prevalence.to_dict(),
        "patients": {name: [patient_id(i) for i in ids] for name, ids in splits.items()},
        **entries,
    }
    path = output_dir / "datalist.json"
    write_json(path, datalist)
    return path
