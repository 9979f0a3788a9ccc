"""Class-conditional Skip-DiT on the 5,000 embedded MNIST digits: the settings of
`skipdit demo` (defined, with the measurements behind them, in `skipdit_jax/demo/config.py`).

    skipdit train --config configs/mnist_skipdit.py --workdir runs/mnist_skipdit
    skipdit train --config configs/mnist_skipdit.py:dit --workdir runs/mnist_dit   # no long skips

Produces WORKDIR/metrics.jsonl, TensorBoard events, Orbax checkpoints and EMA sample grids
(Skip-Cache N=2) under WORKDIR/samples/. `--config.evals.classifier_fid.every=750` adds the
demo's classifier-FID curve (`classifier_fid/fid`, `classifier_fid/class_accuracy` in
metrics.jsonl; a digit classifier is trained once, ~30 s, and cached under
$SKIPDIT_CACHE/mnist_classifier); `skipdit plot-curves WORKDIR --metric classifier_fid/fid`
draws it.
"""

from skipdit_jax.demo.config import get_config  # noqa: F401
