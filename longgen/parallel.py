"""Several processes on one clip: context parallel (Ulysses, ring) and windows spread over ranks.

What diffusers 0.42 provides and longgen uses as is: ``ContextParallelConfig`` + ``ModelMixin.enable_parallelism``
shard a model's token sequence by its ``_cp_plan`` (Wan and LTX among longgen's families; longgen's adapters
may extend the plan, :meth:`~longgen.backbones.BackboneAdapter.context_parallel_plan`), and its Ulysses
all-to-all attention runs with the native SDPA backend on CPU / gloo. Its ring attention
(``TemplatedRingAttention``, which rotates K/V with an all-gather) needs a kernel that returns the log-sum-exp:
flash, cuDNN, sage (CUDA, bf16/fp16 only); the native backend refuses ``return_lse``, so diffusers' ring cannot
run on CPU or in fp32.

What this module adds:

* :func:`ring_attention`: ring attention of our own (Liu et al. 2023, "Ring Attention with Blockwise
  Transformers"): each rank keeps its query block, K/V blocks travel around the ring by point-to-point
  send/recv (overlapped with the block's compute), and the blocks' results are merged by the online softmax
  (running log-sum-exp) in fp32; the backward pass sends K/V around again with their gradient accumulators, so
  each block's dK/dV arrives back at its owner. Equal to dense SDPA to float rounding, forward and backward.
* :func:`enable_context_parallel`: diffusers' CP with that ring plugged into the native backend whenever a model
  runs with ``ring_degree > 1`` (other backends keep diffusers' own ring).
* Windows over ranks: the windows of one sampler step (``sliding``, ``fifo``) are independent; with
  :func:`spread_windows` each rank denoises a contiguous share of them and the results are broadcast, so every
  rank holds every window (the FIFO-Diffusion paper runs its windows on separate GPUs).
* :class:`GenerationParallel`: ``longgen generate --context-parallel ulysses|ring|windows`` under torchrun.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CONTEXT_PARALLEL_MODES = ("ulysses", "ring", "windows")
"""``--context-parallel`` values: split each model call's tokens (Ulysses, ring) or spread the windows."""

CP_FAMILIES_HINT = "Wan / Wan 2.2 and LTX-Video have a diffusers context-parallel plan"


# --- ring attention -------------------------------------------------------------------------------
def _ring_peers(group) -> tuple[int, int]:
    """Global ranks of the next and the previous process in ``group``'s ring."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)


def _start_rotation(tensors: list[torch.Tensor], group):
    """Send ``tensors`` to the next rank and receive the previous rank's (asynchronously, one buffer).

    Returns ``wait() -> list[torch.Tensor]``: the received tensors, shaped as the sent ones.
    """
    next_rank, prev_rank = _ring_peers(group)
    flat = torch.cat([t.reshape(-1) for t in tensors]).contiguous()
    received = torch.empty_like(flat)
    ops = [dist.P2POp(dist.isend, flat, next_rank, group), dist.P2POp(dist.irecv, received, prev_rank, group)]
    requests = dist.batch_isend_irecv(ops)

    def wait() -> list[torch.Tensor]:
        for request in requests:
            request.wait()
        return [piece.view_as(t) for piece, t in zip(received.split([t.numel() for t in tensors]), tensors)]

    return wait


def _block_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)


class _RingAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over the whole ring's keys; q, k, v fp32 ``(B, H, S_local, D)``."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, group):
        world = dist.get_world_size(group)
        out = lse = None
        kv = [k, v]
        for step in range(world):
            wait = _start_rotation(kv, group) if step < world - 1 else None
            scores = _block_scores(q, kv[0], scale)
            block_lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
            block_out = torch.matmul(torch.exp(scores - block_lse[..., None]), kv[1])
            if out is None:
                out, lse = block_out, block_lse
            else:  # online softmax: rescale both partial results to the merged normaliser
                merged = torch.logaddexp(lse, block_lse)
                out = out * torch.exp(lse - merged)[..., None] + block_out * torch.exp(block_lse - merged)[..., None]
                lse = merged
            if wait is not None:
                kv = wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, group = ctx.scale, ctx.group
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, Sq, 1): rowsum(dO * O)
        grad_q = torch.zeros_like(q)
        # K/V travel with the accumulators of their gradients; after world_size hops each is home again.
        travelling = [k, v, torch.zeros_like(k), torch.zeros_like(v)]
        for _ in range(dist.get_world_size(group)):
            k_block, v_block, grad_k, grad_v = travelling
            probs = torch.exp(_block_scores(q, k_block, scale) - lse[..., None])
            grad_scores = probs * (torch.matmul(grad_out, v_block.transpose(-1, -2)) - delta)
            grad_q = grad_q + torch.matmul(grad_scores, k_block) * scale
            grad_k = grad_k + torch.matmul(grad_scores.transpose(-1, -2), q) * scale
            grad_v = grad_v + torch.matmul(probs.transpose(-1, -2), grad_out)
            travelling = _start_rotation([k_block, v_block, grad_k, grad_v], group)()
        return grad_q, travelling[2], travelling[3], None, None


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the keys of every rank in ``group`` (diffusers' layout).

    ``query``/``key``/``value`` ``(B, S_local, H, D)``: this rank's share of the sequence, as diffusers'
    attention backends receive it. Computed in fp32 and returned in ``query``'s dtype; differentiable.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.permute(0, 2, 1, 3).float().contiguous() for t in (query, key, value))  # (B, H, S, D)
    out = _RingAttention.apply(q, k, v, scale, group)
    return out.permute(0, 2, 1, 3).to(query.dtype)


_NATIVE_ORIGINAL: dict[str, Callable[..., Any]] = {}


def gathered_key_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                           group, scale: float | None = None) -> torch.Tensor:
    """Masked attention of this rank's queries over every rank's keys, by all-gathering K, V and the mask.

    The all-gather fallback for masked calls under context parallel (LTX-Video's cross-attention shards the text
    and its padding mask; diffusers' Ulysses does not reshard a mask and its ring needs a GPU kernel). K/V are
    gathered whole, so memory is that of the keys: meant for short key sequences such as text. ``attn_mask``:
    boolean or additive, its last dimension over this rank's keys ``(B, S_k_local)`` or ``(..., S_k_local)``.
    Differentiable (``torch.distributed.nn`` all-gather: the backward reduce-scatters the K/V gradients).
    """
    from torch.distributed.nn.functional import all_gather

    if attn_mask.shape[-1] != key.shape[1]:
        raise ValueError(f"context parallel: an attention mask of shape {tuple(attn_mask.shape)} is not over the "
                         f"{key.shape[1]} local keys; only key-padding masks can be sharded")
    key, value = (torch.cat(all_gather(t.contiguous(), group=group), dim=1) for t in (key, value))
    masks = [torch.empty_like(attn_mask) for _ in range(dist.get_world_size(group))]
    dist.all_gather(masks, attn_mask.contiguous(), group=group)
    mask = torch.cat(masks, dim=-1)
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask  # (B, S_k) -> (B, 1, 1, S_k) for SDPA
    out = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (query, key, value)), attn_mask=mask, scale=scale
    )  # (B, H, S_q, D)
    return out.transpose(1, 2)


def _native_attention_with_ring(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                enable_gqa=False, return_lse=False, _parallel_config=None):
    """diffusers' native backend, with longgen's kernels where diffusers' context parallel cannot run on it.

    A ring (``ring_degree > 1``) runs :func:`ring_attention`; a masked call under any context parallel runs
    :func:`gathered_key_attention`; everything else goes to diffusers' own native function unchanged.
    """
    cp = None if _parallel_config is None else _parallel_config.context_parallel_config
    if cp is None or (cp.ring_degree == 1 and attn_mask is None):
        return _NATIVE_ORIGINAL["native"](
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config,
        )
    unsupported = {"is_causal": is_causal, "dropout_p": bool(dropout_p), "enable_gqa": enable_gqa,
                   "return_lse": return_lse,
                   "ring with ulysses_degree > 1": cp.ring_degree > 1 and cp.ulysses_degree > 1 and attn_mask is None}
    if any(unsupported.values()):
        names = ", ".join(name for name, used in unsupported.items() if used)
        raise ValueError(
            f"longgen's context-parallel attention (native backend) does not support {names}; use a ring_degree "
            "of 1, or a GPU attention backend that returns the LSE (flash, _native_cudnn) for diffusers' own ring"
        )
    if attn_mask is not None:
        return gathered_key_attention(query, key, value, attn_mask, cp._flattened_mesh.get_group(), scale)
    return ring_attention(query, key, value, cp._ring_mesh.get_group(), scale)


def install_ring_attention() -> None:
    """Route diffusers' native backend through :func:`_native_attention_with_ring` (process-wide, idempotent).

    Calls that are not context parallel, and unmasked Ulysses calls, go to diffusers' own native function unchanged, so installing it
    changes nothing else. diffusers has no public way to add a backend; this replaces one registry entry.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backends = _AttentionBackendRegistry._backends
    if "native" not in _NATIVE_ORIGINAL:
        _NATIVE_ORIGINAL["native"] = backends[AttentionBackendName.NATIVE]
    backends[AttentionBackendName.NATIVE] = _native_attention_with_ring


# --- diffusers context parallel -------------------------------------------------------------------
def _attention_backend(model: torch.nn.Module) -> str:
    """The backend name the model's attention processors use ('native' when unset)."""
    for module in model.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return "native"


def check_heads(model: torch.nn.Module, ulysses_degree: int, what: str = "ulysses degree") -> None:
    """Ulysses gives each rank ``heads / degree`` whole heads: the degree must divide the head count."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if ulysses_degree > 1 and heads is not None and heads % ulysses_degree:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ValueError(
            f"{what} {ulysses_degree} does not divide the {heads} attention heads of {type(model).__name__}: "
            f"use a degree among {divisors or '(none: the model has 1 head)'}, or ring attention (any head count)"
        )


def check_token_split(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int], degree: int,
                      what: str = "context-parallel degree") -> None:
    """diffusers shards a model call's token sequence (frames x rows x columns after patching) into ``degree``
    equal parts: the degree must divide it. ``latent_shape`` ``(..., F, H, W)``; a clear error names the fix."""
    num_latent_frames, height, width = latent_shape[-3:]
    grid = (num_latent_frames // patch_size[0], height // patch_size[1], width // patch_size[2])
    tokens = grid[0] * grid[1] * grid[2]
    if degree > 1 and tokens % degree:
        raise ValueError(
            f"{what} {degree} does not divide the {num_latent_frames} latent frames of a model call "
            f"({grid[0]} x {grid[1]} x {grid[2]} = {tokens} tokens, split evenly over the processes): pick a "
            f"--window / --num-frames (or data.num_frames) whose latent frame count is a multiple of {degree}, "
            "or launch a number of processes that divides it"
        )


def check_sharded_inputs(model: torch.nn.Module, plan: dict, degree: int, what: str) -> Any:
    """A forward pre-hook: the model inputs the plan shards at the root (LTX: ``encoder_hidden_states`` and its
    mask, text tokens) must split evenly, else a clear error instead of diffusers' assertion. Returns the handle."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    root = {name: spec for name, spec in (plan.get("") or {}).items()
            if isinstance(name, str) and isinstance(spec, ContextParallelInput)}

    def check(module, args, kwargs):
        for name, spec in root.items():
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim == spec.expected_dims and value.shape[spec.split_dim] % degree:
                raise ValueError(
                    f"{what} {degree} does not divide the model input {name} along dimension {spec.split_dim} "
                    f"(size {value.shape[spec.split_dim]}, shape {tuple(value.shape)}), which the context-parallel "
                    f"plan splits over the processes: launch a number of processes that divides it"
                    + (" (for text: a prompt length / max sequence length that it divides)" if "encoder" in name else "")
                )

    return model.register_forward_pre_hook(check, with_kwargs=True) if root and degree > 1 else None


def enable_context_parallel(model: torch.nn.Module, ulysses_degree: int, ring_degree: int = 1,
                            device_type: str = "cuda", dp_size: int = 1, cp_plan: dict | None = None) -> None:
    """Split the model's token sequence over ``ulysses_degree x ring_degree`` processes (diffusers CP).

    The device mesh is ``(dp, ring, ulysses)`` over all processes, the ranks of one context-parallel group
    adjacent, so data parallelism runs across groups. Every rank of a group sees the gathered output, but its
    backward yields only its share of the gradients: the group's gradients *sum* to the full ones (a wrapper
    that averages over all processes, DDP or FSDP, needs the loss scaled by the CP degree; the trainer does
    this). ``cp_plan``: the adapter's plan (None: the model's ``_cp_plan``). With the native backend a ring
    runs :func:`ring_attention` and masked calls :func:`gathered_key_attention`; ring and Ulysses together need
    a GPU backend that returns the LSE.
    """
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    check_heads(model, ulysses_degree)
    if _attention_backend(model) == "native":
        if ring_degree > 1 and ulysses_degree > 1:
            raise ValueError(
                f"ring_degree {ring_degree} with ulysses_degree {ulysses_degree} needs an attention backend that "
                "returns the LSE (flash, _native_cudnn: GPU); with the native backend use one of the two"
            )
        install_ring_attention()
    mesh = init_device_mesh(
        device_type, (dp_size, ring_degree, ulysses_degree), mesh_dim_names=("dp", "ring", "ulysses")
    )
    cp_config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh)
    check_sharded_inputs(model, cp_plan if cp_plan is not None else (model._cp_plan or {}),
                         ring_degree * ulysses_degree, "context-parallel degree")
    if device_type == "cpu" and torch.accelerator.device_count() == 0:
        # diffusers picks the device as rank % device_count(), which divides by zero on CPU-only hosts.
        original = torch.accelerator.device_count
        torch.accelerator.device_count = lambda: 1
        try:
            model.enable_parallelism(config=cp_config, cp_plan=cp_plan)
        finally:
            torch.accelerator.device_count = original
    else:
        model.enable_parallelism(config=cp_config, cp_plan=cp_plan)


# --- windows over ranks ---------------------------------------------------------------------------
def _shares(num_windows: int, world_size: int) -> list[range]:
    """Contiguous window index ranges, one per rank, sizes differing by at most one."""
    bounds = [num_windows * r // world_size for r in range(world_size + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world_size)]


def denoise_windows_over_ranks(xs: list[torch.Tensor], sigmas: list[torch.Tensor], offsets: list[int],
                               run: Callable[..., list[torch.Tensor]], group=None) -> list[torch.Tensor]:
    """x0 of every window: this rank runs ``run`` on its share, then each window is broadcast from its owner.

    x0 has its window's shape and dtype, so the receivers need no other metadata (windows may differ in size).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shares = _shares(len(xs), world)
    mine = shares[rank]
    computed = run(xs[mine.start : mine.stop], sigmas[mine.start : mine.stop], offsets[mine.start : mine.stop])
    out: list[torch.Tensor] = []
    for owner, share in enumerate(shares):
        for i in share:
            x0 = computed[i - mine.start].to(xs[i].dtype).contiguous() if owner == rank else torch.empty_like(xs[i])
            dist.broadcast(x0, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
            out.append(x0)
    return out


@contextmanager
def spread_windows(group=None) -> Iterator[None]:
    """Inside: every :class:`~longgen.samplers.base.WindowBatcher` spreads its windows over ``group``'s ranks."""
    from .samplers.base import window_spreader

    with window_spreader(lambda xs, sigmas, offsets, run: denoise_windows_over_ranks(xs, sigmas, offsets, run, group)):
        yield


# --- longgen generate under torchrun --------------------------------------------------------------
def launch_environment(mode: str) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; a clear error without one."""
    if mode not in CONTEXT_PARALLEL_MODES:
        raise ValueError(f"--context-parallel must be one of {', '.join(CONTEXT_PARALLEL_MODES)}, got {mode!r}")
    launch = f"torchrun --nproc-per-node N -m longgen generate ... --context-parallel {mode}"
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"--context-parallel {mode} runs one process per rank under torchrun (WORLD_SIZE and "
                         f"RANK are not set): launch it as `{launch}`, or drop --context-parallel")
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        raise ValueError(f"--context-parallel {mode} with WORLD_SIZE={world}: launch 2 or more processes "
                         f"(`{launch}`), or drop --context-parallel")
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def rank_device(device: str, local_rank: int) -> str:
    """``--device cuda`` under torchrun: each rank takes ``cuda:LOCAL_RANK``; CPU ranks share the CPU."""
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} with --context-parallel: pass --device cuda (rank i uses cuda:LOCAL_RANK)")
    return device


@dataclass
class GenerationParallel:
    """One ``longgen generate`` process of a ``--context-parallel`` launch: what it runs and whether it writes.

    Every rank runs the same pipeline on the same inputs (prompts, seeds, noise) and ends with the same latents;
    only rank 0 decodes and writes the mp4 (atomically, as every longgen output).
    """

    mode: str
    rank: int
    world_size: int
    owns_process_group: bool = False
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, mode: str, device: str) -> tuple[GenerationParallel, str]:
        """Join (or start) torchrun's process group; returns it and this rank's device."""
        rank, local_rank, world = launch_environment(mode)
        device = rank_device(device, local_rank)
        owns = not dist.is_initialized()
        if owns:
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(mode, rank, world, owns), device

    def apply(self, pipe, sampler: str) -> None:
        """Parallelise ``pipe`` for ``sampler``; errors name the fix for an unsupported family / sampler / size."""
        from .samplers import get_sampler

        spec = get_sampler(sampler)
        if self.mode == "windows":
            if "window_batch" not in {f.name for f in dataclasses.fields(spec.knobs)}:
                raise ValueError(
                    f"--context-parallel windows spreads the independent windows of one step (--sampler sliding, "
                    f"fifo); --sampler {sampler} has none: use --context-parallel ulysses or ring"
                )
            scope = spread_windows()
            scope.__enter__()
            self._undo.append(lambda: scope.__exit__(None, None, None))
            return
        self._enable_model_parallel(pipe.adapter, spec)

    def _enable_model_parallel(self, adapter, spec) -> None:
        sampler = spec.name
        if spec.hooks is not None:  # e.g. causal: block-causal attention + KV cache installed while it runs
            raise ValueError(f"--context-parallel {self.mode} does not combine with --sampler {sampler} (its model "
                             "hooks, a KV cache, need the whole sequence on one process); drop --context-parallel")
        plan = adapter.context_parallel_plan()
        if plan is None:
            raise ValueError(
                f"--context-parallel {self.mode}: {adapter.family} ({type(adapter.model).__name__}) has no "
                f"context-parallel plan in diffusers; {CP_FAMILIES_HINT}. For another family use "
                "--context-parallel windows with --sampler sliding or fifo"
            )
        ulysses, ring = (self.world_size, 1) if self.mode == "ulysses" else (1, self.world_size)
        from .backbones import MixtureOfExperts

        experts = adapter.experts() if isinstance(adapter, MixtureOfExperts) else [adapter.model]  # Wan 2.2 MoE
        for model in experts:
            check_heads(model, ulysses, what=f"--context-parallel ulysses over {self.world_size} processes:")
        for model in experts:
            enable_context_parallel(model, ulysses, ring, adapter.device.type, cp_plan=plan)
        stock, had_own = adapter.denoise, "denoise" in vars(adapter)  # own: another wrapper (step cache)

        def denoise(x, sigma, cond, *args, **kwargs):
            check_token_split(x.shape, adapter.patch_size, self.world_size, f"--context-parallel {self.mode} over")
            return stock(x, sigma, cond, *args, **kwargs)

        adapter.denoise = denoise  # checked per call: windows and df's chunks have their own lengths
        self._undo.append(lambda: setattr(adapter, "denoise", stock) if had_own else vars(adapter).pop("denoise"))

    def close(self) -> None:
        """Undo what :meth:`apply` set up and leave the process group (when this object started it)."""
        while self._undo:
            self._undo.pop()()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
