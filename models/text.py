"""Query text checks shared by everything that hands a query to a tokenizer or to BM25.

JSON can carry text that is not valid Unicode (``"\\ud800"`` decodes to a lone UTF-16
surrogate) and characters no model was trained on (C0/C1 controls such as NUL). The Rust
tokenizer cannot convert a lone surrogate to UTF-8 and raises; BM25 silently drops it. So
every query goes through :func:`clean_query` first: lone surrogates are rejected with a
message that names the character and its position, control characters become spaces, and
a query with no visible character left (only whitespace, controls or zero-width format
characters) is rejected as blank.
"""

from __future__ import annotations

import re

#: A lone surrogate code point: never valid in text that came from UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: C0 and C1 control characters other than tab, line feed and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: One character that shows something: not whitespace, not a control, not a zero-width or
#: other invisible format character (soft hyphen, joiners, direction marks, word joiner,
#: BOM). The service's OpenAPI schema states the same pattern for queries.
VISIBLE_PATTERN = "[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u200b-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\ufeff]"
_VISIBLE = re.compile(VISIBLE_PATTERN)


class QueryTextError(ValueError):
    """The query text cannot be searched; the message says why (for a 4xx response)."""


def has_visible_text(text: str) -> bool:
    """Whether ``text`` has at least one character that is not whitespace, control or format.

    >>> has_visible_text("\\u200b \\x00\\ufeff"), has_visible_text(" \\u200bx")
    (False, True)
    """
    return _VISIBLE.search(text) is not None


def clean_query(text: str) -> str:
    """``text`` with control characters replaced by spaces.

    Raises
    ------
    QueryTextError
        When ``text`` holds a lone surrogate (named with its position) or nothing visible.

    >>> clean_query("heart\\x00disease")
    'heart disease'
    >>> clean_query("heart \\ud800 disease")
    Traceback (most recent call last):
    ...
    models.text.QueryTextError: query has a lone UTF-16 surrogate U+D800 at character 6, which is not valid Unicode text
    """
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise QueryTextError(
            f"query has a lone UTF-16 surrogate U+{ord(bad.group()):04X} at character {bad.start()}, "
            "which is not valid Unicode text"
        )
    text = _CONTROL.sub(" ", text)
    if not has_visible_text(text):
        raise QueryTextError("query must be a non-empty string with visible characters "
                             "(whitespace, control and zero-width characters do not count)")
    return text
