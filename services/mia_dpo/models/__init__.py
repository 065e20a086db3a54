"""Model side of MIA-DPO: loading any supported checkpoint, the one prompt template,
the one-layer attention probe and the attention ratios."""
