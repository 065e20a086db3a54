"""mia-dpo: Multi-Image Augmented DPO as a Kubernetes batch system."""

__version__ = "0.1.0"
