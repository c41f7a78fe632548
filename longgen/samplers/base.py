"""What every sampler shares: the denoiser protocol and window helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch

from ..conditioning import FrameConditioning, GivenWindow, renoise_up  # noqa: F401  (samplers import them here)
from ..windows import window_starts  # noqa: F401  (one implementation, shared with longgen.extend)


class Denoiser(Protocol):
    """``denoise(x[B,C,F,H,W], sigma[B,F], frame_offset=0) -> x0``.

    The sampler-facing denoiser: an adapter's ``denoise`` with the conditioning (and classifier-free
    guidance) bound. ``frame_offset`` is the absolute index of ``x``'s first latent frame in the whole
    video, so windowed samplers let multi-prompt conditioning pick each window's prompt.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor: ...


class BatchedDenoiser(Denoiser, Protocol):
    """A denoiser that can also run several windows of one step as one model call (optional).

    ``denoise_windows(xs, sigmas, frame_offsets)``: ``xs[i]`` ``[B, C, F, H, W]`` at ``sigmas[i]`` ``[B, F]``
    whose first frame is ``frame_offsets[i]``; returns the windows' x0 in order, each with its own cond, equal to
    ``[denoise(x, s, o) for ...]`` to float tolerance. :class:`WindowBatcher` uses it when present.
    """

    def denoise_windows(
        self, xs: list[torch.Tensor], sigmas: list[torch.Tensor], frame_offsets: list[int]
    ) -> list[torch.Tensor]: ...


def fusion_weights(window: int, kind: str = "pyramid") -> torch.Tensor:
    """Per-frame weights ``[window]`` for blending overlapping windows.

    ``pyramid``: 1, 2, ..., ceil(W/2), ..., 2, 1 (FreeNoise, Qiu et al. 2024, Sec. 3.3);
    ``uniform``: all ones (plain averaging, MultiDiffusion).
    """
    if kind == "pyramid":
        idx = torch.arange(window)
        return torch.minimum(idx + 1, window - idx).float()
    if kind == "uniform":
        return torch.ones(window)
    raise ValueError(f"fusion weights must be 'pyramid' or 'uniform', got {kind!r}")


def ddim_eta_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM step with stochasticity ``eta`` (Song et al. 2021, Eq. 12 and 16) in flow sigmas.

    With x = (1 - s) x0 + s eps, DDIM's sigma_t mapped from the variance-preserving form gives the noise
    scale c = eta * s' * sqrt(1 - (r' / r)^2), r = s / (1 - s) (r' for s'), and
    x' = (1 - s') x0 + sqrt(s'^2 - c^2) eps_hat + c z, z ~ N(0, I) from ``generator``. ``eta=0`` is exactly
    :func:`~longgen.schedules.ddim_step` (the same code path, bit for bit); ``eta=1`` is DDPM's ancestral
    step. Frames at sigma == 0 stay where they are.
    """
    from ..noise import gaussian_noise
    from ..schedules import ddim_step

    if eta == 0:
        return ddim_step(x, x0, sigma, sigma_next)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    safe = sigma.clamp_min(1e-12)
    eps = (x - (1.0 - sigma) * x0) / safe
    # r' / r = s' (1 - s) / ((1 - s') s); at s = 1 (pure noise) the ratio is 0.
    ratio = sigma_next * (1.0 - sigma) / ((1.0 - sigma_next).clamp_min(1e-12) * safe)
    c = eta * sigma_next * (1.0 - ratio.clamp(0.0, 1.0) ** 2).sqrt()
    z = gaussian_noise(x.shape, generator, x.device, x.dtype)
    out = (1.0 - sigma_next) * x0 + (sigma_next**2 - c**2).clamp_min(0.0).sqrt() * eps + c * z
    return torch.where(sigma > 0, out, x)


def repaint_step(
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    predict_x0: Callable[[torch.Tensor], torch.Tensor],
    given: GivenWindow | None = None,
    resample: int = 1,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step of a synchronous sampler that keeps given frames (RePaint, Lugmayr et al. 2022, Alg. 1).

    ``predict_x0(x)`` is the sampler's x0 prediction (one model call, or fused windows). With ``given`` the
    given region of ``x`` is first replaced by the given latents re-noised to ``sigma``
    (:meth:`~longgen.conditioning.GivenWindow.impose`) and x0 is clamped to them there; ``resample = U > 1``
    repeats the step U times, taking the result back up to ``sigma`` in between
    (:func:`~longgen.conditioning.renoise_up`). Without ``given`` and with U = 1 this is exactly
    ``ddim_eta_step(x, predict_x0(x), ...)``. Returns (x at ``sigma_next``, x0, the ``x`` the model saw).
    """
    for u in range(resample if given is not None else 1):
        if given is not None:
            x = given.impose(x, sigma, generator)
        x0 = predict_x0(x)
        if given is not None:
            x0 = given.clamp(x0)
        x_next = ddim_eta_step(x, x0, sigma, sigma_next, eta, generator)
        if u < resample - 1 and given is not None:
            x = renoise_up(x_next, sigma_next, sigma, generator)
    return x_next, x0, x


# --- windows of one step as batched model calls ---------------------------------------------------
_WINDOW_KEY: ContextVar[str | None] = ContextVar("longgen_window_key", default=None)

@contextmanager
def window_scope(key: str | None) -> Iterator[None]:
    """Name the window(s) the model calls inside belong to (step caches keep one state per name)."""
    token = _WINDOW_KEY.set(key)
    try:
        yield
    finally:
        _WINDOW_KEY.reset(token)


def current_window_key() -> str | None:
    """The window name set by :func:`window_scope` (None outside windowed samplers: one state per clip)."""
    return _WINDOW_KEY.get()


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()  # CPU allocators raise a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class WindowBatcher:
    """Denoises the independent windows of one sampler step in batched model calls of <= ``window_batch``.

    Windows are stacked along the batch, so one call does the work of several (the FIFO-Diffusion paper runs
    them on separate GPUs; one batched call is the single-device analogue). Each window keeps its own
    conditioning through the denoiser's ``denoise_windows(xs, sigmas, frame_offsets)``
    (:meth:`longgen.pipeline.GuidedDenoiser.denoise_windows`); a denoiser without it is called window by
    window. ``window_batch=None``: on CUDA from free memory (the first window's measured peak), on CPU 1.
    A batch that runs out of memory is halved with a warning and retried, down to single windows. The cap
    persists across steps, so the groups (and step-cache keys, :func:`window_scope`) stay the same.
    """

    def __init__(self, denoise: Denoiser, window_batch: int | None = None):
        if window_batch is not None and window_batch < 1:
            raise ValueError(f"--window-batch must be >= 1, got {window_batch}")
        self.denoise = denoise
        self.batched = getattr(denoise, "denoise_windows", None)
        self.cap = window_batch if self.batched is not None else 1
        self.num_calls = 0
        self.fallbacks = 0

    def __call__(self, xs: list[torch.Tensor], sigmas: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
        """x0 of every window (in order); window ``i`` is ``xs[i]`` at ``sigmas[i]``, first frame ``offsets[i]``."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(xs):
            if self.cap is None:
                self.cap = self._auto_cap(xs[i], sigmas[i], offsets[i], len(xs), out)
                i = len(out)
                continue
            j = min(len(xs), i + self.cap)
            try:
                out.extend(self._call(xs[i:j], sigmas[i:j], offsets[i:j], i))
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if j - i == 1 or not _is_out_of_memory(error):
                    raise
                self._shrink(j - i)
                continue
            i = j
        return out

    def _call(self, xs, sigmas, offsets, first: int) -> list[torch.Tensor]:
        self.num_calls += 1
        if len(xs) == 1:
            with window_scope(str(first)):
                return [self.denoise(xs[0], sigmas[0], frame_offset=offsets[0])]
        with window_scope(f"{first}-{first + len(xs) - 1}"):
            return list(self.batched(xs, sigmas, offsets))

    def _shrink(self, tried: int) -> None:
        import warnings

        self.cap = max(1, tried // 2)
        self.fallbacks += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        warnings.warn(
            f"a batch of {tried} windows ran out of memory; retrying with --window-batch {self.cap} "
            f"(pass a smaller --window-batch to skip this)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _auto_cap(self, x, sigma, offset, num_windows: int, out: list[torch.Tensor]) -> int:
        """CUDA: run the first window alone, measuring its peak, and fit the rest into 80% of free memory."""
        if x.device.type != "cuda" or num_windows == 1:
            return 1
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        out.extend(self._call([x], [sigma], [offset], 0))
        free, _ = torch.cuda.mem_get_info(x.device)
        return windows_that_fit(torch.cuda.max_memory_allocated(x.device) - before, free, num_windows)


def windows_that_fit(per_window_bytes: int, free_bytes: int, num_windows: int, headroom: float = 0.8) -> int:
    """How many windows one batched call may hold: ``headroom`` of free memory over one window's peak."""
    return max(1, min(num_windows, int(headroom * free_bytes // max(1, per_window_bytes))))
