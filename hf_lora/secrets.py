"""Keeping tokens out of error texts: a Hub server (or a proxy) may echo a request's Authorization header
in its error body, which huggingface_hub puts into its exception's message."""

from __future__ import annotations

import os
import re

# A Hub token (hf_ and 30-odd letters), and whatever follows an Authorization header or "Bearer".
_TOKEN_LIKE = re.compile(
    r"hf_[A-Za-z0-9]{8,}|(?i:(?<=bearer )|(?<=authorization: )|(?<=authorization=))[^\s'\",;]+"
)
_ENV_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def scrub_secrets(text: str, *tokens: str | bool | None) -> str:
    """`text` with `tokens`, the environment's Hub tokens and anything that looks like a token replaced by
    ``<redacted>``."""
    known = [t for t in (*tokens, *(os.environ.get(n) for n in _ENV_TOKENS)) if isinstance(t, str) and t]
    for token in sorted(known, key=len, reverse=True):
        text = text.replace(token, "<redacted>")
    return _TOKEN_LIKE.sub("<redacted>", text)
