"""User text on its way out: credentials masked, rich markup escaped.

Messages quote what the user gave (a recipe path, a `--set` value, a database URL, an exception's
text), and both the terminal and the results database keep them. A password in a SQLAlchemy URL
(`postgresql://user:secret@host/db`) must appear in neither; and rich parses `[...]` in a message
as markup, so `--set methods=[joint]` would lose `[joint]` and a `[/x]` would crash the printer.
"""
from __future__ import annotations

import re
from typing import Any

from rich.markup import escape

MASK = "***"
# scheme://user:password@  (the password ends at the first '@'; '@' inside one must be %-encoded)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s'\"]*:)[^@\s'\"]*@")
# libpq key=value strings: password=secret
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;&)]+)", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """`text` with every URL password and `password=...` value replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def plain(obj: Any) -> str:
    """Any user text, safe to put into a rich markup string: masked, then escaped."""
    return escape(mask_credentials(str(obj)))
