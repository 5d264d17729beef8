"""Credentials never leave the process: URLs lose their password, secret-looking keys their value.

Applied where anything is written for others to read: markers, the manifest, a run's
``config.json`` and ``metrics.jsonl``, and every one-line error.
"""

from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host ; scheme://token@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?P<user>[^/@\s:]*)(?::(?P<password>[^/@\s]*))?@")
# Keys are judged by their words (snake, kebab or camel case), not substrings, so that harmless
# keys such as a backbone's ``tokens`` description or ``authors`` keep their values; run-together
# names (``apikey``, ``sastoken``) are caught by their ending.
_SECRET_WORDS = frozenset(
    "key secret token password passwd pwd credential credentials session auth authorization sig signature cookie".split()
)
_SECRET_ENDINGS = ("key", "secret", "token", "password", "passwd", "credential", "credentials", "signature")
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:[\w-]*(?:key|secret|token|password|signature|sig|credential)[\w-]*)=)[^&\s]+")
MASK = "***"


def _userinfo(m: re.Match) -> str:
    if m.group("password") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@"


def redact_text(text: str) -> str:
    """``text`` with URL passwords/tokens and secret query parameters masked."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(rf"\1{MASK}", _USERINFO.sub(_userinfo, text))


def is_secret_key(key: str) -> bool:
    """Whether an option named ``key`` holds a credential (``secret``, ``aws_session_token``,
    ``apiKey``, ``sastoken``), not a description (``tokens``, ``authors``)."""
    words = [w.lower() for w in _WORD.findall(key)]
    return any(w in _SECRET_WORDS for w in words) or "".join(words).endswith(_SECRET_ENDINGS)


def redact(value):
    """A copy of ``value`` (JSON-like) with every credential masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and is_secret_key(k) and isinstance(v, (str, bytes)) and v else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
