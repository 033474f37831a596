"""The training loss, built from the config: class-weighted cross entropy on full-resolution logits, optionally plus
a soft Dice term; the class weights come from each class's pixel frequency over the training split."""

import numpy as np
import torch
import torch.nn.functional as F

from dataset import IGNORE_INDEX, NUM_CLASSES

LOSSES = ("ce", "ce+dice")
CLASS_WEIGHTS = {  # name: (formula, weights of the per-class pixel frequencies f over the training split)
    "enet": (
        "w = 1 / ln(1.02 + f) (ENet, Paszke et al. 2016): rare classes weigh more, at most 1/ln(1.02) = 50.5",
        lambda f: 1.0 / np.log(1.02 + f),
    ),
    "one-minus-frequency": (
        "w = 1 - f (the design we start from): every class near 1, frequent ones a little less",
        lambda f: 1.0 - f,
    ),
    "none": ("w = 1: plain cross entropy", np.ones_like),
}


def class_weights_from_frequencies(frequencies: np.ndarray, kind: str = "enet") -> np.ndarray:
    """Loss weight of every class from its pixel frequency, by one of the CLASS_WEIGHTS formulas."""
    return CLASS_WEIGHTS[kind][1](np.asarray(frequencies, dtype=np.float64))


def make_loss(config, class_weights: torch.Tensor):
    """loss(logits, target) of config.loss ("ce" or "ce+dice", the Dice term weighing config.dice_weight)."""

    def loss(logits, target):
        value = weighted_cross_entropy(logits, target, class_weights)
        if config.loss == "ce+dice":
            value = value + config.dice_weight * soft_dice_loss(logits, target)
        return value

    return loss


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
