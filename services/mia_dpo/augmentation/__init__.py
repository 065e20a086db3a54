"""Multi-image augmentation (docs/method.md §1): collage composition and the
per-sample augmenter, shared by the augment and evaluate stages."""
