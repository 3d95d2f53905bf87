"""CLIP image embeddings of a data set, computed once by the frozen CLIP for the unCLIP prior and decoder stages."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from common.data.encoded_cache import EncodedItemsCache
from common.networks.clip_model import ClipEncoder

#: Item key of a slice's CLIP image embedding ``(D,)``.
IMAGE_EMBEDDING_KEY = "image_embedding"


class ClipImageEmbeddingCache(EncodedItemsCache):
    """Items of a datalist -> the same items with ``image_embedding`` ``(D,)``, the CLIP's unit-norm image embedding.

    The prior learns to produce these embeddings from captions, and the decoder is conditioned on them: both
    stages read them from here, encoded once by the frozen CLIP (``clip.encode_images``, the CLIP's own
    preprocessing), instead of running the vision tower at every step.

    Args:
        clip: the frozen, fine-tuned CLIP.
        load, image_key, batch_size, device, cache_dir, enabled, progress, keep_image: as for
            :class:`EncodedItemsCache` (``keep_image=True`` for the decoder, which also needs the image's latents).
        embedding_key: item key of the embedding.
    """

    name = "clip_image_embeddings"

    def __init__(
        self,
        clip: ClipEncoder,
        load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        image_key: str = "image",
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        enabled: bool = True,
        progress: bool = True,
        keep_image: bool = False,
        embedding_key: str = IMAGE_EMBEDDING_KEY,
    ) -> None:
        super().__init__(load, image_key, batch_size, device, cache_dir, enabled, progress, keep_image)
        self.clip = clip
        self.embedding_key = embedding_key

    def encoder_fingerprint(self) -> str:
        from common.networks.pairing import fingerprint

        return fingerprint("clip", self.clip.model)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = self.clip.training
        self.clip.eval()
        try:
            return {self.embedding_key: self.clip.encode_images(images)}
        finally:
            self.clip.train(was_training)
