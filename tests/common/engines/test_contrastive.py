"""common.engines.contrastive: the CLIP loss with soft targets, and CLIP fine-tuning in MONAI's SupervisedTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.engines.contrastive import (
    ClipContrastiveLoss,
    ClipPrepareBatch,
    clip_contrastive_loss,
    contrastive_targets,
)
from common.metrics.retrieval import chance_recall_at_k, retrieval_recall_at_k
from common.networks.clip_model import ClipEncoder, build_small_clip
from common.networks.tokenizer import tokenize_prompts
from tests.conftest import TOKENIZER_DIR, _cached_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _cached_tokenizer(str(TOKENIZER_DIR))


def _embeddings(b: int = 4, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1),
        torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1),
    )


def _manual_loss(image_emb, text_emb, scale, targets):
    """Symmetric cross-entropy written out element by element."""
    b = image_emb.shape[0]
    logits = [[scale * float(image_emb[i] @ text_emb[j]) for j in range(b)] for i in range(b)]

    def ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_z = math.log(sum(math.exp(v) for v in row))
            total -= sum(float(targets[i][j]) * (row[j] - log_z) for j in range(b))
        return total / b

    columns = [[logits[i][j] for i in range(b)] for j in range(b)]
    return 0.5 * (ce(logits) + ce(columns))


# the loss ------------------------------------------------------------------------------------------------------


def test_loss_with_identity_targets_matches_a_manual_computation():
    image_emb, text_emb = _embeddings()
    logit_scale = torch.tensor(math.log(10.0))
    loss = clip_contrastive_loss(image_emb, text_emb, logit_scale)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(_manual_loss(image_emb, text_emb, 10.0, torch.eye(4)), rel=1e-5)
    # unique captions give the identity too; soft_targets=False ignores repeats
    assert clip_contrastive_loss(image_emb, text_emb, logit_scale, ["a", "b", "c", "d"]).item() == pytest.approx(
        loss.item()
    )
    assert clip_contrastive_loss(
        image_emb, text_emb, logit_scale, ["a", "a", "c", "c"], soft_targets=False
    ).item() == pytest.approx(loss.item())


def test_loss_matches_transformers_clip_loss(tokenizer):
    model = build_small_clip(image_size=16, patch_size=8, vision_width=16, text_width=16, heads=2, seed=0).eval()
    ids, _ = tokenize_prompts(tokenizer, ["a", "b c", "d e f"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.rand(3, 3, 16, 16), return_loss=True)
        ours = clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    torch.testing.assert_close(ours, out.loss)


def test_soft_targets_for_repeated_captions():
    targets = contrastive_targets(4, ["A bright blob", "a dark blob", "a  bright blob ", "one more"])
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    three = contrastive_targets(3, ["x"] * 3)
    torch.testing.assert_close(three, torch.full((3, 3), 1 / 3))
    torch.testing.assert_close(contrastive_targets(3, ["x"] * 3, soft_targets=False), torch.eye(3))
    torch.testing.assert_close(contrastive_targets(2), torch.eye(2))
    with pytest.raises(ValueError, match="captions"):
        contrastive_targets(3, ["x"])


def test_loss_with_soft_targets_matches_a_manual_computation():
    image_emb, text_emb = _embeddings(seed=1)
    captions = ["a", "b", "a", "c"]
    loss = clip_contrastive_loss(image_emb, text_emb, torch.tensor(math.log(20.0)), captions)
    expected = _manual_loss(image_emb, text_emb, 20.0, contrastive_targets(4, captions))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_identical_captions_are_not_pushed_apart():
    # two pairs with the same caption and identical embeddings: the soft-target loss reaches its minimum,
    # log 2 (the target's entropy), with zero gradient; the identity target keeps pushing them apart
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=1)
    image_emb, text_emb = e.clone().requires_grad_(True), e.clone()
    soft = clip_contrastive_loss(image_emb, text_emb, torch.tensor(math.log(100.0)), ["same", "same"])
    assert soft.item() == pytest.approx(math.log(2))
    (grad,) = torch.autograd.grad(soft, image_emb)
    assert grad.abs().max() < 1e-6
    hard = clip_contrastive_loss(image_emb, text_emb, torch.tensor(math.log(100.0)), ["same", "same"], False)
    assert hard.item() == pytest.approx(math.log(2))  # equal logits: the identity target is unreachable


def test_loss_decreases_as_embeddings_align():
    image_emb, noise = _embeddings(b=8, d=16, seed=2)
    losses = []
    for alignment in (0.0, 0.25, 0.5, 0.75, 1.0):
        text_emb = alignment * image_emb + (1 - alignment) * noise
        losses.append(clip_contrastive_loss(image_emb, text_emb, torch.tensor(math.log(5.0))).item())
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.1 * losses[0], losses


def test_temperature_is_clamped_at_100():
    image_emb, text_emb = _embeddings(seed=3)
    at_cap = clip_contrastive_loss(image_emb, text_emb, torch.tensor(math.log(100.0)))
    above = torch.tensor(math.log(500.0), requires_grad=True)
    loss = clip_contrastive_loss(image_emb, text_emb, above)
    torch.testing.assert_close(loss, at_cap)
    loss.backward()
    assert above.grad.item() == 0.0


def test_loss_refuses_mismatched_embeddings():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        clip_contrastive_loss(torch.rand(3, 4), torch.rand(3, 5), torch.tensor(1.0))


# engine integration ----------------------------------------------------------------------------------------------


def test_prepare_batch():
    batch = {"img": torch.rand(2, 1, 8, 8), "text": ("a", "b")}
    images, target, args, kwargs = ClipPrepareBatch("img", "text")(batch, torch.device("cpu"))
    assert images.shape == (2, 1, 8, 8)
    assert target == ["a", "b"] and args == () and kwargs == {"captions": ["a", "b"]}
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        ClipPrepareBatch("img", "text")({"img": torch.rand(3, 1, 8, 8), "text": ["a", "b"]})
    with pytest.raises(TypeError, match="one string"):
        ClipPrepareBatch("img", "text")({"img": torch.rand(1, 1, 8, 8), "text": "a"})


def test_logit_scale_is_learned(tokenizer):
    encoder = ClipEncoder(
        build_small_clip(image_size=16, patch_size=8, vision_width=16, text_width=16, heads=2), tokenizer
    )
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    assert any(p is encoder.logit_scale for p in encoder.parameters())
    before = encoder.logit_scale.item()
    loss = ClipContrastiveLoss()(encoder(torch.rand(4, 1, 16, 16), ["a", "b", "c", "a"]), ["a", "b", "c", "a"])
    loss.backward()
    assert encoder.logit_scale.grad is not None and encoder.logit_scale.grad.abs().item() > 0
    optimizer.step()
    assert encoder.logit_scale.item() != before


BRIGHTNESS = {"bright": 0.85, "dark": 0.35}
BLOB_SIGMA = {"small": 3.0, "large": 8.0}


def _blobs(n: int, seed: int) -> dict:
    """``n`` 32x32 slices of a centred Gaussian blob, captioned by its size and brightness (4 captions)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images, captions = [], []
    for i in range(n):
        size, brightness = list(BLOB_SIGMA)[i % 2], list(BRIGHTNESS)[(i // 2) % 2]
        blob = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * BLOB_SIGMA[size] ** 2))
        image = 0.1 + BRIGHTNESS[brightness] * blob + 0.03 * torch.randn(32, 32, generator=g)
        images.append(image.clamp(0, 1)[None])
        captions.append(f"a {size} {brightness} blob")
    return {"image": torch.stack(images), "caption": captions}


def test_supervised_trainer_learns_retrieval(tokenizer):
    """30 MONAI SupervisedTrainer iterations on 32 captioned blobs lift held-out Recall@1 from chance to near 1."""
    model = build_small_clip(
        image_size=32, patch_size=8, vision_width=32, text_width=32, vision_layers=2, text_layers=2, heads=2, seed=0
    )
    encoder = ClipEncoder(model, tokenizer)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=30,
        train_data_loader=[_blobs(32, seed=0)],
        network=encoder,
        optimizer=torch.optim.AdamW(encoder.parameters(), lr=3e-4, weight_decay=0.0),
        loss_function=ClipContrastiveLoss(),
        prepare_batch=ClipPrepareBatch(),
        decollate=False,
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    test = _blobs(32, seed=1)

    def recall() -> dict[str, float]:
        encoder.eval()
        with torch.no_grad():
            image_emb, text_emb = encoder.encode_images(test["image"]), encoder.encode_texts(test["caption"])
        return retrieval_recall_at_k(image_emb, text_emb, ks=(1,), captions=test["caption"])

    scale_before = encoder.logit_scale.item()
    before = recall()
    trainer.run()
    after = recall()
    chance = chance_recall_at_k(32, 1, test["caption"])
    assert chance == pytest.approx(0.25)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5, losses
    assert before["text_to_image_R@1"] <= 0.5, before
    assert after["text_to_image_R@1"] >= 0.75 and after["image_to_text_R@1"] >= 0.75, after
    assert encoder.logit_scale.item() != scale_before
