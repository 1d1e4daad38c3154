"""One rule for unreadable inputs in every prediction command.

``xcit predict``, ``xcit attention``, ``xcit embed``, ``xcit segment predict`` and ``xcit detect
predict`` all process every readable image and write its output; each input that cannot be read
(missing, corrupt, not an image, larger than the pixel limit, too small for the model) is reported
on stderr as one line, ``xcit CMD: skipped PATH: REASON``, and in the output where the format has
room for it; the exit status is 0 when every input was processed and :data:`UNREADABLE_EXIT` when
any was not, after everything else is written. ``PATH`` is printable UTF-8 whatever the file's name
(:func:`xcit.data.images.display_path`).
"""
from __future__ import annotations

import argparse
import sys

#: The exit status of a prediction command some of whose inputs could not be read.
UNREADABLE_EXIT = 1


def add_policy(p: argparse.ArgumentParser, where: str = "") -> None:
    """State the rule at the end of ``p``'s --help; ``where`` names the output's own record (', and as ...')."""
    p.epilog = (
        "Unreadable inputs (missing, corrupt, not an image, above the pixel limit, too small for the model) never "
        "stop the run: every readable image is processed "
        f"and its output written; each unreadable one is reported on stderr as one line ('skipped PATH: REASON')"
        f"{where}. Exit status: 0 if every input was processed, {UNREADABLE_EXIT} if any could not be read (after "
        "writing everything else), 2 for a usage error."
    )


class Unreadable:
    """The unreadable inputs of one command run: each reported on stderr as it is found, then the exit status."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.failures: list[tuple[str, str]] = []

    def __call__(self, path: str, reason: str) -> None:
        from tqdm import tqdm

        from ..data.images import display_path

        reason = " ".join(str(reason).split())  # one line whatever the decoder said
        self.failures.append((display_path(path), reason))
        # tqdm.write: a line of its own even while a progress bar is drawn on stderr
        tqdm.write(f"xcit {self.command}: skipped {display_path(path)}: {reason}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.failures)

    def records(self) -> list[dict[str, str]]:
        """``[{"path": ..., "error": ...}]`` for outputs that can hold them (JSON)."""
        return [{"path": path, "error": reason} for path, reason in self.failures]

    def finish(self, total: int) -> int:
        """Print the count of unreadable inputs (if any) and return the exit status."""
        if not self.failures:
            return 0
        print(f"xcit {self.command}: {len(self.failures)} of {total} input(s) could not be read "
              f"(exit status {UNREADABLE_EXIT})", file=sys.stderr)
        return UNREADABLE_EXIT
