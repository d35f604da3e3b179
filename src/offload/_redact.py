"""Redaction of secrets in what offload shows: descriptions, reprs, error summaries, logs.

Dead letters and log lines outlive the request that made them and are read by people who
should not see credentials. Redaction here errs towards hiding too much: a parameter
called `keyword` shown as `***` costs little; an API key in a log costs a lot.

What counts as secret (case-insensitive, `-`/`_`/`.`/`[`/`]` ignored):
- the names Authorization, Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key;
- any name containing token, secret, key, password, passwd, signature, credential,
  session, authoriz or authenticat (X-Authorization, X-Amzn-Authorization, Authentication);
- any name with a part (split on `-`, `_`, `.`, `[`, `]`) equal to sig, pwd, pass or jwt,
  or starting with auth (X-Auth, auth_code, authn), but for author and authority;
- except the idempotency key (Idempotency-Key, X-Idempotency-Key), which is not a secret
  and is what people need to see to trace a duplicate charge.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "is_secret_name",
    "join_dsn",
    "redact_dsn",
    "redact_headers",
    "redact_text",
    "redact_third_party_logs",
    "redact_url",
    "scrub",
    "userinfo_of",
]

REDACTED = "***"
MIN_SCRUBBED_CHARS = 4
"""A known secret shorter than this is not scrubbed from text: it would hit ordinary
words and numbers, and it gives little away."""

_SECRET_NAMES = frozenset({"authorization", "proxyauthorization", "cookie", "setcookie", "xapikey"})
_SECRET_FRAGMENTS = (
    "token",
    "secret",
    "key",
    "password",
    "passwd",
    "signature",
    "credential",
    "session",
    "authoriz",
    "authenticat",
)
_SECRET_PARTS = frozenset({"sig", "pwd", "pass", "jwt"})
_NOT_SECRET = frozenset({"idempotencykey", "xidempotencykey"})
# Rails and PHP nest form names in brackets: user[api_key], auth[token].
_SEPARATORS = re.compile(r"[-_.\s\[\]]+")


def is_secret_name(name: str) -> bool:
    """True if a header, query parameter or field called `name` holds a secret."""
    lowered = name.strip().lower()
    compact = _SEPARATORS.sub("", lowered)
    if compact in _NOT_SECRET:
        return False
    if compact in _SECRET_NAMES or any(f in compact for f in _SECRET_FRAGMENTS):
        return True
    return any(
        part in _SECRET_PARTS or (part.startswith("auth") and not part.startswith("author"))
        for part in _SEPARATORS.split(lowered)
    )


def redact_headers(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    """A copy of `headers` with secret values replaced by `***` (others redacted as text)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {
        str(name): REDACTED if is_secret_name(str(name)) else redact_text(str(value))
        for name, value in items
    }


def _redact_pairs(query: str) -> str:
    """Redact the values of secret names in `a=1&token=x`, keeping everything else verbatim."""
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, eq, _value = parts[i].partition("=")
        if eq and is_secret_name(unquote_plus(name)):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def _redact_netloc(split: SplitResult) -> str:
    netloc = split.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, password = userinfo.partition(":")
    if colon and password:
        return f"{user}:{REDACTED}@{hostport}"
    # A user name alone (`https://ghp_xxx@github.com`, `https://sk_live_x:@api...`) is
    # how several APIs take a token: treat it as the credential.
    return f"{REDACTED}@{hostport}"


def _hidden_userinfo(url: str, start: int, at: int, keep_user: bool) -> str:
    """`url` with its userinfo, `url[start:at]`, shown as `user:***`, or as `***` for a
    lone user name unless `keep_user`."""
    user, colon, password = url[start:at].partition(":")
    shown = f"{user}:{REDACTED}" if colon and password else user if keep_user else REDACTED
    return f"{url[:start]}{shown}{url[at:]}"


def _hide_userinfo(url: str, keep_user: bool) -> str:
    """`url` with its userinfo hidden where urlsplit would not see it: as libpq and
    browsers read an authority, a password may hold `#` or `?` unencoded
    (`postgresql://app:Pa#ss@db/app`), where urlsplit ends the netloc. The userinfo is
    what lies between `://` and the last `@` before the first `/`."""
    userinfo = userinfo_of(url)
    if userinfo is None:
        return url
    start = url.index("://") + 3
    if "@" in _netloc_of(url, start):
        return url  # urlsplit sees it: the usual way redacts it
    return _hidden_userinfo(url, start, start + len(userinfo), keep_user)


def userinfo_of(url: str) -> str | None:
    """The userinfo of `url` (`user:password`, still percent-encoded), found as libpq
    reads it (a password may hold `#` or `?`); None if it has none."""
    start = url.find("://")
    if start < 0 or "@" not in url:
        return None
    start += 3
    slash = url.find("/", start)
    at = url.rfind("@", start, len(url) if slash < 0 else slash)
    return None if at < 0 else url[start:at]


def _netloc_of(url: str, start: int) -> str:
    """The netloc as urlsplit cuts it: from `start` to the first `/`, `?` or `#`."""
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start, end)
        if i >= 0:
            end = i
    return url[start:end]


def _hide_to_last_at(url: str) -> str:
    """`url` with everything between `://` and its last `@` as `***`: the reading of a URL
    that does not parse, whose password may hold a `/` (`https://u:Pa/ss@host/`)."""
    start = url.find("://")
    at = url.rfind("@")
    if start < 0 or at < start + 3:
        return url
    return f"{url[: start + 3]}{REDACTED}{url[at:]}"


def _parsed(url: str, *, port: bool) -> SplitResult | None:
    """`urlsplit(url)`, or None when it raises (or, with `port`, when its port is not a
    number: `https://u:Pa/ss@host` reads as host `u`, port `Pa`)."""
    try:
        split = urlsplit(url)
        if port:
            _ = split.port
    except ValueError:
        return None
    return split


def redact_url(url: str) -> str:
    """`url` with the userinfo password and the values of secret query parameters as `***`.

    The result still reads as a URL (`https://u:***@host/p?token=***&page=2`). Never raises:
    a URL that cannot be parsed has everything between `://` and its last `@` redacted, and
    everything after `?`.
    """
    shown = _hide_userinfo(url, keep_user=False)
    split = _parsed(shown, port=True)
    if split is None:
        shown = _hide_to_last_at(shown)
        split = _parsed(shown, port=True)
    if split is None:
        base, q, _rest = shown.partition("?")
        base = re.sub(r"//[^/@]*@", f"//{REDACTED}@", base)
        return f"{base}{q}{REDACTED}" if q else base
    fragment = split.fragment
    if "=" in fragment:  # OAuth implicit flow puts access_token=... in the fragment
        fragment = _redact_pairs(fragment)
    netloc, query = _redact_netloc(split), _redact_pairs(split.query)
    if shown == url and (netloc, query, fragment) == (split.netloc, split.query, split.fragment):
        return url  # nothing secret: as it was (urlunsplit would drop sqlite:////'s slashes)
    return urlunsplit((split.scheme, netloc, split.path, query, fragment))


def redact_dsn(url: str) -> str:
    """A database URL (`postgresql://user:password@host/db?...`) with its password, and the
    values of secret query parameters (`password=`, `sslpassword=`), as `***`.

    Unlike `redact_url`, a user name alone is kept: a database role names who connects,
    it is not the credential that an HTTP URL's lone user name often is. A password that
    holds `#`, `?` or `/` unencoded is found as libpq finds it.
    """
    shown = _hide_userinfo(url, keep_user=True)
    split = _parsed(shown, port=False)  # (a multi-host netloc has no single port)
    if split is None:
        return redact_url(url)
    if "@" not in split.netloc and "@" in split.path:
        # `postgresql://app:Pa/ss@host/db`: urlsplit ends the netloc at the password's `/`.
        start = shown.index("://") + 3
        end = shown.rfind("@", start, start + len(split.netloc) + len(split.path))
        shown = _hidden_userinfo(shown, start, end, keep_user=True)
        split = _parsed(shown, port=False)
        if split is None:
            return redact_url(url)
    userinfo, at, hostport = split.netloc.rpartition("@")
    netloc = split.netloc
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if colon else f"{user}@{hostport}"
    return join_dsn(split.scheme, netloc, split.path, _redact_pairs(split.query), split.fragment)


def join_dsn(scheme: str, netloc: str, path: str, query: str, fragment: str = "") -> str:
    """A database URL from its parts, with `//` kept when the authority is empty
    (`postgresql:///app`: the local socket; urlunsplit would make it `postgresql:/app`)."""
    return (
        f"{scheme}://{netloc}{path}"
        + (f"?{query}" if query else "")
        + (f"#{fragment}" if fragment else "")
    )


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_AUTH_SCHEME = re.compile(
    r"\b(Bearer|Basic|Digest|Negotiate|NTLM|AWS4-HMAC-SHA256)(\s+)(?!\*\*\*)([^\s'\",]+)",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# name=value, name='value', name="value"  (query strings, kwargs reprs, log-style text);
# a name may be percent-encoded or bracketed, as requests sends user[api_key].
_PAIR = re.compile(
    r"(?<![\w%\[\]-])([A-Za-z%][\w.\-%\[\]]*)(=)(\"[^\"]*\"|'[^']*'|[^\s&'\",;)\]}]+)"
)
# The path and query of a URL without its scheme and host, as requests and urllib3 quote
# it: "Max retries exceeded with url: /v1/me?token=..." and "GET /v1/me?token=... HTTP/1.1".
_PATH_QUERY = re.compile(r"(?<![\w/:.@-])/[^\s?'\"<>`]*\?([^\s'\"<>`]+)")
# botocore's ParamValidationError quotes the value it refused: call data, often a secret.
# "Invalid type for parameter NAME, value: VALUE, type: ..." (or ", valid min ...").
_PARAM_VALUE = re.compile(r"\bparameter [^\s,]+, value: ")
_PARAM_VALUE_END = re.compile(r", (?:type: |valid min )")
# A header value refused before it was sent, as h11 (under httpx) and requests quote it:
# "Illegal header value b'Bearer ...\\n'", "... in header value: 'sk-...\\n'". A token read
# from a file with its line break is the usual cause, so the value is the secret itself.
_HEADER_VALUE = re.compile(r"(\bheader value:? b?)(['\"])(.*?)(?<!\\)\2")
# 'name': 'value', "name": "value" and 'name': b'value'  (dict reprs and JSON)
_QUOTED_PAIR = re.compile(r"(['\"])([^'\"]{1,100})\1(\s*:\s*b?)(['\"])(.*?)(?<!\\)\4")
# Name: value at the start of a line (header dumps). Only header-shaped names (with a
# dash, or a known header) so that "KeyError: 'x'" keeps its message.
_HEADER_LINE = re.compile(r"(?m)^([A-Za-z][\w]*-[\w\-]*|Authorization|Cookie)(:[ \t]*)(\S.*)$")
_TRAILING = ").,;:]}!?"


def _pair(match: re.Match[str]) -> str:
    name, eq, value = match.group(1), match.group(2), match.group(3)
    if not is_secret_name(unquote_plus(name) if "%" in name else name):
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{name}{eq}{quote}{REDACTED}{quote}"


def _quoted_pair(match: re.Match[str]) -> str:
    q1, name, colon, q2, value = match.groups()
    if is_secret_name(name):
        return f"{q1}{name}{q1}{colon}{q2}{REDACTED}{q2}"
    # A match consumes its value, and the value may hold pairs of its own: botocore logs
    # a request body as 'body': b'{"SecretString": "..."}'. Look inside.
    inner = _QUOTED_PAIR.sub(_quoted_pair, value)
    return match.group(0) if inner == value else f"{q1}{name}{q1}{colon}{q2}{inner}{q2}"


def _header_line(match: re.Match[str]) -> str:
    name, colon, _value = match.groups()
    return f"{name}{colon}{REDACTED}" if is_secret_name(name) else match.group(0)


def _url(match: re.Match[str]) -> str:
    # "(see https://h/x?token=a)." : the closing punctuation belongs to the prose.
    url = match.group(0)
    stripped = url.rstrip(_TRAILING)
    return redact_url(stripped) + url[len(stripped) :]


def _path_query(match: re.Match[str]) -> str:
    whole, query = match.group(0), match.group(1)
    stripped = query.rstrip(_TRAILING)
    redacted = _redact_pairs(stripped)
    if redacted == stripped:
        return whole
    return f"{whole[: match.start(1) - match.start(0)]}{redacted}{query[len(stripped) :]}"


def _param_values(text: str) -> str:
    """botocore's quoted parameter values as `***`: one pass, each value up to its end
    marker (a lazy regex over the whole text would take quadratic time)."""
    parts: list[str] = []
    pos = 0
    while (start := _PARAM_VALUE.search(text, pos)) is not None:
        end = _PARAM_VALUE_END.search(text, start.end())
        if end is None:
            break  # no value further on has an end either
        parts += (text[pos : start.end()], REDACTED)
        pos = end.start()
    return "".join(parts) + text[pos:] if parts else text


def redact_text(text: str) -> str:
    """Free text (an exception message, a log line) with the secrets in it replaced by `***`.

    Covers URLs (userinfo and secret query parameters, also of a path-only URL as
    requests quotes it), `Bearer`/`Basic`/... credentials, AWS access key ids, the
    values botocore quotes when it refuses a parameter, the value of a header refused
    before sending, and `name=value` / `'name': 'value'` / `Name: value` pairs whose name
    is secret. Best effort by nature: it cannot know that an opaque word is a key.
    """
    text = _URL.sub(_url, text)
    if "?" in text:
        text = _PATH_QUERY.sub(_path_query, text)
    if "value: " in text:
        text = _param_values(text)
    if "header value" in text:
        text = _HEADER_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    text = _QUOTED_PAIR.sub(_quoted_pair, text)
    text = _PAIR.sub(_pair, text)
    return _HEADER_LINE.sub(_header_line, text)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` (values a call is known to hold, such as its own
    API key) as `***`, wherever they stand: no pattern finds a key quoted in prose."""
    for secret in sorted(set(secrets), key=len, reverse=True):  # a longer one holds a shorter
        if len(secret) >= MIN_SCRUBBED_CHARS and secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (it never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.name == "botocore.endpoint"
            and isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], dict)
            and "body" in args[1]
        ):
            # "Making request ... with params: {..., 'body': ...}": request bodies are
            # never logged; they carry the call's data (passwords, tokens, messages).
            record.args = (args[0], {**args[1], "body": REDACTED})
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the handler's problem, not ours
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_FILTER = RedactingFilter()
# The loggers that print request URLs, headers or bodies at DEBUG: urllib3 logs every
# request line with its query string; botocore logs headers (X-Amz-Security-Token is a
# credential) and response bodies.
_THIRD_PARTY_LOGGERS = (
    "urllib3.connectionpool",
    "botocore.endpoint",
    "botocore.auth",
    "botocore.parsers",
    "botocore.hooks",
)


def redact_third_party_logs() -> None:
    """Redact the DEBUG lines of urllib3 and botocore that carry secrets (idempotent)."""
    for name in _THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
