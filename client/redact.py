"""Stream credentials never leave the client: `redact` hides them in anything written or shown.

A camera URL such as rtsp://admin:S3cretPw@10.0.0.20/stream1?token=abc opens with its credentials (OpenCV gets the
raw URL), but every description, label, results line, page, log and error message gets
rtsp://***@10.0.0.20/stream1?token=*** instead: the user-info part of a URL (user and password) and the values of
query parameters that carry secrets.
"""
from __future__ import annotations

import re

MASK = "***"
# scheme://userinfo@ : the user-info part is everything up to the last '@' before the host's end
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@]*@)+")
# password=..., token=..., api_key=... in a query string (or anywhere key=value-like after ? or &)
SECRET_KEYS = ("password", "passwd", "pwd", "pass", "token", "access_token", "auth", "key", "apikey", "api_key",
               "secret", "signature", "sig", "credential", "credentials", "user", "username")
_QUERY_SECRET = re.compile(r"(?P<lead>[?&;](?:%s)=)(?P<value>[^&#\s;]*)" % "|".join(SECRET_KEYS), re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URL user info (user:password@) and secret query values (password=, token=, ...) masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('lead')}{MASK}" if m.group("value") else m.group(0), text)
