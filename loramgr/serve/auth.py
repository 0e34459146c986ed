"""Who may call the API: the bearer key and A1111's HTTP Basic credentials (docs/serving.md, Security).

``--api-key KEY`` asks for ``Authorization: Bearer KEY``; ``--api-auth USER:PASS[,USER2:PASS2]``
for HTTP Basic, as A1111's flag of that name (clients such as Open WebUI can send nothing
else). With both, either one is accepted. Every comparison runs in constant time over all
the credentials, so the answer's timing does not tell a near miss or which user exists.
The secrets can come from a file or the environment instead of argv (which ``ps`` shows);
they are never logged, printed or echoed in an error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

def parse_credentials(text: str | None, source: str = "--api-auth") -> tuple[tuple[str, str], ...]:
    """``USER:PASS`` entries separated by commas or newlines (a password may hold ``:``, not ``,``).

    Raises ValueError naming the entry's position, never its text.
    """
    if text is None:
        return ()
    entries = [e.strip() for e in text.replace("\n", ",").split(",")]
    credentials = []
    for number, entry in enumerate((e for e in entries if e), start=1):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{source}: entry {number} is not USER:PASS (a user name, a colon, a password)")
        credentials.append((user, password))
    if not credentials:
        raise ValueError(f"{source}: no USER:PASS entry")
    return tuple(credentials)


def read_secret(value: str | None, path: str | None, env: str, flag: str) -> str | None:
    """The secret given as ``flag VALUE``, else in the file ``flag-file PATH``, else in ``$env``; None if none.

    The file's text is taken without its trailing newline. Raises ValueError (the flag or
    the file named, the secret never) when both the value and the file are given or the
    file cannot be read or is empty.
    """
    if value is not None and path is not None:
        raise ValueError(f"{flag} and {flag}-file: give one of them")
    if path is not None:
        try:
            text = Path(path).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read {flag}-file ({type(exc).__name__})") from None
        if not text:
            raise ValueError(f"{path}: {flag}-file is empty")
        return text
    return value if value is not None else (os.environ.get(env) or None)


@dataclass(frozen=True, repr=False)
class Access:
    """The check of the ``Authorization`` header; ``required`` is false when neither secret is set."""

    api_key: str | None
    credentials: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, api_key: str | None, api_auth: str | None) -> Access:
        return cls(api_key or None, parse_credentials(api_auth))

    @property
    def required(self) -> bool:
        return bool(self.api_key or self.credentials)

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401: the schemes this server accepts."""
        return ", ".join((["Bearer"] if self.api_key else []) + (['Basic realm="loramgr"'] if self.credentials else []))

    @property
    def wanted(self) -> str:
        """What a 401 asks for, in words."""
        return " or ".join((["Authorization: Bearer KEY"] if self.api_key else [])
                           + (["HTTP Basic credentials (--api-auth)"] if self.credentials else []))

    def allows(self, authorization: str) -> bool:
        """Whether the ``Authorization`` header value carries the key or one of the credentials."""
        if not self.required:
            return True
        scheme, _, token = authorization.strip().partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "bearer" and self.api_key:
            return hmac.compare_digest(token.encode(), self.api_key.encode())
        if scheme == "basic" and self.credentials:
            try:
                user, sep, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                return False
            matched = False
            for known_user, known_password in self.credentials:  # no early exit: same time for every miss
                same_user = hmac.compare_digest(user.encode(), known_user.encode())
                same_password = hmac.compare_digest(password.encode(), known_password.encode())
                matched |= same_user & same_password
            return matched and bool(sep)
        return False
