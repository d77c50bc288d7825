"""The base model and its adapter: where it runs (`device`), loading it (`load`), LoRA variants (`variants`), a saved adapter (`adapter`)."""
