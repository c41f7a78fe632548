"""Host memory that does not grow with the clip (issue 16.6, longgen.memory): the allocator policy `longgen
generate` sets serves large buffers from their own mappings (so freed ones go back to the OS), and it changes no
output bit. Both run in one fresh subprocess: the policy is process-wide."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longgen.memory import bound_heap_retention, heap_info

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from longgen.cli import main
    from longgen.memory import heap_info

    model, out = sys.argv[1], sys.argv[2]
    assert main(["generate", "--model", model, "--num-frames", "21", "--height", "256", "--width", "256",
                 "--sampler", "sliding", "--steps", "1", "--seed", "3", "--quiet", "--save-latents", "--out", out]) == 0
    print(json.dumps(heap_info()))
    """
)


def _generate(saved, path, allocator: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["LONGGEN_ALLOCATOR"] = allocator
    out = subprocess.run([sys.executable, "-c", _CHILD, saved("wan"), str(path)], check=True, capture_output=True,
                         text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def test_bad_threshold_and_opt_out(monkeypatch):
    with pytest.raises(ValueError, match="positive number of bytes"):
        bound_heap_retention(0)
    monkeypatch.setenv("LONGGEN_ALLOCATOR", "default")
    assert bound_heap_retention() is None  # the stock policy on request: nothing changed


@pytest.mark.slow
@pytest.mark.skipif(not heap_info(), reason="glibc >= 2.33 (mallinfo2) needed to observe the policy")
def test_generate_keeps_no_freed_heap_and_changes_no_output(saved, tmp_path):
    """The same generate with glibc's stock policy and with longgen's: the stock one ends holding freed
    activations in its heap, longgen's does not; latents and mp4 are the same bytes."""
    from safetensors.torch import load_file

    stock = _generate(saved, tmp_path / "stock.mp4", "default")
    bounded = _generate(saved, tmp_path / "bounded.mp4", "bounded")
    assert bounded["free"] < 0.3 * stock["free"]
    latents = [load_file(str(tmp_path / f"{n}.latents.safetensors"))["latents"] for n in ("stock", "bounded")]
    assert torch.equal(*latents)
    assert (tmp_path / "stock.mp4").read_bytes() == (tmp_path / "bounded.mp4").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["df", "fifo", "causal", "sliding"])
def test_streamed_generate_holds_one_decoded_block_at_a_time(saved, tmp_path, monkeypatch, sampler):
    """What `longgen generate` holds per frame, structurally: each decoded pixel block is gone (written to the
    mp4, not kept by the sink, the decoder or the writer) before the next one is decoded, and for a streaming
    sampler the decoder's latent buffer stays within one chunk, its context and one pushed window, however
    long the clip (a non-streaming sampler hands over the whole clip's latents at once, by design)."""
    import gc
    import weakref

    from longgen.backbones.base import StreamingDecoder
    from longgen.pipeline import LongVideoPipeline
    from longgen.samplers import SamplerContext, get_sampler, options_for_steps

    blocks, buffered, alive = [], [], []
    original = StreamingDecoder._decode

    def decode(self, end):
        gc.collect()
        alive.append(sum(ref() is not None for ref in blocks))
        buffered.append(self._buffer.shape[2])
        frames = original(self, end)
        blocks.append(weakref.ref(frames))
        return frames

    monkeypatch.setattr(StreamingDecoder, "_decode", decode)
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    native = pipe.adapter.num_latent_frames(pipe.adapter.native_video_size[0])
    num_latent = native * 8
    options, steps = options_for_steps(sampler, 1, SamplerContext(native, num_latent))  # fifo: its fewest steps
    result = pipe.generate("a ball", num_frames=pipe.adapter.num_pixel_frames(num_latent), num_inference_steps=steps,
                           sampler=sampler, sampler_options=options, seed=0, output_path=tmp_path / "o.mp4",
                           show_progress=False, decode_chunk_latent_frames=2)
    assert result.latents.shape[2] == num_latent
    assert len(blocks) >= num_latent // 2  # the clip went through the decoder chunk by chunk
    assert max(alive) == 0, f"{max(alive)} earlier decoded blocks still alive at a decode"
    if get_sampler(sampler).streams:  # chunk 2 + the causal VAE's 2 context frames + one window of `native`
        assert max(buffered) <= 2 + 2 + native, buffered
