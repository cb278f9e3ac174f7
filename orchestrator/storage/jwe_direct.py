"""Compact JWE with `dir` + `A256GCM` (RFC 7516, RFC 7518 section 5.3), the one form worker
tokens take, sealed and opened in a few calls instead of through joserfc's general machinery.

joserfc spends ~65 us of CPU sealing a 1.7 KB token and ~90 us opening it (header registries,
recipient objects, key guessing, the same AES-GCM underneath); AES-GCM itself takes ~4 us. A
dispatch seals a token and a callback opens one, so that is ~0.15 ms of every task's lifecycle.

This module does only the shape `storage.tokens.TokenKeyring` issues, and the keyring keeps
joserfc for everything else:
- sealing writes exactly the bytes `joserfc.jwe.encrypt_compact` writes for the same header, key,
  plaintext and IV (tests/unit/test_jwe_direct.py holds the two to identical tokens);
- opening takes a token only when it has that exact shape: a protected header segment that is
  byte for byte one this keyring writes (so the key is known from it, and the header is
  authenticated as the AAD in any case), an empty encrypted key, a 96-bit IV, a 128-bit tag and
  a canonical base64url ciphertext within the size cap. `open_token` answers None for anything
  else, and the caller hands such a token to joserfc, which accepts or refuses it as before.
  The only answer of its own is a failed authentication (`InvalidTag`), which joserfc gives the
  same token too.
"""

from __future__ import annotations

import base64
import binascii
import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["DirectGcm", "InvalidTag", "b64url"]

_IV_BYTES = 12  # a 96-bit IV is required with A256GCM (RFC 7518 section 5.3)
_TAG_BYTES = 16
# Segment lengths of a 12-byte IV and a 16-byte tag in unpadded base64url.
_IV_CHARS = 16
_TAG_CHARS = 22
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# The characters an unpadded segment may end with when 1 or 2 "=" would pad it: the ones whose
# unused low bits are zero (any other one has a twin that decodes to the same bytes).
_LAST_CHARS = {1: frozenset("AEIMQUYcgkosw048"), 2: frozenset("AQgw")}


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2), as JOSE writes every segment."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode_canonical(segment: str) -> bytes | None:
    """The bytes of an unpadded base64url segment, or None unless the segment is the one
    canonical encoding of them (no padding, no '+' or '/', no stray bits in the last character,
    nothing outside the alphabet): only those are taken here, the rest is joserfc's to judge."""
    pad = -len(segment) % 4
    if pad == 3 or "+" in segment or "/" in segment or "=" in segment:
        return None
    if pad and segment[-1] not in _LAST_CHARS[pad]:
        return None
    try:
        # strict_mode: any character outside the (standard) alphabet is an error, not skipped
        return binascii.a2b_base64((segment + "=" * pad).encode("ascii").translate(_URLSAFE_TO_STANDARD),
                                   strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        return None


class DirectGcm:
    """One key of the ring: seals tokens under it, and opens tokens in the shape it seals."""

    def __init__(self, kid: str, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("A256GCM takes a 32-byte key")
        self.kid = kid
        self._aead = AESGCM(key)
        # joserfc's protected header: json.dumps(ensure_ascii, compact separators), keys in the
        # order given (alg, enc, kid), then unpadded base64url. It is also the AAD.
        header = json.dumps({"alg": "dir", "enc": "A256GCM", "kid": kid}, ensure_ascii=True, separators=(",", ":"))
        self.header_segment = b64url(header.encode("ascii"))
        self._aad = self.header_segment.encode("ascii")

    def seal(self, plaintext: bytes, *, iv: bytes | None = None) -> str:
        """A compact JWE of `plaintext`: header, empty encrypted key (`dir`), IV, ciphertext, tag.
        `iv` is for tests that compare with joserfc; by default 12 fresh random bytes."""
        if iv is None:
            iv = os.urandom(_IV_BYTES)
        elif len(iv) != _IV_BYTES:
            raise ValueError("A256GCM takes a 12-byte IV")
        sealed = self._aead.encrypt(iv, plaintext, self._aad)
        ciphertext, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
        return f"{self.header_segment}..{b64url(iv)}.{b64url(ciphertext)}.{b64url(tag)}"

    def open_token(self, parts: list[str], *, max_ciphertext_chars: int) -> bytes | None:
        """The plaintext of a token split at its dots, if the token has exactly the shape `seal`
        writes under this key; None when it does not (the caller asks joserfc then). Raises
        InvalidTag when it has the shape but fails authentication: tampered, or sealed under
        another key of the same id."""
        if (
            len(parts) != 5
            or parts[0] != self.header_segment
            or parts[1]
            or len(parts[2]) != _IV_CHARS
            or len(parts[4]) != _TAG_CHARS
            or len(parts[3]) > max_ciphertext_chars
        ):
            return None
        iv = _b64url_decode_canonical(parts[2])
        ciphertext = _b64url_decode_canonical(parts[3])
        tag = _b64url_decode_canonical(parts[4])
        if iv is None or ciphertext is None or tag is None:
            return None
        return self._aead.decrypt(iv, ciphertext + tag, self._aad)
