"""The demo: synthetic data, the tiny LLaVA and its base-model training, the packaged config."""
