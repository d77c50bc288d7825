"""One training run as every entry point uses it: `run.run_trial(config)`, the shared resources, resume and failures."""
