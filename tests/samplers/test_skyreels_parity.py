"""longgen's diffusion forcing vs diffusers' ``SkyReelsV2DiffusionForcingPipeline`` on a tiny SkyReels-V2.

Same model, noise, steps, ``ar_step``, ``causal_block_size``, overlap history and ``addnoise_condition``;
longgen runs the model through :class:`~longgen.backbones.skyreels_v2.SkyReelsV2Adapter` and steps every
latent frame with its own copy of the pipeline's UniPC scheduler, as the pipeline does.

One difference is deliberate. The pipeline (like the official SkyReels-V2 code) passes UniPC a *view*
``latents[:, :, idx]`` as ``sample`` and then writes the result into that view in place. UniPC keeps
``sample`` as ``last_sample`` whenever its corrector did not run, i.e. after each frame's first step, so the
write overwrites it: at each frame's second step the UniC corrector gets the predictor's output where it
needs the sample before the predictor. longgen hands the scheduler a copy (the solver as written). So:

* with the corrector disabled (``disable_corrector`` = every step) nothing reads ``last_sample`` and the
  two agree to float error;
* with the stock scheduler they agree to float error once longgen's scheduler reproduces the aliasing
  (a test-local subclass below), and differ measurably without it.
"""

import pytest
import torch

from longgen.backbones.skyreels_v2 import SkyReelsV2Adapter
from longgen.samplers import sample_diffusion_forcing, scheduler_sigmas

NUM_STEPS = 5
BASE_FRAMES, OVERLAP_FRAMES, NUM_FRAMES = 13, 5, 29  # pixel frames -> 4, 2 and 8 latent frames (3 chunks)
BASE_LATENT, OVERLAP_LATENT, NUM_LATENT = 4, 2, 8
HEIGHT = WIDTH = 32
AR_STEP, BLOCK, ADDNOISE = 1, 2, 20.0


@pytest.fixture(scope="module")
def adapter():
    adapter = SkyReelsV2Adapter(SkyReelsV2Adapter.tiny_pipeline(seed=0))
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


def _pipeline_noise(channels: int, seed: int) -> torch.Tensor:
    """The noise the pipeline draws from ``generator`` chunk by chunk, as one ``[1, C, F, h, w]`` tensor of
    the frames it keeps: all of chunk 0, then each later chunk minus its (overwritten) history frames."""
    g = torch.Generator().manual_seed(seed)
    h, w = HEIGHT // 8, WIDTH // 8
    parts = [torch.randn(1, channels, BASE_LATENT, h, w, generator=g)]
    num_chunks = (
        1 + (NUM_LATENT - BASE_LATENT - 1) // (BASE_LATENT - OVERLAP_LATENT) + 1
    )  # the pipeline's n_iter
    for k in range(1, num_chunks):
        length = min(NUM_LATENT - k * (BASE_LATENT - OVERLAP_LATENT), BASE_LATENT)
        parts.append(torch.randn(1, channels, length, h, w, generator=g)[:, :, OVERLAP_LATENT:])
    noise = torch.cat(parts, dim=2)
    assert noise.shape[2] == NUM_LATENT
    return noise


def _run_both(adapter, scheduler, longgen_solver, guidance_scale=1.0):
    pipe = adapter.pipe
    pipe.scheduler = scheduler
    cond, uncond = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=guidance_scale > 1)
    negative = uncond["encoder_hidden_states"] if uncond is not None else None

    torch.manual_seed(123)  # addnoise_condition noise: both draw it from the global RNG, in the same order
    reference = pipe(
        prompt=None,
        prompt_embeds=cond["encoder_hidden_states"],
        negative_prompt_embeds=negative,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        overlap_history=OVERLAP_FRAMES,
        addnoise_condition=ADDNOISE,
        base_num_frames=BASE_FRAMES,
        ar_step=AR_STEP,
        causal_block_size=BLOCK,
    ).frames

    sigmas = scheduler_sigmas(scheduler, NUM_STEPS)
    adapter.set_causal_block_size(BLOCK)
    adapter.match_scheduler_timesteps(_set(scheduler))  # the pipeline feeds UniPC's int64 timesteps
    adapter.force_per_frame_timesteps = True  # the DF pipeline always passes (B, F) timesteps

    def denoise(x, sigma, frame_offset=0):
        if guidance_scale == 1.0:
            return adapter.denoise(x, sigma, cond)
        # two passes like the pipeline; guidance on x0 equals guidance on velocity at fixed x and sigma
        x0_c, x0_u = adapter.denoise(x, sigma, cond), adapter.denoise(x, sigma, uncond)
        return x0_u + guidance_scale * (x0_c - x0_u)

    noise = _pipeline_noise(adapter.latent_channels, seed=7) / sigmas[0]  # the pipeline starts at x = noise
    torch.manual_seed(123)
    ours = sample_diffusion_forcing(
        denoise,
        noise,
        sigmas,
        base_num_latent_frames=BASE_LATENT,
        ar_step=AR_STEP,
        causal_block_size=BLOCK,
        overlap_history=OVERLAP_LATENT,
        addnoise_condition=ADDNOISE,
        solver=longgen_solver,
        disable=True,
    )
    adapter.timestep_table, adapter.force_per_frame_timesteps = None, False
    return reference, ours


def _set(scheduler):
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def _unipc(**overrides):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=8.0,
        num_train_timesteps=1000,
        **overrides,
    )


def _aliasing_unipc():
    """UniPC as the pipeline's in-place write leaves it: ``last_sample`` overwritten by the step's output
    whenever it is the caller's ``sample`` tensor (the steps where the corrector did not run)."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class AliasingUniPC(UniPCMultistepScheduler):
        def step(self, model_output, timestep, sample, return_dict=True):
            out = super().step(model_output, timestep, sample, return_dict=False)
            if self.last_sample is sample:
                self.last_sample = out[0]
            return out if not return_dict else SchedulerOutput(prev_sample=out[0])

    return AliasingUniPC.from_config(_unipc().config)


def test_parity_without_corrector(adapter):
    scheduler = _unipc(disable_corrector=list(range(NUM_STEPS)))
    reference, ours = _run_both(adapter, scheduler, scheduler)
    assert ours.shape == reference.shape == (1, adapter.latent_channels, NUM_LATENT, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def test_parity_with_stock_unipc_up_to_the_pipelines_aliasing(adapter):
    scheduler = _unipc()
    reference, ours_aliasing = _run_both(adapter, scheduler, _aliasing_unipc())
    torch.testing.assert_close(ours_aliasing, reference, atol=2e-5, rtol=1e-5)
    _, ours = _run_both(adapter, _unipc(), _unipc())
    assert (ours - reference).abs().max() > 1e-3  # the corrected solver really differs


def test_parity_with_classifier_free_guidance(adapter):
    scheduler = _unipc(disable_corrector=list(range(NUM_STEPS)))
    reference, ours = _run_both(adapter, scheduler, scheduler, guidance_scale=6.0)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def test_long_samplers_run_on_the_adapter(adapter):
    """The same tiny model through FIFO and the rolling-window diffusion forcing: requested length, finite."""
    from longgen.samplers import sample_fifo

    adapter.set_causal_block_size(1)
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)

    def denoise(x, sigma, frame_offset=0):
        return adapter.denoise(x, sigma, cond)

    noise = torch.randn(
        1, adapter.latent_channels, 7, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        fifo = sample_fifo(denoise, noise, adapter.sigmas(4), window=2, num_partitions=2, disable=True)
        rolling = sample_diffusion_forcing(
            denoise, noise, adapter.sigmas(4), base_num_latent_frames=4, ar_step=1, disable=True
        )
    for out in (fifo, rolling):
        assert out.shape == noise.shape and out.isfinite().all()
