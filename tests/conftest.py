"""Test-session setup.

XLA's CPU backend spends most of a tiny model's test time in LLVM optimisation, so the
suite runs at optimisation level 0 (results' semantics are unchanged). The tests that
matter most run a second time at XLA's default level, the one users get:
`tests/test_xla_default.py` re-runs them in a subprocess with
SKIPDIT_TESTS_XLA_DEFAULT=1, which skips the override below.
"""

import os

if os.environ.get("SKIPDIT_TESTS_XLA_DEFAULT") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _import_torchvision_without_its_compiled_ops() -> None:
    """Make `import torchvision` work for every library in the session.

    The test extras need torchvision (pytorch-fid's Inception blocks subclass its classes),
    and the PyPI torchvision wheel is linked against CUDA torch: beside torch+cpu its C ops
    library does not load, and `import torchvision` dies registering fake kernels for those
    ops ("operator torchvision::nms does not exist"). That import also happens inside
    transformers and diffusers whenever torchvision is installed. No test uses the compiled
    ops (detection/video ops), so `torch.library.register_fake` is a no-op while torchvision
    imports, then restored."""
    import importlib.util
    import sys

    if "torchvision" in sys.modules or importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    original = torch.library.register_fake

    def _no_op(op, fn=None, /, *args, **kwargs):
        return fn if fn is not None else (lambda f: f)

    torch.library.register_fake = _no_op
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = original


_import_torchvision_without_its_compiled_ops()
