"""Training steps: the Trainer builder (`train`), its callbacks, checkpoints, packed trials (`packing`, `router`), metrics, lm-eval tasks."""
