"""What an unCLIP inference run generates: text-to-image, image variations or prompt interpolation requests.

One run does one of the three (:func:`unclip_requests`); every request is a dict that names its output and carries
its seed, so the images do not depend on the batch size:

* ``"text"``: ``{"mode", "name", "prompt", "seed", "index"}``, sample ``i`` with seed ``seed + i``;
* ``"variation"``: ``{"mode", "name", "image", "source", "source_slice", "seed", "index"}``, variation ``j`` of each
  input slice with seed ``seed + j`` (as :meth:`UnclipPipeline.variations`);
* ``"interpolation"``: ``{"mode", "name", "prompt", "prompt_b", "weight", "seed", "index"}``, step ``k`` of ``N`` at
  weight ``k / (N - 1)``, every step from the noise of ``seed`` (as :meth:`UnclipPipeline.interpolate`).

:class:`UnclipRequestPrepareBatch` turns a batch of them into the decoder sampler's inputs in MONAI's
``SupervisedEvaluator``: the image embedding (sampled by the prior from the prompt, encoded by CLIP from the slice,
or interpolated), the seeded noise and the null embedding for guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from common.data.brain.captions import caption_attributes
from common.data.condition_images import ConditionImage
from common.diffusion.requests import check_prompt, sample_requests
from common.diffusion.unclip import UnclipPipeline, slerp

MODES = ("text", "variation", "interpolation")

#: Request keys an output's sidecar records (those a request has).
SIDECAR_KEYS = ("mode", "prompt", "prompt_b", "weight", "source", "source_slice", "seed", "index")


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def unclip_requests(
    prompt: str,
    num_samples: int,
    seed: int,
    source: ConditionImage | None = None,
    interpolate_to: str | None = None,
    interpolation_steps: int = 5,
) -> list[dict[str, Any]]:
    """The requests of one run: variations of ``source`` when given, else an interpolation from ``prompt`` to
    ``interpolate_to`` when given, else ``num_samples`` images of ``prompt``.

    Raises:
        ValueError: both ``source`` and ``interpolate_to`` are given (one run does one thing), or a count, seed or
            prompt is invalid.
    """
    if source is not None and interpolate_to:
        raise ValueError(
            "Give either --input_image (variations of a slice) or --interpolate_to (a second prompt), not both."
        )
    if source is not None:
        _check_count("num_samples", num_samples, 1)
        _check_count("seed", seed, 0)
        return [
            {
                "mode": "variation",
                "name": f"variation of {source.stem} slice {k}",
                "image": source.slices[k],
                "source": str(source.path),
                "source_slice": k,
                "seed": seed + j,
                "index": j,
            }
            for k in range(source.slices.shape[0])
            for j in range(num_samples)
        ]
    if interpolate_to:
        check_prompt(prompt)
        check_prompt(interpolate_to)
        steps = _check_count("interpolation_steps", interpolation_steps, 2)
        _check_count("seed", seed, 0)
        return [
            {
                "mode": "interpolation",
                "name": f"interpolation {k} of {steps - 1} {prompt} to {interpolate_to}",
                "prompt": prompt,
                "prompt_b": interpolate_to,
                "weight": k / (steps - 1),
                "seed": seed,
                "index": k,
            }
            for k in range(steps)
        ]
    return [
        {"mode": "text", "name": request["prompt"], **request} for request in sample_requests(prompt, num_samples, seed)
    ]


def requested_facts(prompt: str | None) -> dict[str, Any] | None:
    """The facts a prompt in the canonical caption layout asks for (``caption_attributes``, stated facts only), or
    ``None`` for free text, whose facts cannot be read reliably."""
    if not prompt:
        return None
    try:
        attributes = caption_attributes(prompt)
    except ValueError:
        return None
    return {key: value for key, value in attributes.items() if value is not None}


class UnclipRequestPrepareBatch(PrepareBatch):
    """A batch of requests (one mode) -> ``(noise, None, (), {"context", "uncond_context", "generator"})`` for the
    decoder sampler, the context being each request's CLIP image embedding ``(B, D_emb)``.

    Args:
        pipeline: the prior, decoder and CLIP (:class:`~common.diffusion.unclip.UnclipPipeline`).
        prior_guidance_scale: the prior's guidance for text and interpolation requests (``None``: the sampler's).
    """

    def __init__(self, pipeline: UnclipPipeline, prior_guidance_scale: float | None = None) -> None:
        self.pipeline = pipeline
        self.prior_guidance_scale = prior_guidance_scale
        self._ends: dict[tuple[str, str, int], torch.Tensor] = {}

    def _interpolation_ends(self, prompt_a: str, prompt_b: str, seed: int) -> torch.Tensor:
        """Both prompts' image embeddings ``(2, D_emb)`` sampled with ``seed``, computed once per run."""
        key = (prompt_a, prompt_b, seed)
        if key not in self._ends:
            self._ends[key] = self.pipeline.image_embedding_of(
                [prompt_a, prompt_b], [seed, seed], self.prior_guidance_scale
            )
        return self._ends[key]

    def embeddings(self, batchdata: Mapping[str, Any]) -> torch.Tensor:
        """The image embedding of every request of the batch, ``(B, D_emb)``."""
        modes = set(batchdata["mode"])
        if len(modes) != 1 or not modes <= set(MODES):
            raise ValueError(f"A batch holds requests of one of the modes {MODES}, got {sorted(modes)}.")
        mode = modes.pop()
        seeds = [int(s) for s in batchdata["seed"]]
        if mode == "text":
            return self.pipeline.image_embedding_of(list(batchdata["prompt"]), seeds, self.prior_guidance_scale)
        if mode == "variation":
            return self.pipeline.slice_embeddings(torch.as_tensor(batchdata["image"]).float())
        weights = [float(w) for w in batchdata["weight"]]
        return torch.stack(
            [
                slerp(*self._interpolation_ends(a, b, seed), w)
                for a, b, seed, w in zip(batchdata["prompt"], batchdata["prompt_b"], seeds, weights, strict=True)
            ]
        )

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        embeddings = self.embeddings(batchdata)
        noise, condition = self.pipeline.decoder_inputs(embeddings, [int(s) for s in batchdata["seed"]])
        return noise, None, (), condition
