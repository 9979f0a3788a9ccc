"""Models by family. `DiT` (and Skip-DiT) is the class-to-image family; every family is
reached through `skipdit_jax.models.families` (`family_of(config)`)."""

from skipdit_jax.models.config import ModelConfig, preset, preset_names
from skipdit_jax.models.dit import DiT, DiTBlock, DiTFamily, count_params, init_params
from skipdit_jax.models.families import as_family, config_from_dict, family_of, get_family
from skipdit_jax.models.family import ModelFamily
from skipdit_jax.models.hunyuan import HunyuanConfig, HunyuanDiT, hunyuan_preset, hunyuan_preset_names
from skipdit_jax.models.hunyuan_family import HunyuanFamily
from skipdit_jax.models.latte import Latte, LatteConfig, LatteFamily, latte_preset, latte_preset_names
from skipdit_jax.models.latte_t2v import LatteT2V, LatteT2VConfig, latte_t2v_preset, latte_t2v_preset_names
from skipdit_jax.models.latte_t2v_family import LatteT2VFamily
from skipdit_jax.models.layers import get_2d_sincos_pos_embed
from skipdit_jax.models.skip import SkipFusion

__all__ = [
    "DiT",
    "as_family",
    "DiTBlock",
    "DiTFamily",
    "HunyuanConfig",
    "HunyuanDiT",
    "HunyuanFamily",
    "hunyuan_preset",
    "hunyuan_preset_names",
    "Latte",
    "LatteConfig",
    "LatteFamily",
    "latte_preset",
    "latte_preset_names",
    "LatteT2V",
    "LatteT2VConfig",
    "LatteT2VFamily",
    "latte_t2v_preset",
    "latte_t2v_preset_names",
    "ModelConfig",
    "ModelFamily",
    "SkipFusion",
    "config_from_dict",
    "count_params",
    "family_of",
    "get_2d_sincos_pos_embed",
    "get_family",
    "init_params",
    "preset",
    "preset_names",
]
