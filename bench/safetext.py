"""Text from outside llmbench (labels, suite names, model paths, trial errors, environment
strings) made safe where it is shown or used as a file name.

- `terminal(s)`: for the terminal. Control characters (ANSI escape sequences start with ESC,
  0x1b), C1 controls and the Unicode bidirectional overrides that reorder what a reader sees
  ("Trojan Source", CVE-2021-42574) are shown as `\\x1b`-style escapes instead of acting on the
  terminal; a long text is cut to `limit` characters (its start and its end kept), saying how
  much was left out. `shown(s)` also escapes rich markup, for values put into markup strings.
- `html_text(s)`: the same cut for the HTML report (Jinja2 escapes the markup itself).
- `file_part(s)`: a file-name component: letters, digits, `.`, `_` and `-` only, never `.` or
  `..`, never starting with a dot, at most 80 characters; a name that had to change gets 8 hex
  digits of its SHA-256, so two different names never share a file.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

TERMINAL_LIMIT = 400   # characters of one value on the terminal
HTML_LIMIT = 4000      # characters of one value in the report (cut values keep their end: a traceback's error)
FILE_LIMIT = 80

# U+202A-U+202E (embeddings, overrides), U+2066-U+2069 (isolates), U+200E/U+200F (marks), U+061C
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_FILE_OK = re.compile(r"[A-Za-z0-9._-]")


def _escaped(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def _cut(s: str, limit: int) -> str:
    """`s` cut to `limit` characters, keeping its first quarter and its last three quarters
    (a traceback's error and a path's file name are at the end), saying how much is left out."""
    if len(s) <= limit:
        return s
    head = limit // 4
    return s[:head] + f" … [{len(s) - limit:,} more characters] … " + s[len(s) - (limit - head):]


def _clean(s: object, limit: int, keep: str) -> str:
    """`s` with every control character but those in `keep`, and every bidi override, written
    as an escape; cut to `limit` characters."""
    text = "" if s is None else str(s)
    return _cut("".join(_escaped(ch) if ch in _BIDI or (unicodedata.category(ch) == "Cc" and ch not in keep) else ch
                        for ch in text), limit)


def terminal(s: object, limit: int = TERMINAL_LIMIT, newlines: bool = False) -> str:
    """For the terminal: control characters (newlines too, unless `newlines`) and bidi overrides
    escaped, cut to `limit` characters."""
    return _clean(s, limit, "\n" if newlines else "")


def html_text(s: object, limit: int = HTML_LIMIT) -> str:
    """For the HTML report: control characters but newlines and tabs, and bidi overrides,
    escaped; cut (Jinja2's autoescape then escapes <, >, & and quotes)."""
    return _clean(s, limit, "\n\t")


def file_part(s: object, limit: int = FILE_LIMIT) -> str:
    """A safe file-name component for `s` (see the module's docstring)."""
    text = "" if s is None else str(s)
    safe = "".join(ch if _FILE_OK.fullmatch(ch) else "_" for ch in text).lstrip(".")
    if safe == text and 0 < len(safe) <= limit:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[:limit - 9]}-{digest}" if safe else digest


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    """A run id names files and folders (RESULTS/RUN_ID, report-RUN_ID.html): letters, digits,
    `.`, `_` and `-`, starting with a letter or digit, at most 100 characters; else ValueError."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {terminal(run_id, 120)!r}: a run id is 1-100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    return run_id


def shown(s: object, limit: int = TERMINAL_LIMIT) -> str:
    """terminal(s) for a rich markup string: its brackets escaped, so that `[red]` or
    `[link=...]` in data is printed as written and never read as markup."""
    from rich.markup import escape

    return escape(terminal(s, limit))
