"""Postgres DSNs in both spellings libpq accepts, with their passwords kept out of every message.

A DSN is a URL (`postgresql://gate:pw@db:5432/auth?sslmode=require`) or libpq's keyword form
(`host=db port=5432 user=gate password='a b' dbname=auth`), which psql and most guides also use.
asyncpg and SQLAlchemy read only URLs, so a keyword DSN becomes a URL once, when the settings are
read. Wherever a DSN may reach a message or a log line, `redact_dsn` and `mask_passwords` hide the
password in either spelling.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

MASK = "***"

# libpq's keywords that asyncpg understands (anything else it would send to the server as a
# setting, and a misspelt `pasword=` would then show in messages unmasked).
KEYWORDS = frozenset(
    {
        "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "application_name",
        "sslmode", "sslcert", "sslkey", "sslpassword", "sslrootcert", "sslcrl", "sslnegotiation",
        "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
        "krbsrvname", "gsslib", "service",
    }
)  # fmt: skip
_NOT_PAIRS = (
    "is neither a postgresql:// URL nor libpq's keyword=value pairs "
    "(a value with spaces goes in 'single quotes')"
)

# The parts a URL spells in its authority and path; any other keyword becomes a query parameter
# (asyncpg reads sslmode, sslrootcert, passfile, target_session_attrs, ... from there).
_URL_PARTS = frozenset({"host", "hostaddr", "port", "user", "password", "dbname"})

_KEYWORD = re.compile(r"[A-Za-z_]+")
_PASSWORD_IN_URL = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")
# `password=secret`, `password = 'a b'` (keyword DSNs) and `?password=secret&` (URL queries).
_PASSWORD_KEYWORD = re.compile(
    r"""(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|(?:[^\s'&\\]|\\.)+)""", re.IGNORECASE
)


def is_url(dsn: str) -> bool:
    return "://" in dsn


def parse_keywords(text: str) -> dict[str, str]:
    """libpq's `keyword = value ...` syntax: values may be 'single quoted' with \\' and \\\\.

    A ValueError names at most a keyword (text before `=`), never a value: one is a password.
    """
    pairs: dict[str, str] = {}
    i, end = 0, len(text)
    while True:
        while i < end and text[i].isspace():
            i += 1
        if i == end:
            return pairs
        match = _KEYWORD.match(text, i)
        if match is None:
            raise ValueError(_NOT_PAIRS)
        i = match.end()
        while i < end and text[i].isspace():
            i += 1
        if i == end or text[i] != "=":
            raise ValueError(_NOT_PAIRS)  # that word may be a piece of an unquoted password
        keyword = match.group(0).lower()
        if keyword not in KEYWORDS:
            raise ValueError(
                f"has the unknown keyword {keyword!r}; known: {', '.join(sorted(KEYWORDS))}"
            )
        i += 1
        while i < end and text[i].isspace():
            i += 1
        value, i = _value(text, i, keyword)
        pairs[keyword] = value


def _value(text: str, i: int, keyword: str) -> tuple[str, int]:
    quoted = i < len(text) and text[i] == "'"
    i += quoted
    chars: list[str] = []
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if (quoted and char == "'") or (not quoted and char.isspace()):
            return "".join(chars), i + quoted
        chars.append(char)
        i += 1
    if quoted:
        raise ValueError(f"the quoted value of {keyword!r} has no closing quote")
    return "".join(chars), i


def keywords_to_url(pairs: dict[str, str]) -> str:
    """The URL that says what the keyword DSN says (hosts and ports may be comma lists)."""
    hosts = [h.strip() for h in (pairs.get("host") or pairs.get("hostaddr") or "").split(",")]
    ports = [p.strip() for p in pairs.get("port", "").split(",")]
    query = [(k, v) for k, v in pairs.items() if k not in _URL_PARTS]
    netloc_hosts: list[str] = []
    if any(host.startswith("/") for host in hosts):  # a Unix socket folder: asyncpg reads ?host=
        query = [("host", pairs["host"]), *(("port", p) for p in ports if p), *query]
    elif hosts != [""] or ports != [""]:
        if len(ports) == 1 and len(hosts) > 1:
            ports = ports * len(hosts)
        if len(ports) != len(hosts):
            raise ValueError("'host' and 'port' list different numbers of servers")
        for host, port in zip(hosts, ports, strict=True):
            shown = f"[{host}]" if ":" in host else host
            netloc_hosts.append(f"{shown}:{port}" if port else shown)
    auth = quote(pairs.get("user", ""), safe="")
    if pairs.get("password"):
        auth += ":" + quote(pairs["password"], safe="")
    netloc = (auth + "@" if auth else "") + ",".join(netloc_hosts)
    path = "/" + quote(pairs["dbname"], safe="") if pairs.get("dbname") else ""
    return f"postgresql://{netloc}{path}" + (f"?{urlencode(query)}" if query else "")


def as_url(dsn: str) -> str:
    """A DSN in the URL spelling: URLs as they are, keyword DSNs converted."""
    text = dsn.strip()
    if not text or is_url(text):
        return text
    return keywords_to_url(parse_keywords(text))


def redact_dsn(dsn: str) -> str:
    """The DSN with its password masked, wherever it stands (user part, `?password=`, keyword)."""
    if not is_url(dsn):
        return mask_passwords(dsn)
    parts = urlsplit(dsn)
    if parts.password is None and "password" not in parts.query.lower():
        return dsn
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:{MASK}@{netloc}")
    if parts.query:
        query = [
            (name, MASK if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def mask_passwords(text: str) -> str:
    """`text` with every password it spells masked: `scheme://user:pw@`, `password=pw`."""
    text = _PASSWORD_IN_URL.sub(rf"\1:{MASK}@", text)
    return _PASSWORD_KEYWORD.sub(rf"\g<1>{MASK}", text)
