"""HunyuanVideo adapter: stock parity, the per-frame timestep hook, and the encode -> denoise -> decode path."""

import numpy as np
import pytest
import torch

from longgen.backbones import cat_conds, load_adapter
from longgen.backbones.hunyuan_video import (
    PER_FRAME_HOOK,
    HunyuanVideoAdapter,
    has_per_frame_timesteps,
    remove_per_frame_timesteps,
    resolve_prompt_template,
    text_timestep,
)
from longgen.backbones.tiny import tiny_tokenizer
from longgen.schedules import ddim_step

PROMPTS = ["a red ball bouncing", "a cat in the city at night"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared CPU (20x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return HunyuanVideoAdapter.tiny_pipeline(seed=0)


@pytest.fixture
def adapter(pipe):
    """A fresh adapter over the shared tiny pipeline; per-frame hooks are taken off afterwards."""
    adapter = HunyuanVideoAdapter(pipe, native_video_size=HunyuanVideoAdapter.tiny_video_size)
    yield adapter
    remove_per_frame_timesteps(pipe.transformer)


def _latents(adapter, batch=2, seed=0):
    shape = adapter.latent_shape(*adapter.tiny_video_size, batch_size=batch)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _hooked_modules(model):
    return [
        n
        for n, m in model.named_modules()
        if PER_FRAME_HOOK in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
    ]


class _TokenLocalAttention:
    """Attention whose mixing matrix is the identity: each token sees only itself (value + output projections)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        video = attn.to_v(hidden_states)
        text = None
        if encoder_hidden_states is not None:
            text = (attn.add_v_proj if attn.add_v_proj is not None else attn.to_v)(encoder_hidden_states)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if text is not None and getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


# --- (a) save / load and parity with the stock model -------------------------------------------------
@torch.no_grad()
def test_saved_pipeline_loads_as_this_adapter_and_uniform_sigma_equals_the_stock_call(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    loaded = load_adapter(tmp_path)
    assert type(loaded) is HunyuanVideoAdapter
    assert loaded.native_video_size == HunyuanVideoAdapter.tiny_video_size
    assert loaded.prompt_template == adapter.prompt_template
    pipe = loaded.pipe

    # The pipeline's i-th step: its scheduler's timestep and sigma for the pipeline's default sigmas.
    num_steps, i = 8, 3
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    t, sigma = pipe.scheduler.timesteps[i], pipe.scheduler.sigmas[i]
    x = _latents(loaded)
    batch, num_frames = x.shape[0], x.shape[2]

    embeds, pooled, mask = pipe.encode_prompt(
        prompt=PROMPTS, prompt_template=loaded.prompt_template, max_sequence_length=loaded.max_sequence_length
    )
    velocity = pipe.transformer(
        hidden_states=x,
        timestep=t.expand(batch).to(x.dtype),
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask.to(embeds.dtype),
        pooled_projections=pooled,
        guidance=torch.tensor([6.0] * batch) * 1000.0,
        return_dict=False,
    )[0]
    expected = x - sigma * velocity

    cond, uncond = loaded.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert uncond is None
    x0 = loaded.denoise(x, torch.full((batch, num_frames), float(sigma)), cond)
    assert x0.dtype == torch.float32 and x0.shape == x.shape
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
    assert not has_per_frame_timesteps(pipe.transformer), "a uniform call must not need the hook"


def test_sigmas_are_the_pipelines_shifted_schedule(adapter):
    scheduler = adapter.pipe.scheduler
    assert scheduler.config.shift == 7.0
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 10 + 1)[:-1])
    torch.testing.assert_close(adapter.sigmas(10), scheduler.sigmas.float(), atol=1e-6, rtol=0)


def test_prompt_template_crop_keeps_exactly_the_prompt_tokens(adapter):
    tok = adapter.pipe.tokenizer
    template = adapter.prompt_template
    crop = template["crop_start"]
    ids = tok(template["template"].format(PROMPTS[1]))["input_ids"]
    prompt_ids = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    assert ids[crop : crop + len(prompt_ids)] == prompt_ids
    assert ids[crop - 1] != prompt_ids[0]
    # The tokenizer the template was written for (its <|...|> markers are tokens) keeps the shipped 95.
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    llama_like = tiny_tokenizer(vocab_size=64, bos=True, eos=False)
    llama_like.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    assert resolve_prompt_template(llama_like, DEFAULT_PROMPT_TEMPLATE)["crop_start"] == 95
    assert resolve_prompt_template(tok, DEFAULT_PROMPT_TEMPLATE)["crop_start"] == crop != 95


# --- (b) the per-frame timestep hook ------------------------------------------------------------------
def test_text_timestep_is_the_mean_and_exact_for_uniform_rows():
    t = torch.tensor([[123.456789] * 7, [100.0, 300.0, 200.0, 0.0, 400.0, 500.0, 600.0]])
    out = text_timestep(t)
    assert out[0].item() == t[0, 0].item()
    assert out[1].item() == pytest.approx(300.0)


@torch.no_grad()
def test_forced_per_frame_path_with_uniform_sigma_equals_the_stock_path(adapter):
    cond, _ = adapter.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    x = _latents(adapter)
    sigma = torch.full((x.shape[0], x.shape[2]), 0.63)
    stock = adapter.predict_velocity(x, sigma, cond)
    assert not has_per_frame_timesteps(adapter.model)
    adapter.force_per_frame_timesteps = True
    hooked = adapter.predict_velocity(x, sigma, cond)
    assert has_per_frame_timesteps(adapter.model), "the forced path must go through the hook"
    torch.testing.assert_close(hooked, stock, atol=1e-5, rtol=0)


@torch.no_grad()
def test_changing_one_frames_sigma_changes_the_model_output(adapter):
    cond, _ = adapter.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    x = _latents(adapter)
    sigma = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]]).repeat(2, 1)
    base = adapter.predict_velocity(x, sigma, cond)
    j = 2
    moved = sigma.clone()
    moved[:, j] = 0.95
    out = adapter.predict_velocity(x, moved, cond)
    change = (out - base).abs().amax(dim=(0, 1, 3, 4))  # per latent frame
    assert change[j] > 1e-2
    # Frame j's own embedding moves its tokens most; other frames move only through attention and text.
    assert change[j] > 2 * change[torch.arange(len(change)) != j].max()


@torch.no_grad()
def test_each_frame_gets_its_own_frames_embedding(adapter):
    """With token-local attention the model is per token, so frame f under per-frame sigmas must equal
    frame f of a uniform call at sigma_f; any mix-up of frames (order, F/T layout) breaks this."""
    model = adapter.model
    attns = {name: m for name, m in adapter.temporal_attention_modules()}
    saved = {name: m.processor for name, m in attns.items()}
    try:
        for m in attns.values():
            m.set_processor(_TokenLocalAttention())
        cond, _ = adapter.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        x = _latents(adapter)
        levels = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.2, 0.8, 0.4, 1.0, 0.0]])
        per_frame = adapter.predict_velocity(x, levels, cond)
        for f in range(levels.shape[1]):
            uniform = adapter.predict_velocity(x, levels[:, f : f + 1].expand_as(levels).contiguous(), cond)
            torch.testing.assert_close(per_frame[:, :, f], uniform[:, :, f], atol=1e-5, rtol=0)
            # The levels are far apart, so a wrong assignment would show.
            other = adapter.predict_velocity(
                x, levels[:, (f + 1) % 5 : (f + 1) % 5 + 1].expand_as(levels), cond
            )
            assert (other[:, :, f] - uniform[:, :, f]).abs().max() > 1e-2
        assert has_per_frame_timesteps(model)
    finally:
        for name, m in attns.items():
            m.set_processor(saved[name])


@torch.no_grad()
def test_hook_is_inert_between_calls_and_removal_restores_the_stock_model(adapter):
    model = adapter.model
    cond, _ = adapter.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    x = _latents(adapter)
    uniform = torch.full((x.shape[0], x.shape[2]), 0.4)
    before = adapter.predict_velocity(x, uniform, cond)
    varied = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]]).repeat(2, 1)
    adapter.predict_velocity(x, varied, cond)
    hooked = _hooked_modules(model)
    assert "" in hooked and "norm_out" in hooked and "single_transformer_blocks.1.proj_out" in hooked
    assert torch.equal(adapter.predict_velocity(x, uniform, cond), before), (
        "installed but inert must be stock"
    )
    adapter.remove_per_frame_hook()
    assert _hooked_modules(model) == []
    assert torch.equal(adapter.predict_velocity(x, uniform, cond), before)


def test_per_frame_gradients_survive_gradient_checkpointing(adapter):
    """Training path: the per-frame conditioning outlives the call, so recomputed blocks see it."""
    model = adapter.model
    cond, _ = adapter.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=False)
    x = _latents(adapter, batch=1)
    sigma = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]])

    def grads():
        model.zero_grad(set_to_none=True)
        adapter.denoise(x, sigma, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    try:
        checkpointed = grads()
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    assert plain.keys() == checkpointed.keys() and "transformer_blocks.0.norm1.linear.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_lora_added_after_the_hook_is_gated_per_frame():
    """PEFT wraps ``proj_out`` in a LoRA layer; the gate hook must move to the wrapper (base + delta)."""
    from peft import LoraConfig

    adapter = HunyuanVideoAdapter(HunyuanVideoAdapter.tiny_pipeline(seed=1))
    cond, _ = adapter.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    x = _latents(adapter)
    sigma = torch.full((x.shape[0], x.shape[2]), 0.5)
    adapter.force_per_frame_timesteps = True
    adapter.predict_velocity(x, sigma, cond)  # installs the hooks
    adapter.model.add_adapter(LoraConfig(r=4, target_modules=["proj_out", "to_q"], init_lora_weights=False))
    hooked = adapter.predict_velocity(x, sigma, cond)
    adapter.force_per_frame_timesteps = False
    stock = adapter.predict_velocity(x, sigma, cond)
    torch.testing.assert_close(hooked, stock, atol=1e-5, rtol=0)
    adapter.remove_per_frame_hook()
    assert _hooked_modules(adapter.model) == []


# --- (c) encode -> denoise -> decode -------------------------------------------------------------------
@torch.no_grad()
def test_encode_denoise_decode(adapter):
    num_frames, height, width = adapter.tiny_video_size
    cond, uncond = adapter.encode_prompt(
        PROMPTS, negative_prompt=["dark", "blue"], do_classifier_free_guidance=True
    )
    both = cat_conds([uncond, cond])
    assert both["encoder_hidden_states"].shape[0] == 4 and both["guidance"].tolist() == [6000.0] * 4
    x = _latents(adapter)
    batch, num_latent = x.shape[0], x.shape[2]
    sigmas = adapter.sigmas(3)
    # A diagonal (FIFO-like) plan: later frames noisier, so the per-frame path runs.
    offsets = torch.linspace(0.0, 0.3, num_latent)
    x = x * 1.0
    for k in range(len(sigmas) - 1):
        s = (sigmas[k] - offsets * (sigmas[k] - sigmas[k + 1])).clamp(0, 1).expand(batch, -1)
        s_next = sigmas[k + 1].expand(batch, num_latent)
        x0_u, x0_c = adapter.denoise(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
        x0 = x0_u + 2.0 * (x0_c - x0_u)
        x = ddim_step(x, x0, s[:, None, :, None, None], s_next[:, None, :, None, None])
    frames = adapter.decode(x)
    assert (
        frames.shape
        == (batch, 4 * (num_latent - 1) + 1, height, width, 3)
        == (2, num_frames, height, width, 3)
    )
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    assert frames.min() >= 0.0 and frames.max() <= 1.0 and frames.std() > 0


def test_declared_modules_and_layout(adapter):
    model = adapter.model
    assert adapter.rope_module() is model.rope
    assert adapter.rope_config() == {"temporal_dim": 4, "base": 256.0, "train_latent_frames": 33}
    names = [n for n, _ in adapter.temporal_attention_modules()]
    assert names == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    module_names = [n for n, _ in model.named_modules()]
    for target in adapter.lora_target_modules:
        assert any(n.endswith(target) for n in module_names), target
    assert adapter.patch_size == (1, 2, 2) and adapter.num_latent_frames(129) == 33
    assert adapter.latent_shape(17, 32, 48) == (1, 4, 5, 4, 6)
    with pytest.raises(ValueError, match="4k\\+1"):
        adapter.latent_shape(16, 32, 32)
    with pytest.raises(ValueError, match="sigma must be"):
        adapter.denoise(_latents(adapter), torch.zeros(2, 3), {})
