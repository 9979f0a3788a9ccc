"""Training: the config schema (`config`), optimizer and EMA (`optim`), the pure jitted
step (`train_step`), checkpoints with exact resume (`checkpoints`), metrics
(`metric_logging`), evaluations during training declared as data (`evaluators`) and the
trainer (`train`). All of it reaches the model through its family
(`skipdit_jax.models.families`)."""
