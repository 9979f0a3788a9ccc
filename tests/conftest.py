"""Test-session setup. XLA's CPU backend spends most of a tiny model's test time in LLVM
optimisation; level 0 halves compile time without changing results' semantics."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
