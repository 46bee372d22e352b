"""Safe names derived from model names (for socket paths and unit names). Pure."""

import re
import zlib


def short_digest(text):
    """8 hex digits that tell apart names which slug alike. zlib, not hashlib: hashlib
    would load OpenSSL into the daemon (3.6 MiB RSS) for no security need."""
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def slug(text, limit):
    """Only [A-Za-z0-9_.-], no leading or trailing '-' or '.', at most ``limit`` characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit].rstrip("-.")


def safe_name(text, limit):
    """``<slug>-<digest>``, or just the digest when nothing of the name is safe."""
    name_slug = slug(text, limit)
    digest = short_digest(text)
    return f"{name_slug}-{digest}" if name_slug else digest
