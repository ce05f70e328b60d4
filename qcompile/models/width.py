"""The one rounding rule for width multipliers, shared by the models and the width_scale pass."""


def scaled_channels(channels: int, width: float, multiple: int = 8) -> int:
    """Scale a filter count by ``width`` and round half-up to a multiple of ``multiple`` (at least one multiple).

    Hardware likes channel counts in multiples of 8, and the paper's width sweep rounds the same way.
    ``multiple=1`` rounds to the nearest integer.
    """
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    if multiple < 1:
        raise ValueError(f"channel multiple must be >= 1, got {multiple}")
    units = int(channels * width / multiple + 0.5)
    return max(multiple, units * multiple)
