"""Model side of MIA-DPO: loading, the one prompt template, the tiny test model."""
