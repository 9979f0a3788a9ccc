"""Class-conditional DiT (no long skips) on the embedded MNIST digits: the baseline of
configs/mnist_skipdit.py, identical but for `model.long_skip=False`.

    skipdit train --config configs/mnist_dit.py --workdir runs/mnist_dit

Produces the same outputs as configs/mnist_skipdit.py; comparing the two metrics.jsonl
files shows the convergence difference long skips make at this scale.
"""

import importlib.util
import os


def get_config(arg: str | None = None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_skipdit.py")
    spec = importlib.util.spec_from_file_location("mnist_skipdit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("dit")
