"""The post-training options' vocabulary: the ``--ptq`` modes and the ``--bits`` parser. The PTQ pass lists
themselves are assembled in :mod:`qcompile.pipelines`."""

from __future__ import annotations

from qcompile.errors import BitWidthsError

PTQ_MODES = ("light", "advanced")


def parse_bits(text: str) -> list[int]:
    """``4,8`` → [4, 8]."""
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise BitWidthsError(text, "expected comma-separated bit widths, e.g. 4,8") from None
