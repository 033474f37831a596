"""SAR-RARP50 release on disk -> validated, split, augmented training samples."""

CLASS_NAMES = (
    "background", "tool clasper", "tool wrist", "tool shaft", "suturing needle",
    "thread", "suction tool", "needle holder", "clamps", "catheter",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255  # mask value for pixels that carry no label (augmentation fill, padding)
PATCH_SIZE = 16
