"""Safe names derived from model names (for socket paths and unit names). Pure."""

import re
import zlib

# The C module behind hashlib.blake2b, imported directly: importing hashlib would load
# OpenSSL into the daemon (3.6 MiB RSS); _blake2 costs about 0.1 MiB.
from _blake2 import blake2b


def short_digest(text):
    """8 hex digits that tell apart names which slug alike. zlib, not hashlib: hashlib
    would load OpenSSL into the daemon (3.6 MiB RSS) for no security need."""
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def long_digest(text):
    """32 hex digits identifying ``text`` (e.g. a model's definition) beyond accidents."""
    return blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def slug(text, limit):
    """Only [A-Za-z0-9_.-], no leading or trailing '-' or '.', at most ``limit`` characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit].rstrip("-.")


def safe_name(text, limit):
    """``<slug>-<digest>``, or just the digest when nothing of the name is safe."""
    name_slug = slug(text, limit)
    digest = short_digest(text)
    return f"{name_slug}-{digest}" if name_slug else digest
