"""What counts as visible text (pure): a message or a title must show something.

A text people send is kept exactly as sent (the log is the ground truth); this module
only decides whether it has at least one character a reader can see, so that a message
of only ``"\\u200b"`` is refused instead of becoming an invisible title.
"""

from __future__ import annotations

import unicodedata
from typing import Final

__all__ = ["INVISIBLE_CATEGORIES", "has_visible", "is_visible"]

INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Mc", "Me"})
"""Unicode general categories (UAX #44) whose characters show nothing by themselves:
controls (``Cc``: tab, newline, …), format characters (``Cf``: zero-width space, joiners,
U+FEFF, word joiner, and the bidirectional controls of UAX #9, U+200E/200F, U+202A..202E,
U+2066..2069), surrogates (``Cs``), space, line and paragraph separators (``Z*``), and
combining marks (``M*``), which only mark the character before them."""

_BLANK: Final = frozenset("\u115f\u1160\u3164\uffa0\u2800")
"""Letters and symbols that render as blank space: the Hangul fillers (``Lo``, also
Default_Ignorable_Code_Point) and the blank Braille pattern (``So``)."""


def is_visible(char: str) -> bool:
    """Whether one character shows something on its own.

    Not visible: the :data:`INVISIBLE_CATEGORIES`, the blank characters above, and the
    unassigned code points Unicode reserves as default-ignorable (U+2065, U+FFF0..FFF8,
    U+E0000..E0FFF: they will never be given a glyph). Every other character is visible,
    private-use (``Co``) and unassigned (``Cn``) ones included: a browser with a newer
    Unicode than this Python's ``unicodedata`` may draw a new emoji there, and a
    character with no glyph shows as a box.
    """
    if char in _BLANK:
        return False
    code = ord(char)
    if code == 0x2065 or 0xFFF0 <= code <= 0xFFF8 or 0xE0000 <= code <= 0xE0FFF:
        return False
    return unicodedata.category(char) not in INVISIBLE_CATEGORIES


def has_visible(text: str) -> bool:
    """Whether ``text`` has at least one visible character (:func:`is_visible`):
    ``"a\\u200b"`` and ``"🙂"`` have, ``"\\u200b\\u200d\\ufeff\\u2060 \\n"``, ``"\\u0301"``
    and ``"\\u202e"`` have not."""
    return any(is_visible(char) for char in text)
