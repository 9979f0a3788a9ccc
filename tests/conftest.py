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
