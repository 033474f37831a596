"""Training loss for full-resolution segmentation logits."""
import torch.nn.functional as F

from dataset import IGNORE_INDEX


def weighted_cross_entropy(logits, target, class_weights):
    """Class-weighted mean cross entropy of (B,C,H,W) logits vs (B,H,W) int64 target, skipping IGNORE_INDEX."""
    return F.cross_entropy(logits, target, weight=class_weights.to(logits), ignore_index=IGNORE_INDEX)
