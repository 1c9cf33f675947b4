"""Who may see which conversation (DESIGN.md "The household": isolation).

A conversation is visible to its owner, and read-only to the guardians of a child owner
(every active parent). To anyone else it does not exist: the routes answer ``404``, the
same as an unknown id, and lists leave it out. Logs written before accounts (no
``owner``) belong to the first parent. In single-person mode the :data:`LOCAL` viewer
owns everything. Pure: decisions from the viewer, the log's owner and the household.
"""

from __future__ import annotations

import enum

from ..storage.household import Account, HouseholdState
from .sessions import Viewer

__all__ = ["Access", "access", "guardians", "owner_of"]


class Access(enum.Enum):
    """What a viewer may do with one conversation."""

    OWNER = "owner"
    """Read and write."""
    GUARDIAN = "guardian"
    """Read only (a parent, on a child's conversation); every read is in its audit log."""


def owner_of(owner: str | None, state: HouseholdState) -> str | None:
    """The account id that owns a log whose ``conversation`` record says ``owner``: the
    first parent's for a log written before accounts."""
    if owner is not None:
        return owner
    first = state.first_parent()
    return first.id if first is not None else None


def access(viewer: Viewer, owner: str | None, state: HouseholdState) -> Access | None:
    """What ``viewer`` may do with a conversation whose log names ``owner``; ``None``:
    it must not learn that the conversation exists."""
    if viewer.local:
        return Access.OWNER
    owner = owner_of(owner, state)
    if owner == viewer.id:
        return Access.OWNER
    if viewer.role == "parent":
        account = state.accounts.get(owner or "")
        if account is not None and account.role == "child":
            return Access.GUARDIAN
    return None


def guardians(account: Account, state: HouseholdState) -> list[Account]:
    """Who may read ``account``'s conversations besides itself: the active parents, for a
    child; nobody for a parent or an adult."""
    if account.role != "child":
        return []
    return [a for a in state.active() if a.role == "parent"]
