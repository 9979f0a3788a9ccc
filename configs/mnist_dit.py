"""Class-conditional DiT (no long skips) on the embedded MNIST digits: the baseline of
configs/mnist_skipdit.py, identical but for `model.long_skip=False`.

    skipdit train --config configs/mnist_dit.py --workdir runs/mnist_dit

Comparing the two runs' metrics.jsonl shows the convergence difference long skips make;
with `--config.evals.classifier_fid.every=750` on both, so does
`skipdit plot-curves runs/mnist_skipdit runs/mnist_dit --metric classifier_fid/fid`.
"""

from skipdit_jax.demo import config as _mnist


def get_config(arg: str | None = None):
    return _mnist.get_config("dit")
