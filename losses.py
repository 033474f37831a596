"""Training losses for full-resolution segmentation logits."""
import torch
import torch.nn.functional as F

from dataset import IGNORE_INDEX, NUM_CLASSES

LOSSES = ("ce", "ce+dice")


def weighted_cross_entropy(logits, target, class_weights):
    """Class-weighted mean cross entropy of (B,C,H,W) logits vs (B,H,W) int64 target, skipping IGNORE_INDEX."""
    return F.cross_entropy(logits, target, weight=class_weights.to(logits), ignore_index=IGNORE_INDEX)


def soft_dice_loss(logits, target):
    """Soft Dice loss over the instrument classes 1..9, pooled over the whole batch.

    With p = softmax(logits) and g the one-hot target, both over the pixels whose target is not IGNORE_INDEX:
        dice_c = 2 * sum(p_c * g_c) / (sum(p_c) + sum(g_c))
        loss   = mean over C_present of (1 - dice_c),
    C_present: the classes 1..9 that occur in the batch's target or in its argmax prediction (on those pixels).
    Classes absent from both are left out: they would count as perfect (or, with a smoothing term, as noise).
    Background (0) is left out, as in the official score. 0 when no class is present.
    """
    valid = target != IGNORE_INDEX
    labels = target[valid]
    probabilities = logits.float().softmax(1) * valid.unsqueeze(1)  # 0 on ignored pixels
    at_target = probabilities.gather(1, target.where(valid, 0).unsqueeze(1)).squeeze(1)[valid]
    intersection = torch.zeros(NUM_CLASSES, device=logits.device).index_add(0, labels, at_target)[1:]
    truth = torch.bincount(labels, minlength=NUM_CLASSES)[1:]
    predicted = torch.bincount(logits.argmax(1)[valid], minlength=NUM_CLASSES)[1:]
    present = (truth > 0) | (predicted > 0)
    if not present.any():
        return probabilities.sum() * 0.0  # keeps the graph, so backward still works
    dice = 2 * intersection[present] / (probabilities.sum((0, 2, 3))[1:][present] + truth[present])
    return (1 - dice).mean()
