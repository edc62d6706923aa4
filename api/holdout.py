"""Holdout assignment: a deterministic hash of the visitor's stable id.

The stable id is the session that first linked the user (the user profile's anchor) when
the visitor is known, else the session id. An anonymous visitor who logs in therefore
keeps their group (their session becomes the user's anchor), and a returning user keeps
theirs on every device.
"""

from __future__ import annotations

import enum
import hashlib

SALT = b"kairos-holdout-v1"


class Group(enum.StrEnum):
    TREATMENT = "treatment"
    HOLDOUT = "holdout"


def bucket(stable_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id."""
    digest = hashlib.blake2b(stable_id.encode(), digest_size=8, key=SALT).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def stable_id(session_id: str, user_anchor: str | None) -> str:
    return user_anchor or session_id


def assign(stable: str, share: float) -> Group:
    return Group.HOLDOUT if bucket(stable) < share else Group.TREATMENT
