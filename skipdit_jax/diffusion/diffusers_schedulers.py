"""diffusers' DDIM and DDPM schedulers as pure, hashable settings for the one jitted sampler.

The text-to-video (Latte) and text-to-image (Hunyuan-DiT) releases sample with diffusers'
`DDIMScheduler` / `DDPMScheduler`, not with ADM's respaced diffusion: other timesteps
(Latte's DDIM-50 is 980, 960, ..., 0; Hunyuan's DDPM-100 is 991, 981, ..., 1), other beta
schedules, v-prediction, and a DDIM rule whose "previous" timestep is always
`t - num_train_timesteps // num_steps`. `DiffusersDDIM` / `DiffusersDDPM` reproduce those
rules; they hold settings only (frozen dataclasses, usable as jit / lru_cache keys).

The sampler asks a scheduler for three things:
  * `timesteps(num_steps)`: the original-scale timesteps in sampling order (what the model
    and the cache schedule see), exactly as diffusers' `set_timesteps`;
  * `step_tables(num_steps, eta)`: per-step float32 coefficients, computed once on the host
    in float64 (diffusers computes them in float32 torch: differences are ~1e-6 relative);
  * `step(out, x, coef, noise)`: one update from the model's (guided) prediction, where
    `coef` holds one step's scalars from the tables, so the rule runs inside `lax.scan`.
Config values this module does not implement raise one-line `ConfigError`s rather than
sampling with a different rule.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from etils import epath

from skipdit_jax.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Config keys that select behaviour we do not implement, with the value that is harmless.
_MUST_BE = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}


@dataclasses.dataclass(frozen=True)
class _DiffusersScheduler:
    """Settings shared by diffusers' DDIM and DDPM schedulers (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    kind: ClassVar[str] = ""  # the `sampler=` name this scheduler replaces

    def __post_init__(self):
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps}")
        for name, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, SPACINGS),
            ("prediction_type", self.prediction_type, PREDICTIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"{type(self).__name__}: {name} {value!r} is not supported; use one of {', '.join(allowed)}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if int(self.steps_offset) != self.steps_offset or self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be an integer >= 0, got {self.steps_offset}")
        if self.clip_sample_range <= 0:
            raise ConfigError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any] | str | epath.PathLike, **overrides):
        """From a diffusers scheduler config: a dict, or a path to `scheduler_config.json` (or
        to the folder holding it). Unknown keys are ignored, as diffusers does (e.g. DDIM
        ignores `variance_type`); `overrides` win over the file, like diffusers'
        `from_pretrained(..., clip_sample=False)`."""
        if not isinstance(config, dict):
            path = epath.Path(config)
            if path.is_dir():
                path = path / "scheduler_config.json"
            if not path.exists():
                raise ConfigError(f"no scheduler config at {path}")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise ConfigError(f"{path} must hold a JSON object")
        config = {**config, **overrides}
        for key, ok in _MUST_BE.items():
            if config.get(key) not in (None, ok):
                raise ConfigError(f"{cls.__name__}: {key}={config[key]!r} is not supported (only {ok!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in names}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for k, v in kw.items():
            if v is None:
                raise ConfigError(f"{cls.__name__}: {k} must not be null")
            if types[k] in ("int", "float") and isinstance(v, bool):
                raise ConfigError(f"{cls.__name__}: {k} must be a number, got {v!r}")
            kw[k] = {"int": int, "float": float, "bool": bool, "str": str}[types[k]](v)
        return cls(**kw)

    # ---- host-side schedule ----------------------------------------------------------------
    def alphas_cumprod(self) -> np.ndarray:
        """alpha-bar over the training timesteps, float64."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        else:  # scaled_linear: linear in sqrt(beta) (Stable Diffusion, PixArt, Hunyuan-DiT)
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        return np.cumprod(1.0 - betas)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Original-scale timesteps in sampling order (int64), as diffusers' `set_timesteps`:
        leading: `arange(n) * (T // n) + steps_offset`, descending; trailing:
        `round(arange(T, 0, -T / n)) - 1`; linspace: `round(linspace(0, T - 1, n))`, descending.
        (steps_offset only shifts "leading", as in diffusers.)"""
        whole = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
        if not whole or not 1 <= num_steps <= self.num_train_timesteps:
            raise ConfigError(f"num_steps must be an integer in 1..{self.num_train_timesteps}, got {num_steps!r}")
        n, big_t = int(num_steps), self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
        if ts.max() >= big_t:
            raise ConfigError(f"steps_offset {self.steps_offset} puts timestep {ts.max()} beyond the {big_t} training steps")
        return ts

    def _x0_eps(self, out, x, coef):
        """(x0, eps) predicted from the model output under `prediction_type`. The square roots
        come from float64 tables: 1 - alpha-bar is ~1e-4 near t = 0, where float32 alpha-bar
        would lose a third of its digits."""
        a, b = coef["sqrt_abar"], coef["sqrt_one_minus_abar"]
        if self.prediction_type == "epsilon":
            return (x - b * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - b * out, a * out + b * x
        return out, (x - a * out) / b

    def _clip(self, x0):
        return jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0


@dataclasses.dataclass(frozen=True)
class DiffusersDDIM(_DiffusersScheduler):
    """diffusers' `DDIMScheduler` (with `use_clipped_model_output=False`, as pipelines call it).

    The previous timestep of t is `t - num_train_timesteps // num_steps` whatever the spacing;
    where it is negative, alpha-bar_prev is 1 (`set_alpha_to_one`) or alpha-bar_0. With
    eta > 0 noise of std `eta * sqrt(var)` is added at every step, the last one included.
    """

    set_alpha_to_one: bool = True

    kind: ClassVar[str] = "ddim"

    @classmethod
    def latte(cls) -> DiffusersDDIM:
        """Latte / Skip-DiT text-to-video sampling: linear betas 1e-4..0.02, leading spacing,
        clip_sample off (the sampling script's override), otherwise diffusers' defaults. For a
        released checkpoint prefer `from_config(<model>/scheduler, clip_sample=False)`."""
        return cls(clip_sample=False)

    def step_tables(self, num_steps: int, eta: float = 0.0) -> dict[str, np.ndarray]:
        """Per-step coefficients (float32, from float64): sqrt(alpha-bar) at t and at the
        previous timestep, sqrt(1 - alpha-bar_t), the direction's sqrt(1 - abar_prev - std^2)
        and the noise std `eta * sqrt(var)`."""
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        ts = self.timesteps(num_steps)
        ac = self.alphas_cumprod()
        final = 1.0 if self.set_alpha_to_one else ac[0]
        prev = ts - self.num_train_timesteps // int(num_steps)
        abar = ac[ts]
        abar_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        std = float(eta) * np.sqrt(var)
        tables = dict(
            sqrt_abar=np.sqrt(abar),
            sqrt_one_minus_abar=np.sqrt(1 - abar),
            sqrt_abar_prev=np.sqrt(abar_prev),
            dir_coef=np.sqrt(np.maximum(1 - abar_prev - std**2, 0.0)),
            std=std,
        )
        return {k: np.asarray(v, np.float32) for k, v in tables.items()}

    def needs_noise(self, eta: float) -> bool:
        return eta > 0

    def step(self, out, x, coef, noise=None):
        """x_prev from the model output `out` (x's channels only) at one step's `coef`."""
        x0, eps = self._x0_eps(out, x, coef)
        x_prev = coef["sqrt_abar_prev"] * self._clip(x0) + coef["dir_coef"] * eps
        return x_prev if noise is None else x_prev + coef["std"] * noise


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


@dataclasses.dataclass(frozen=True)
class DiffusersDDPM(_DiffusersScheduler):
    """diffusers' `DDPMScheduler`: ancestral steps between consecutive timesteps of the list
    (the last one goes to alpha-bar 1), noise added wherever t > 0.

    `variance_type`: fixed_small (the posterior variance, clamped at 1e-20; fixed_small_log
    is the same std), fixed_large (beta_t of the step) or learned_range (the model's second
    half of channels interpolates the two in log space; needs a learned-sigma model).
    """

    variance_type: str = "fixed_small"

    kind: ClassVar[str] = "ddpm"

    def __post_init__(self):
        super().__post_init__()
        if self.variance_type not in VARIANCE_TYPES:
            raise ConfigError(
                f"DiffusersDDPM: variance_type {self.variance_type!r} is not supported; use one of {', '.join(VARIANCE_TYPES)}"
            )

    @classmethod
    def hunyuan(cls) -> DiffusersDDPM:
        """Hunyuan-DiT's "ddpm" sampler: scaled_linear 0.00085..0.02, v_prediction,
        steps_offset 1 (DDPM-100 walks 991, 981, ..., 1), no clipping."""
        return cls(
            beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
            steps_offset=1, clip_sample=False,
        )

    @property
    def uses_model_variance(self) -> bool:
        return self.variance_type == "learned_range"

    def step_tables(self, num_steps: int, eta: float = 0.0) -> dict[str, np.ndarray]:
        """Per-step coefficients of the posterior mean and the variance (see the class)."""
        if eta != 0:
            raise ConfigError("eta is a DDIM setting; DDPM's noise is fixed by variance_type")
        ts = self.timesteps(num_steps)
        ac = self.alphas_cumprod()
        abar = ac[ts]
        abar_prev = np.append(ac[ts[1:]], 1.0)  # the next timestep of the list; 1 after the last
        cur_alpha = abar / abar_prev
        cur_beta = 1 - cur_alpha
        small = np.maximum((1 - abar_prev) / (1 - abar) * cur_beta, 1e-20)
        tables = dict(
            sqrt_abar=np.sqrt(abar),
            sqrt_one_minus_abar=np.sqrt(1 - abar),
            c_x0=np.sqrt(abar_prev) * cur_beta / (1 - abar),
            c_xt=np.sqrt(cur_alpha) * (1 - abar_prev) / (1 - abar),
            log_small=np.log(small),
            log_large=np.log(cur_beta),
            noise_on=(ts > 0).astype(np.float64),
        )
        return {k: np.asarray(v, np.float32) for k, v in tables.items()}

    def needs_noise(self, eta: float) -> bool:
        return True

    def step(self, out, x, coef, noise=None, model_var=None):
        """x_prev from the model output `out` (x's channels) and, for learned_range, the
        model's variance channels `model_var` in [-1, 1]."""
        x0, _ = self._x0_eps(out, x, coef)
        x0 = self._clip(x0)
        mean = coef["c_x0"] * x0 + coef["c_xt"] * x
        if noise is None:
            return mean
        if self.variance_type == "learned_range":
            frac = (model_var + 1) / 2
            log_var = frac * coef["log_large"] + (1 - frac) * coef["log_small"]
        elif self.variance_type == "fixed_large":
            log_var = coef["log_large"]
        else:
            log_var = coef["log_small"]
        return mean + coef["noise_on"] * jnp.exp(0.5 * log_var) * noise


DiffusersScheduler = DiffusersDDIM | DiffusersDDPM
