"""`hf://org/repo[/subfolder]` specs: parsing, and fetching only the files a loader reads.

Every loader that accepts a Hub spec (the SD VAE, the temporal VAE, T5, Latte-T2V) goes
through `fetch_folder`, so they parse specs alike, download no more than their config and
weights, and fail alike when the Hub cannot be reached: one `HubUnavailableError` line that
says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError, ConfigError, HubUnavailableError

PREFIX = "hf://"


def is_hub_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_hub_spec(spec: str, example: str = "hf://org/repo/subfolder") -> tuple[str, str]:
    """"hf://org/repo[/sub/folder]" -> ("org/repo", "sub/folder" or "")."""
    parts = spec[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"bad Hub spec {spec!r}: expected hf://org/repo or hf://org/repo/subfolder, e.g. {example}")
    return "/".join(parts[:2]), "/".join(parts[2:])


def is_network_error(e: Exception) -> bool:
    """Whether `e` means the Hub could not be reached (or offline mode forbids it)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    # The HTTP client (requests, httpx, httpx2 depending on the hub version) raises its own
    # connection/proxy errors; they do not share a base class we could import reliably.
    return type(e).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "httpx2", "httpcore")


def fetch_folder(
    repo_id: str,
    subfolder: str,
    weight_patterns: Sequence[Sequence[str]],
    *,
    extra_patterns: Sequence[str] = ("config.json",),
    revision: str | None = None,
    cache_dir: str | None = None,
    instead: str = "a local folder",
) -> epath.Path:
    """The local snapshot folder (repo root / subfolder) holding `extra_patterns` and weights.

    `weight_patterns` are alternatives tried in order (e.g. safetensors, then .bin): each is
    downloaded only if the ones before found no file, so a repo that has both formats never
    costs two downloads. Patterns are relative to the subfolder. `HubUnavailableError` (one
    line, naming `instead`) when the Hub cannot be reached and nothing is cached;
    `CheckpointError` when the repo has none of the weight files.
    """
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        for patterns in weight_patterns:
            root = paths.as_path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=[prefix + p for p in (*extra_patterns, *patterns)],
                )
            )
            folder = root / subfolder if subfolder else root
            if any(any(folder.glob(p)) for p in patterns):
                return folder
    except Exception as e:
        if is_network_error(e):
            raise HubUnavailableError(
                f"could not reach the Hugging Face Hub to fetch {repo_id!r} and it is not in the local cache "
                f"({type(e).__name__}); give {instead} instead"
            ) from None
        raise
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    names = " or ".join(p for group in weight_patterns for p in group)
    raise CheckpointError(f"Hub repo {where!r} has no {names}")
