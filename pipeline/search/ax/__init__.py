"""Everything Ax: the config's space as Ax parameters, the Optimizer, outcomes and memory constraints. The only folder that imports ax."""
