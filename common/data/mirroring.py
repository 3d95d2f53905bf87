"""Left-right mirrored copies of a training set, for stages whose targets are cached codes of the images.

Mirroring the brain left to right is the usual MRI augmentation, but a random flip cannot reach targets
encoded once by a frozen autoencoder (:class:`common.diffusion.latent_cache.LatentMomentsCache`): the code of
a mirrored image is not the mirrored code. So the data set is doubled instead: :func:`mirrored_copies` adds a
copy of every item marked ``mirrored``; :class:`MirroredFlipd` flips the marked items' images, both where the
cache loads the target (before encoding) and where training loads the condition, so a pair stays aligned.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform
from monai.utils import convert_to_dst_type

#: Item key marking a mirrored copy (``True``); plain items hold ``False`` or lack it.
MIRRORED_KEY = "mirrored"


def mirrored_copies(items: Sequence[Mapping[str, Any]], enabled: bool = True) -> list[dict[str, Any]]:
    """``items`` marked ``mirrored: False``, then a copy of each marked ``True`` (``2N``); unmarked when not ``enabled``.

    Every item of a doubled set carries the mark, so batches of plain and mirrored items collate.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"`mirror_augmentation` must be True or False, got {enabled!r}.")
    plain = [dict(item) for item in items]
    if not enabled:
        return plain
    return [{**item, MIRRORED_KEY: False} for item in plain] + [{**item, MIRRORED_KEY: True} for item in plain]


class MirroredFlipd(MapTransform):
    """Flip the images under ``keys`` along ``spatial_axis`` in items marked ``mirrored``; others pass unchanged.

    Images are channel-first ``(C, H, W)``; ``spatial_axis`` 0 is the first spatial axis, left-right in the brain
    slices here (RAS, 80 x 112 in the demo). Deterministic, so the latent cache holds the mirrored image's code.
    """

    def __init__(self, keys: KeysCollection, spatial_axis: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.flip = Flip(spatial_axis=spatial_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(MIRRORED_KEY, False):
            for key in self.key_iterator(d):
                # Flip returns a MetaTensor; keep the input's type so plain and mirrored items collate alike.
                d[key] = convert_to_dst_type(self.flip(d[key]), d[key])[0]
        return d
