"""The model registry: the champion gate (`gate`, pure) and registered versions (`versions`, mlflow)."""
