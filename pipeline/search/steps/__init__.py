"""The steps of a search beside its trials: the baseline, warm start, seed replicates, interrupted trials."""
