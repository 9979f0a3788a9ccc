"""Gaussian diffusion with ADM/DiT semantics, channels-last.

Linear betas 1e-4..0.02 over 1000 steps, ADM's timestep respacing, epsilon prediction
with the learned-range variance, the hybrid training loss (eps MSE + variational bound),
ancestral DDPM and DDIM steps. Tables are computed in float64 numpy (as ADM does) and
used as float32; the model always sees timesteps on the original 0..999 scale, through
`Diffusion.timestep_map`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """ADM's linear schedule, scaled so any T spans the same 1e-4..0.02 at T=1000."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """ADM's respacing (guided-diffusion `respace.space_timesteps`): which original
    timesteps to keep, sorted ascending.

    "250" keeps 250 evenly strided steps; "10,10,5" splits the range into 3 sections (the
    first `T % 3` one step longer) with 10, 10 and 5 steps; "ddimN" keeps range(0, T, stride)
    for the smallest stride giving exactly N steps (DDIM's uniform spacing). Within a section
    the kept offsets are `round(cur)` of a float `cur` that starts at 0.0 and accumulates the
    fractional stride, exactly as ADM does: this is not always `round(j * stride)` (e.g. "21"
    keeps 499, not 500). A section may ask for 0 steps, as in ADM, but the schedule may not be
    empty; ADM's bare ValueErrors are ConfigErrors here.
    """
    spec = str(section_counts).strip()
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim") :])
        except ValueError:
            raise ConfigError(f"bad respacing {spec!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot create exactly {desired} DDIM steps from {num_timesteps} with an integer stride")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ConfigError(f"bad respacing {spec!r}: expected comma-separated step counts or 'ddimN'") from None
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ConfigError(f"bad respacing {spec!r}: step counts must be >= 0 and keep at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, taken = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"bad respacing {spec!r}: cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0  # accumulated, not j * frac_stride: the float sums decide ADM's rounding
        for _ in range(count):
            taken.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(taken))


def respacing_for(sampler: str, num_steps: int) -> str:
    """ADM section string of `sampler="ddim"|"ddpm"` with `num_steps` steps."""
    if sampler == "ddim":
        return f"ddim{num_steps}"
    if sampler == "ddpm":
        return str(num_steps)
    raise ConfigError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")


def _to_ndim(values: jax.Array, ndim: int) -> jax.Array:
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class Diffusion:
    """A (respaced) ADM Gaussian diffusion. `t` arguments are indices into the respaced
    schedule (equal to the original timestep when not respaced)."""

    def __init__(self, respacing: str | None = None, learn_sigma: bool = True, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        base_betas = linear_betas(num_timesteps)
        base_abar = np.cumprod(1.0 - base_betas)
        use = space_timesteps(num_timesteps, respacing) if respacing else list(range(num_timesteps))
        # Respaced betas keep the kept timesteps' alpha_bar exactly.
        last, betas = 1.0, []
        for t in use:
            betas.append(1 - base_abar[t] / last)
            last = base_abar[t]
        self.respacing = respacing
        self.learn_sigma = learn_sigma
        self.timestep_map = np.asarray(use, np.int32)
        self.num_steps = len(use)

        b = np.asarray(betas, np.float64)
        abar = np.cumprod(1.0 - b)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # The t=0 entry of the clipped log-variances is ADM's t=1 posterior variance. A 1-step
        # schedule (e.g. "1") has no t=1, and ADM itself fails there (IndexError); we use
        # beta_0 instead: finite, and unused by sampling since no noise is added at t=0 (it
        # only enters the t=0 decoder NLL of the variational bound).
        var_1 = post_var[1] if len(b) > 1 else b[0]
        tables = dict(
            betas=b,
            log_betas=np.log(b),
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
            posterior_variance=post_var,
            # The posterior variance is 0 at t=0, so its log is clipped to the t=1 value.
            posterior_log_variance_clipped=np.log(np.append(var_1, post_var[1:])),
            posterior_mean_coef1=b * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar),
            # ADM's FIXED_LARGE variance, used by models without learned sigma.
            fixed_large_log_variance=np.log(np.append(var_1, b[1:])),
        )
        self.tables_f64 = tables
        self._tables = {k: np.asarray(v, np.float32) for k, v in tables.items()}

    def _get(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        return _to_ndim(jnp.asarray(self._tables[name])[t], ndim)

    # ---- forward process -----------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        return self._get("sqrt_alphas_cumprod", t, x0.ndim) * x0 + self._get(
            "sqrt_one_minus_alphas_cumprod", t, x0.ndim
        ) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._get("posterior_mean_coef1", t, xt.ndim) * x0 + self._get("posterior_mean_coef2", t, xt.ndim) * xt
        return mean, self._get("posterior_log_variance_clipped", t, xt.ndim)

    def predict_xstart(self, xt, t, eps):
        return self._get("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - self._get(
            "sqrt_recipm1_alphas_cumprod", t, xt.ndim
        ) * eps

    def predict_eps(self, xt, t, x0):
        return (self._get("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - x0) / self._get(
            "sqrt_recipm1_alphas_cumprod", t, xt.ndim
        )

    # ---- reverse process -----------------------------------------------------------------
    def p_mean_variance(self, model_out, xt, t, clip_denoised: bool = False):
        """Mean, log-variance and x0 prediction of p(x_{t-1} | x_t) from the model output."""
        c = xt.shape[-1]
        eps = model_out[..., :c]
        if self.learn_sigma:
            if model_out.shape[-1] != 2 * c:
                raise ConfigError(f"learned-sigma model output must have {2 * c} channels, got {model_out.shape[-1]}")
            frac = (model_out[..., c:] + 1) / 2
            min_log = self._get("posterior_log_variance_clipped", t, xt.ndim)
            max_log = self._get("log_betas", t, xt.ndim)
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = jnp.broadcast_to(self._get("fixed_large_log_variance", t, xt.ndim), xt.shape)
        x0 = self.predict_xstart(xt, t, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    def ddpm_step(self, model_out, xt, t, noise, clip_denoised: bool = False):
        """Ancestral sample x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t == 0."""
        mean, log_var, _ = self.p_mean_variance(model_out, xt, t, clip_denoised)
        nonzero = _to_ndim((t != 0).astype(xt.dtype), xt.ndim)
        return mean + nonzero * jnp.exp(0.5 * log_var) * noise

    def ddim_step(self, model_out, xt, t, noise=None, eta: float = 0.0, clip_denoised: bool = False):
        """ADM's DDIM update; eps is re-derived from the (possibly clipped) x0 prediction."""
        _, _, x0 = self.p_mean_variance(model_out, xt, t, clip_denoised)
        eps = self.predict_eps(xt, t, x0)
        abar = self._get("alphas_cumprod", t, xt.ndim)
        abar_prev = self._get("alphas_cumprod_prev", t, xt.ndim)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
        mean = x0 * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
        if noise is None or eta == 0:
            return mean
        nonzero = _to_ndim((t != 0).astype(xt.dtype), xt.ndim)
        return mean + nonzero * sigma * noise

    # ---- training loss ---------------------------------------------------------------------
    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) of (respaced-index) timesteps t."""
        abar = jnp.asarray(self._tables["alphas_cumprod"])[t]
        return abar / (1.0 - abar)

    def training_losses(self, model_fn, x0, t, noise):
        """Per-example hybrid loss of ADM/DiT: {"loss", "mse", "vb"}, float32, shape (B,).

        `model_fn(x_t, t)` returns the model output. The variational bound trains only the
        variance: it sees a stop-gradient eps (ADM's "frozen out"), as in DiT.
        """
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, t).astype(jnp.float32)
        c = x0.shape[-1]
        axes = tuple(range(1, x0.ndim))
        mse = jnp.mean(jnp.square(noise - out[..., :c]), axis=axes)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
        frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :c]), out[..., c:]], axis=-1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms_bpd(self, model_out, x0, xt, t):
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; the decoder NLL at t=0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var, _ = self.p_mean_variance(model_out, xt, t)
        axes = tuple(range(1, x0.ndim))
        kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var), axis=axes) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = jnp.mean(nll, axis=axes) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x (data in [-1, 1], 8-bit bins) under a discretised Gaussian."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def create_diffusion(respacing: str | None = None, learn_sigma: bool = True) -> Diffusion:
    """ADM/DiT diffusion: `create_diffusion("250")`, `create_diffusion("ddim50")`, or
    `create_diffusion()` for the 1000-step training diffusion."""
    return Diffusion(respacing, learn_sigma=learn_sigma)
