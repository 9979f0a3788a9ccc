"""Text-video data: moving-digit captions, the word-level tokens, the captioned sources
and their resumable pipeline, and `extract-latents --video --captions` round trips."""

import json

import numpy as np
import pytest
from absl import flags

from skipdit_jax import data
from skipdit_jax.data import text_video
from skipdit_jax.data.moving_digits import CAPTION_WORDS, motion_caption, moving_digits_source
from skipdit_jax.errors import ConfigError, UserError


# ---- captions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "velocity, direction",
    [
        ((-1, 0), "up"), ((2, 1), "down"), ((1, -2), "left"), ((-1, 2), "right"),
        ((-2, -2), "up and left"), ((1, 1), "down and right"), ((-1, 1), "up and right"), ((2, -2), "down and left"),
        ((0, 3), "right"), ((-3, -2), "up and left"),
    ],
)
def test_motion_caption_names_the_direction(velocity, direction):
    assert motion_caption(7, velocity) == f"a 7 moving {direction}"


def test_clip_captions_follow_their_motion_and_leave_clips_unchanged():
    src = moving_digits_source(split="train", num_frames=3, image_size=16, seed=5)
    captions = src.captions()
    assert captions == moving_digits_source(split="train", num_frames=3, image_size=16, seed=5).captions()
    assert len(set(captions)) == 80  # 10 digits x 8 directions
    for i in range(0, 200, 7):
        words = captions[i].split()
        assert words[:3] == ["a", str(int(src.labels[i])), "moving"] and set(words) <= set(CAPTION_WORDS)
        # The direction is the digit's first move when it does not bounce at once.
        (y0, x0), (y1, x1) = src.trajectory(i)[:2]
        vy, vx = src.motion(i)[1]
        if (y1 - y0, x1 - x0) == (vy, vx):
            assert captions[i] == motion_caption(src.labels[i], (y1 - y0, x1 - x0))
            assert ("up" in words) <= (y1 < y0) and ("left" in words) <= (x1 < x0)
    # The captioned source adds text, the clips stay those of the plain source.
    tsrc = text_video.TextMovingDigitsSource(split="train", num_frames=3, image_size=16, seed=5, text_len=8)
    for i in (0, 17):
        np.testing.assert_array_equal(tsrc[i]["image"], src[i]["image"])
        assert int(tsrc[i]["label"]) == int(src[i]["label"])


def test_word_tokens_follow_t5_conventions():
    out = text_video.tokenize_words(["a 7 moving up and right", "", "A Zebra"], max_length=8)
    vocab = text_video.WORD_VOCAB
    want = [vocab.index(w) for w in "a 7 moving up and right".split()] + [text_video.EOS_ID, 0]
    assert out["ids"][0].tolist() == want and out["mask"][0].tolist() == [1] * 7 + [0]
    assert out["ids"][1].tolist() == [1] + [0] * 7 and out["mask"][1].sum() == 1
    assert out["ids"][2, :3].tolist() == [vocab.index("a"), text_video.UNK_ID, text_video.EOS_ID]
    cut = text_video.tokenize_words(["a 7 moving up and right"], max_length=4)
    assert cut["ids"][0].tolist() == [vocab.index("a"), vocab.index("7"), vocab.index("moving"), 1]
    assert out["ids"].dtype == np.int32 and out["mask"].dtype == np.int32


def _fake_encode(width=6):
    """A deterministic stand-in text encoder: embeddings from the caption's word tokens."""

    def encode(prompts):
        tok = text_video.tokenize_words(prompts, 10)
        emb = np.sin(tok["ids"][..., None] * np.arange(1, width + 1)).astype(np.float32) * tok["mask"][..., None]
        return {"text_emb": emb, "text_mask": tok["mask"]}

    return encode


def test_text_moving_digits_records_and_exact_resume():
    emb_src = text_video.TextMovingDigitsSource(split="train", num_frames=4, image_size=16, text_len=8, encode=_fake_encode())
    src = text_video.TextMovingDigitsSource(split="train", num_frames=4, image_size=16, text_len=8)
    rec = src[3]
    assert rec["image"].shape == (4, 16, 16, 1)
    assert {k: rec[k].shape for k in text_video.TOKEN_KEYS} == {k: (8,) for k in text_video.TOKEN_KEYS}
    np.testing.assert_array_equal(rec["ids"], text_video.tokenize_words([src.captions[3]], 8)["ids"][0])
    rec = emb_src[3]
    np.testing.assert_array_equal(rec["image"], src[3]["image"])
    assert rec["text_emb"].shape == rec["null_emb"].shape == (10, 6) and rec["text_emb"].dtype == np.float32
    want = _fake_encode()([src.captions[3], ""])
    np.testing.assert_array_equal(rec["text_emb"], want["text_emb"][0])
    np.testing.assert_array_equal(rec["null_emb"], want["text_emb"][1])
    assert rec["text_mask"].dtype == np.int32 and rec["null_mask"].sum() == 1

    fields = {"image": np.float32, **{k: np.int32 for k in text_video.TOKEN_KEYS}}

    def iterator():
        return data.make_train_iterator(src, global_batch_size=4, seed=3, fields=fields, read_threads=1, prefetch_batches=1)

    it = iterator()
    next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    resumed = iterator()
    resumed.set_state(state)
    for a in rest:
        b = next(resumed)
        assert set(b) == set(fields) and b["ids"].shape == (4, 8)
        for k in fields:
            np.testing.assert_array_equal(a[k], b[k])


# ---- extract-latents --video --captions ----------------------------------------------------------
def _write_frames(folder, seed, n, h=16, w=20):
    from PIL import Image

    folder.mkdir(parents=True)
    frames = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:04d}.png")


def _tiny_t5(tmp_path, torch):
    """A SentencePiece tokenizer folder (pad 0, eos 1, unk 2) and a tiny random T5 v1.1
    encoder (vocabulary 144 >= the tokenizer's 40 + 100 extra ids) saved with save_pretrained, as Latte-1's tokenizer/ and text_encoder/."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    rng = np.random.default_rng(0)
    words = list(CAPTION_WORDS) + ["dog", "cat", "runs"]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(200)))
    (tmp_path / "tokenizer").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer" / "spiece"), vocab_size=40,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    torch.manual_seed(1)
    model = T5EncoderModel(T5Config(
        vocab_size=144, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "text_encoder")
    return tmp_path / "text_encoder", tmp_path / "tokenizer"


def test_extract_latents_with_captions_round_trip(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from skipdit_jax.commands import extract_latents
    from skipdit_jax.encoders.t5 import load_t5
    from skipdit_jax.encoders.text import encode_prompts, load_tokenizer

    t5_dir, tok_dir = _tiny_t5(tmp_path, torch)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    ).save_pretrained(tmp_path / "vae")
    _write_frames(tmp_path / "videos" / "v0", 0, 4)
    _write_frames(tmp_path / "videos" / "v1", 1, 5)
    (tmp_path / "caps.csv").write_text('video,caption\nv0,"a 3 moving left"\nv1,a 7 moving up and right\n')
    (tmp_path / "bad.json").write_text(json.dumps({"v0": "a 1 moving up"}))

    def run(*argv):
        fv = flags.FlagValues()
        extract_latents.define_flags(fv)
        return extract_latents.main(fv(["skipdit extract-latents", *argv])[1:], fv)

    common = ["--video", "--vae", str(tmp_path / "vae"), "--image_size", "8", "--num_frames", "2", "--frame_interval", "1",
              "--classes=false", "--flip=false", "--batch_size", "2", "--num_shards", "2", "--clips_per_video", "2"]
    with pytest.raises(UserError, match="no caption for 1 video"):
        run(str(tmp_path / "videos"), str(tmp_path / "x"), *common, "--captions", str(tmp_path / "bad.json"), "--t5", "t", "--tokenizer", "k")
    with pytest.raises(UserError, match="needs --t5"):
        run(str(tmp_path / "videos"), str(tmp_path / "x"), *common, "--captions", str(tmp_path / "caps.csv"))
    out = tmp_path / "latents"
    args = ["--captions", str(tmp_path / "caps.csv"), "--t5", str(t5_dir), "--tokenizer", str(tok_dir), "--text_len", "24"]
    assert run(str(tmp_path / "videos"), str(out), *common, *args) == 0
    assert "extracted 4 latents 2x8x8x4" in capsys.readouterr().out

    src = text_video.TextLatentSource(out)
    assert len(src) == 4 and (src.text_len, src.text_dim) == (24, 8)
    meta = src.latents.metadata
    assert meta["captions"] == ["a 3 moving left"] * 2 + ["a 7 moving up and right"] * 2
    t5_config, t5_params = load_t5(t5_dir)
    want = encode_prompts(["a 3 moving left", "a 7 moving up and right", ""], load_tokenizer(tok_dir), t5_config, t5_params, max_length=24)
    want = {k: np.asarray(v) for k, v in want.items()}
    # Write record k -> shard k % 2, read shard by shard: read order 0, 2, 1, 3.
    for read, video in zip(range(4), [0, 1, 0, 1]):
        rec = src[read]
        assert rec["image"].shape == (2, 8, 8, 4)
        n = int(want["text_mask"][video].sum())
        np.testing.assert_allclose(rec["text_emb"][:n], want["text_emb"][video][:n], atol=1e-5)  # other batches: last-bit differences
        assert not rec["text_emb"][n:].any()  # cut after the last real token, zeros on reading
        np.testing.assert_array_equal(rec["text_mask"], want["text_mask"][video])
        np.testing.assert_allclose(rec["null_emb"], want["text_emb"][2], atol=1e-5)
        np.testing.assert_array_equal(rec["null_mask"], want["text_mask"][2])
    # A record stores the embedding only up to its last real token.
    stored, n = src.latents[1], int(want["text_mask"][1].sum())
    assert 1 < n < 24 and stored["text_emb"].shape == (n, 8) and stored["text_mask"].tolist() == [1] * n
    # The plain reader still reads it, and latents without text refuse the text source.
    assert data.LatentSource(out)[0]["image"].shape == (2, 8, 8, 4)
    data.write_latents(tmp_path / "plain", [{"latent": np.zeros((2, 2, 2, 4)), "label": 0}])
    with pytest.raises(UserError, match="hold no text embeddings"):
        text_video.TextLatentSource(tmp_path / "plain")
    # Re-extraction over the text latents (null_text.npz included) needs --overwrite only.
    assert run(str(tmp_path / "videos"), str(out), *common, *args, "--overwrite") == 0


def test_read_captions_formats_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"file": "x.mp4", "text": "a 1 moving up"}]))
    assert text_video.read_captions(tmp_path / "a.json") == {"x.mp4": "a 1 moving up"}
    (tmp_path / "b.csv").write_text("name,prompt\nc/y.mp4,hello\n")
    table = text_video.read_captions(tmp_path / "b.csv")
    assert text_video.caption_for(tmp_path / "r" / "c" / "y.mp4", tmp_path / "r", table) == "hello"
    (tmp_path / "c.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(UserError, match="name column"):
        text_video.read_captions(tmp_path / "c.csv")
    with pytest.raises(ConfigError, match="token length"):
        text_video.tokenize_words(["a"], 0)
