"""Attention supervision for the demo's base model (BaseParams.attention_supervision).

MIA-DPO rejects an answer when the model's attention, at one decoder layer, sits on an
image other than the one the question names: on LLaVA-1.5 a wrong answer tends to
come with attention on the wrong image. A tiny model trained only on answers need not
route that way (its two-image AUC stays near 0.6, docs/evidence.md). This loss asks
the chosen layer to put the answer rows' image attention on the target, so the
answer is read through that layer and where it looks tells which image was read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def target_share_loss(
    attentions: torch.Tensor,  # (B, H, T, T): one decoder layer's softmax weights
    input_ids: torch.Tensor,  # (B, T)
    labels: torch.Tensor,  # (B, T), -100 outside the answer
    image_token_id: int,
    n_images: int,  # images per row, each with the same number of tokens
    targets: list[int],  # 1-based target image per row
) -> torch.Tensor:
    """Mean over rows of -log(target share): the rows that predict the answer (the
    position before each labelled token), heads averaged, then rows averaged; each
    image's mean weight over its tokens, normalised over the images; the same share
    the score stage computes (sequence_ratio)."""
    terms = []
    for b, k in enumerate(targets):
        predicts = (labels[b] != -100).nonzero().flatten() - 1  # row t predicts token t+1
        weights = attentions[b].mean(0)[predicts].mean(0)  # (T,)
        columns = (input_ids[b] == image_token_id).nonzero().flatten()
        per_image = weights[columns].view(n_images, -1).mean(1)  # images' tokens lie in order
        share = per_image[k - 1] / per_image.sum().clamp_min(1e-12)
        terms.append(-torch.log(share.clamp_min(1e-6)))
    return torch.stack(terms).mean()


def layers_share_loss(
    attentions: Sequence[torch.Tensor],  # per decoder layer (B, H, T, T)
    inputs: Mapping[str, torch.Tensor],  # the batch: input_ids, labels
    image_token_id: int,
    n_images: int,
    targets: list[int],
    layers: Sequence[int],
) -> torch.Tensor:
    """target_share_loss averaged over `layers`."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    terms = [
        target_share_loss(attentions[layer], ids, labels, image_token_id, n_images, targets)
        for layer in layers
    ]
    return torch.stack(terms).mean()
