"""Joint image-video training of Latte-T2V-skip (the official `use_image_num`): the joint
forward against the official-code reference's training branch, the video's output equal to
that of the video alone, the family's joint batch and null condition, captioned joint images
from the text sources, and two training steps through the trainer. Tiny shapes: 3 frames +
2 images of 4x4x4 latents, width 32, 4 pairs, captions of 5 tokens of width 16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_latte_t2v_reference import TorchLatteT2V, numpy_state_dict, randomize_

from skipdit_jax.convert import latte_t2v_from_torch
from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.models import family_of

B, F, I, L, C = 2, 3, 2, 5, 16


def _joint_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, F + I, 4, 4, 4)).astype(np.float32)
    text = rng.standard_normal((B, 1 + I, L, C)).astype(np.float32)  # row 0 the video's caption
    mask = np.ones((B, 1 + I, L), np.int32)
    mask[0, 0, 3:] = 0
    mask[1, 1, 1:] = 0
    mask[0, 2, 2:] = 0
    null_mask = np.zeros((B, L), np.int32)
    null_mask[:, 0] = 1
    cond = {
        "text_emb": text[:, 0], "text_mask": mask[:, 0],
        "null_emb": rng.standard_normal((B, L, C)).astype(np.float32), "null_mask": null_mask,
        "image_text_emb": text[:, 1:], "image_text_mask": mask[:, 1:],
    }
    return x, text, mask, cond


def test_joint_forward_parity_and_the_video_part_is_the_video_alone():
    torch.manual_seed(0)
    ref = randomize_(TorchLatteT2V(2, 16, 4, 4, 4, 2, C, F, long_skip=True), seed=0, scale=0.15).eval()
    config, params = latte_t2v_from_torch(numpy_state_dict(ref), num_heads=2, input_size=4, num_frames=F)
    family = family_of(dataclasses.replace(config, joint_images=I))
    x, text, mask, cond = _joint_inputs()
    t = np.array([700, 300])
    with torch.no_grad():
        want = ref.forward_joint(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.tensor(t), torch.tensor(text),
                                 torch.tensor(mask), use_image_num=I)
    want = want.numpy().transpose(0, 2, 3, 4, 1)

    apply = jax.jit(family.apply)
    got = np.asarray(apply(params, x, t, cond))
    assert got.shape == (B, F + I, 4, 4, 8)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)

    video_only = {k: v for k, v in cond.items() if not k.startswith("image_")}
    alone = np.asarray(apply(params, x[:, :F], t, video_only))
    np.testing.assert_array_equal(got[:, :F], alone)  # bit for bit
    # The images see their own captions: another caption changes an image, not the video.
    other = dict(cond, image_text_emb=cond["image_text_emb"][:, ::-1].copy())
    changed = np.asarray(apply(params, x, t, other))
    np.testing.assert_array_equal(changed[:, :F], alone)
    assert float(np.abs(changed[:, F:] - got[:, F:]).max()) > 1e-3

    # The null condition (caption dropout) gives every image the sample's null caption.
    null = family.null_condition(jax.tree.map(jnp.asarray, cond))
    assert null["image_text_emb"].shape == (B, I, L, C)
    np.testing.assert_array_equal(np.asarray(null["image_text_emb"][:, 1]), cond["null_emb"])
    np.testing.assert_array_equal(np.asarray(null["image_text_mask"][:, 0]), cond["null_mask"])
    dropped = family.drop_condition(jax.tree.map(jnp.asarray, cond), jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(dropped["image_text_emb"][1]), cond["image_text_emb"][1])

    spec = family.batch_spec(4)
    assert spec["image"].shape == (4, F + I, 4, 4, 4)
    assert spec["image_text_emb"].shape == (4, I, config.text_len, C) and spec["image_text_mask"].shape == (4, I, config.text_len)
    assert set(family.condition_from_batch({k: np.zeros(v.shape, v.dtype) for k, v in spec.items()})) == set(cond)
    assert "image_text_emb" not in family_of(config).batch_spec(1)
    family.check_condition(cond, B)
    with pytest.raises(UserError, match="image_text_emb must have shape"):
        family.check_condition(dict(cond, image_text_emb=text[:, 1:, :, :8]), B)
    with pytest.raises(UserError, match=r"num_frames 3 \+ 2 joint images"):
        family.module.apply({"params": params}, x[:, :4], t, text[:, 0], mask[:, 0], text[:, 1:], mask[:, 1:])


# ---- captioned joint images from the text sources, and two steps through the trainer -------------
N_CLIPS = 6


@pytest.fixture(scope="module")
def text_latents(tmp_path_factory):
    """Video latents (3, 4, 4, 4) with captions of up to 5 tokens of width 16, as written by
    `extract-latents --video --captions` (records cut after the last real token)."""
    from skipdit_jax.data import text_video, write_latents

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("t2v_latents") / "latents"

    def records():
        for i in range(N_CLIPS):
            n = 1 + i % L
            extras = {"text_emb": rng.standard_normal((n, C)).astype(np.float32), "text_mask": np.ones((n,), np.int32)}
            yield {"latent": rng.standard_normal((F, 4, 4, 4)).astype(np.float32), "label": 0, "extras": extras}

    null_emb, null_mask = np.zeros((L, C), np.float32), np.eye(1, L, dtype=np.int32)[0]
    write_latents(
        path, records(), metadata=dict(video=True, num_frames=F, image_size=32, num_classes=0, text_len=L, text_dim=C),
        extra_files={text_video.NULL_TEXT_FILE: text_video.encode_null_text(null_emb, null_mask)},
    )
    return path


def test_captioned_joint_images_from_the_sources(text_latents):
    from skipdit_jax import data
    from skipdit_jax.data import text_video
    from skipdit_jax.models import LatteT2VConfig

    src = text_video.TextLatentSource(text_latents)
    family = family_of(LatteT2VConfig(input_size=4, hidden_size=32, num_heads=2, depth=2, num_frames=F, caption_channels=C,
                                      text_len=L, joint_images=I))
    fields = {k: v.dtype for k, v in family.batch_spec(1).items()}

    def batches():
        it = data.make_train_iterator(src, global_batch_size=4, seed=3, fields=fields, images_per_video=I, read_threads=1,
                                      prefetch_batches=1)
        return [next(it) for _ in range(2)]

    first, again = batches(), batches()
    for a, b in zip(first, again):  # from the seed alone
        for k in fields:
            np.testing.assert_array_equal(a[k], b[k])
    batch = first[0]
    assert {k: v.shape for k, v in batch.items()} == {k: (4, *v.shape[1:]) for k, v in family.batch_spec(1).items()}
    # Every image is a frame of some record, captioned with that record's caption.
    records = [src[j] for j in range(N_CLIPS)]
    for row in range(4):
        for i in range(I):
            frame = batch["image"][row, F + i]
            owner = [r for r in records if any(np.array_equal(frame, f) for f in r["image"])]
            assert len(owner) == 1
            np.testing.assert_array_equal(batch["image_text_emb"][row, i], owner[0]["text_emb"])
            np.testing.assert_array_equal(batch["image_text_mask"][row, i], owner[0]["text_mask"])
    assert len({batch["image_text_mask"][r, i].sum() for r in range(4) for i in range(I)}) > 1  # not one caption

    # Captioned moving digits give embeddings too; token-only sources and others are refused.
    def encode(prompts):
        tok = text_video.tokenize_words(prompts, 6)
        return {"text_emb": np.sin(tok["ids"][..., None] * np.arange(1, 5)).astype(np.float32), "text_mask": tok["mask"]}

    digits = text_video.TextMovingDigitsSource(num_frames=2, image_size=8, text_len=6, encode=encode)
    rec = text_video.AppendCaptionedImages(digits, 3).random_map(digits[0], np.random.default_rng(1))
    assert rec["image"].shape == (5, 8, 8, 1)
    assert rec["image_text_emb"].shape == (3, 6, 4) and rec["image_text_mask"].shape == (3, 6)
    tokens = text_video.TextMovingDigitsSource(num_frames=2, image_size=8, text_len=6)
    with pytest.raises(ConfigError, match="caption embeddings"):
        text_video.AppendCaptionedImages(tokens, 1).random_map(tokens[0], np.random.default_rng(0))
    with pytest.raises(ConfigError, match="captioned source"):
        text_video.AppendCaptionedImages(records, 1)


def test_two_joint_steps_through_the_trainer(text_latents, tmp_path):
    """A 2-pair Latte-T2V-skip on the captioned latents with 2 joint images per video and
    caption dropout: the trainer reads joint batches, and the saved model records them."""
    import json

    from skipdit_jax.training import config as tc
    from skipdit_jax.training.train import train_and_evaluate

    c = tc.default_config()
    c.model.update(family="latte_t2v", depth=2, hidden_size=32, num_heads=2, patch_size=2, long_skip=True, caption_channels=C,
                   learn_sigma=False)  # eps-MSE: a smaller step to compile
    c.data.update(name="latents", path=str(text_latents), image_size=32, num_classes=0, flip=False, num_frames=F,
                  images_per_video=I, text_len=L)
    c.train.update(steps=2, global_batch_size=2, log_every=1, label_dropout=0.5)
    c.checkpoint.update(every=2, keep=1, async_save=False)
    c.evals.grid.every = 0
    c = tc.finalize(c)
    assert tc.model_config(c).joint_images == I
    r = train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    losses = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [m for m in losses if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in steps)
    assert int(r.state.step) == 2
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["joint_images"] == I
