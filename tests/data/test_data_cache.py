"""Latent + text-embedding cache: precompute, read back, and the `precompute` command."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.data.cache import (
    LatentCacheDataset,
    add_precompute_parser,
    collate_latents,
    is_latent_cache,
    precompute_cache,
)
from longgen.data.synthetic import write_synthetic_dataset
from longgen.data.video import VideoClipDataset, collate_clips


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return write_synthetic_dataset(root, num_videos=3, num_frames=12, height=32, width=32, seed=1)


@pytest.fixture(scope="module")
def wan():
    return build_tiny("wan")


def test_cache_returns_what_the_adapter_computes(wan, manifest, tmp_path):
    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, seed=4)
    out = tmp_path / "cache"
    precompute_cache(wan, dataset, out, batch_size=2, shard_size=2)  # batches and shards do not align
    assert is_latent_cache(out)
    assert sorted(n for n in os.listdir(out) if n.startswith("shard_")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    cache = LatentCacheDataset(out)
    assert len(cache) == len(dataset) == 3 and cache.cond_keys == ["encoder_hidden_states"]
    for i in range(len(dataset)):
        item = dataset[i]
        latents = wan.encode_video(item["video"][None])[0]
        cond = wan.encode_prompt([item["caption"]], do_classifier_free_guidance=False)[0]
        sample = cache[i]
        assert sample["caption"] == item["caption"]
        assert sample["latents"].shape == latents.shape == (wan.latent_channels, 3, 4, 4)
        torch.testing.assert_close(sample["latents"], latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sample["cond"]["encoder_hidden_states"], cond["encoder_hidden_states"][0])
    null = cache.null_cond()
    expected_null = wan.encode_prompt([""], do_classifier_free_guidance=False)[0]["encoder_hidden_states"][0]
    torch.testing.assert_close(null["encoder_hidden_states"], expected_null)

    batch = collate_latents([cache[0], cache[2]])
    assert batch["latents"].shape == (2, wan.latent_channels, 3, 4, 4)
    assert batch["cond"]["encoder_hidden_states"].shape[0] == 2
    # the batch feeds the adapter directly
    x0 = wan.denoise(batch["latents"], torch.full((2, 3), 0.5), batch["cond"])
    assert x0.shape == batch["latents"].shape


def test_unfinished_cache_is_refused(tmp_path):
    assert not is_latent_cache(tmp_path)
    with pytest.raises(FileNotFoundError, match="longgen precompute"):
        LatentCacheDataset(tmp_path)


def test_image_conditioned_cache_svd_and_per_frame_vae_encode(manifest, tmp_path):
    svd = build_tiny("svd")
    dataset = VideoClipDataset(manifest, num_frames=4, height=32, width=32, random_start=False)
    precompute_cache(svd, dataset, tmp_path / "svd", batch_size=2)
    cache = LatentCacheDataset(tmp_path / "svd")
    assert cache.cond_keys == ["added_time_ids", "encoder_hidden_states", "image_latents"]
    assert cache.null_cond() is None  # SVD has no text encoder
    video = collate_clips([dataset[1]])["video"]
    torch.testing.assert_close(cache[1]["latents"], svd.encode_video(video)[0], atol=1e-5, rtol=1e-5)

    # encode_video is the inverse of decode's latent scaling, per frame
    animatediff = build_tiny("animatediff")
    for adapter in (svd, animatediff):
        latents = adapter.encode_video(video)
        assert latents.shape == (1, 4, 4, 4, 4)
        vae = adapter.vae
        frame = video[0, 2].permute(2, 0, 1)[None] * 2 - 1  # [1, 3, H, W]
        direct = vae.encode(frame).latent_dist.mode() * vae.config.scaling_factor
        torch.testing.assert_close(latents[:, :, 2], direct, atol=1e-5, rtol=1e-5)
        assert adapter.decode(latents).shape == video.shape


def test_precompute_command(wan, manifest, tmp_path):
    model_dir = tmp_path / "model"
    wan.save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    add_precompute_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli_cache"
    args = parser.parse_args(
        ["precompute", "--model", str(model_dir), "--data", manifest, "--out", str(out), "--shard-size", "8"]
    )
    assert args.func(args) == 0
    cache = LatentCacheDataset(out)
    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, random_start=False)
    assert len(cache) == 3 and cache.family == "wan"
    latents = wan.encode_video(dataset[0]["video"][None])[0]
    torch.testing.assert_close(cache[0]["latents"], latents, atol=1e-5, rtol=1e-5)
    # a size the model cannot generate or train (40 is no multiple of VAE 8 x patch 2) is refused before encoding
    bad = tmp_path / "bad_cache"
    args = parser.parse_args(["precompute", "--model", str(model_dir), "--data", manifest, "--out", str(bad),
                              "--height", "40", "--width", "40"])
    with pytest.raises(ValueError, match="wan needs height and width divisible by 16 .* Use 32x32"):
        args.func(args)
    assert not bad.exists()


def test_index_records_the_schema_and_files_respect_the_umask(wan, manifest, tmp_path):
    import json

    from longgen.files import default_file_mode

    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, random_start=False)
    out = tmp_path / "cache"
    precompute_cache(wan, dataset, out, shard_size=2)
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 2 and index["family"] == "wan"
    assert index["num_frames"] == 9 and index["dtype"] == "fp32"
    cache = LatentCacheDataset(out)
    assert cache.num_frames == 9 and cache.dtype == "fp32"
    names = sorted(os.listdir(out))
    assert not [n for n in names if "tmp" in n]  # written under temporary names, renamed when complete
    for name in names:
        mode = os.stat(out / name).st_mode & 0o777
        assert mode == default_file_mode() and mode != 0o600, (name, oct(mode))


def test_cache_of_another_family_is_refused_naming_both(wan, manifest, tmp_path):
    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, random_start=False)
    precompute_cache(wan, dataset, tmp_path / "cache")
    assert len(LatentCacheDataset(tmp_path / "cache", family="wan")) == 3
    with pytest.raises(ValueError, match=r"'wan' model.*'ltx'.*longgen precompute"):
        LatentCacheDataset(tmp_path / "cache", family="ltx")


def test_version_1_caches_still_read(wan, manifest, tmp_path):
    import json

    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, random_start=False)
    index_path = precompute_cache(wan, dataset, tmp_path / "cache")
    index = json.loads(open(index_path).read())
    index["version"] = 1
    del index["num_frames"], index["dtype"]
    open(index_path, "w").write(json.dumps(index))
    cache = LatentCacheDataset(tmp_path / "cache")
    assert cache.num_frames is None and cache[0]["latents"].shape[0] == wan.latent_channels
    index["version"] = 7
    open(index_path, "w").write(json.dumps(index))
    with pytest.raises(ValueError, match="rebuild it with longgen precompute"):
        LatentCacheDataset(tmp_path / "cache")


def test_precompute_shows_a_progress_bar(wan, manifest, tmp_path, capsys):
    dataset = VideoClipDataset(manifest, num_frames=9, height=32, width=32, random_start=False)
    precompute_cache(wan, dataset, tmp_path / "quiet")
    assert "precompute" not in capsys.readouterr().err  # off by default for library calls
    precompute_cache(wan, dataset, tmp_path / "cache", show_progress=True)
    err = capsys.readouterr().err
    assert "precompute" in err and "3/3" in err
