"""Training from the latent cache (``longgen precompute``) equals training from the videos, without the
text encoder: it is freed after the validation prompt is encoded once."""

from __future__ import annotations

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.data.cache import precompute_cache
from longgen.data.synthetic import write_synthetic_dataset
from longgen.data.video import VideoClipDataset
from longgen.training.config import load_config
from longgen.training.loop import Trainer


def _lora(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "final" / "pytorch_lora_weights.safetensors")


def test_cache_training_matches_video_training_and_frees_the_text_encoder(tmp_path):
    clips = write_synthetic_dataset(tmp_path / "clips", num_videos=4, num_frames=9, height=32, width=32)
    adapter = build_tiny("wan", seed=0)
    model_dir = tmp_path / "model"
    adapter.save_pretrained(model_dir)
    dataset = VideoClipDataset(clips, num_frames=9, height=32, width=32, random_start=False)
    cache = precompute_cache(adapter, dataset, tmp_path / "cache", batch_size=2)  # its index.json: accepted too

    common = [
        f"model.path={model_dir}",
        f"data.source={clips}",
        "data.num_frames=9",
        "data.random_start=false",
        "train.batch_size=2",
        "train.steps=3",
        "lora.rank=4",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
    ]  # fmt: skip

    videos = Trainer(load_config(None, [*common, f"train.output_dir={tmp_path / 'videos'}"]))
    try:
        assert videos.adapter.pipe.text_encoder is not None
        from_videos = videos.train()
    finally:
        videos.close()

    cached = Trainer(
        load_config(
            None,
            [
                *common,
                f"data.cache_dir={cache}",
                f"train.output_dir={tmp_path / 'cached'}",
                "validation.every=3",
                "validation.steps=2",
                "validation.num_frames=9",
            ],
        )
    )
    try:
        assert cached.adapter.pipe.text_encoder is None  # freed: embeddings come from the cache
        prompt = cached.config.validation.prompt
        want = adapter.encode_prompt([prompt], [""], do_classifier_free_guidance=True)
        # The validation prompt is encoded once into an explicit prompt source; the adapter is not patched.
        assert "encode_prompt" not in cached.adapter.__dict__
        got = cached.prompts([prompt], [""], do_classifier_free_guidance=True)
        for w, g in zip(want, got):
            torch.testing.assert_close(g["encoder_hidden_states"], w["encoder_hidden_states"])
        with pytest.raises(RuntimeError, match="data.cache_dir"):
            cached.prompts(["another prompt"], [""])
        from_cache = cached.train()
    finally:
        cached.close()

    assert from_cache.losses == pytest.approx(from_videos.losses, abs=1e-5)
    assert len(from_cache.validation_videos) == 1
    from longgen.io import read_video

    assert read_video(from_cache.validation_videos[0]).shape[0] == 9
    want_lora, got_lora = _lora(tmp_path / "videos"), _lora(tmp_path / "cached")
    assert want_lora.keys() == got_lora.keys()
    for key in want_lora:
        torch.testing.assert_close(got_lora[key], want_lora[key], atol=1e-5, rtol=0, msg=key)
