"""Where each object reference was created, for `list_objects` and `summarize_objects`.

Off by default, as in Ray: with RAY_record_ref_creation_sites=1 (config.py), a process
that makes a ref (a put, a task or actor call) names the place in the user's code
(`creation_site`: up to MAX_FRAMES frames outside hpcray, innermost first, "file:line:
function" each, joined by " | ", after what made it: "(put object)", "(task call)") and
tells its node (`CallSites.note`; a worker with a `call_sites` Notice). The node keeps
them by object id for its state rows. Ray's summary groups references by this string;
while off every reference's is "disabled", as Ray's.

Not for: anything on the hot path while off (one flag test per put or submission), nor
refs a process received from elsewhere (they have the site of their creating process's
node, or none: "").
"""

from __future__ import annotations

import os
import sys

MAX_FRAMES = 3
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hpcray/


def creation_site(what: str) -> str:
    """`what` and the user's frames that led here (hpcray's own frames skipped)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < MAX_FRAMES:
        filename = frame.f_code.co_filename
        # Not hpcray's frames, nor the interpreter's (a worker's runpy start).
        if not filename.startswith("<frozen") and \
                not os.path.abspath(filename).startswith(_PACKAGE):
            frames.append(f"{filename}:{frame.f_lineno}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " | ".join([f"({what})"] + frames)


class CallSites:
    """A node's record of where the refs its processes made were created."""

    def __init__(self, entries: dict) -> None:
        self.entries = entries          # the ObjectTable's: an id it lacks is freed
        self.sites: dict[bytes, str] = {}

    def note(self, object_ids, site: str) -> None:
        for object_id in object_ids:
            self.sites[object_id] = site
        if len(self.sites) > 2 * len(self.entries) + 1024:
            # Freed objects go here, in bulk, not on the free path (nothing added there).
            self.sites = {key: site for key, site in self.sites.items()
                          if key in self.entries}

    def get(self, object_id: bytes) -> str | None:
        return self.sites.get(object_id)
