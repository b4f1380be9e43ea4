"""`edgekit` with a pause at one named point of an export, for the interruption and lock tests.

Usage: EDGEKIT_TEST_PAUSE_AT=build|verify|commit python tests/pause_export.py export ARGS...

At the named point (after the first decoder layer is written; before verification; just before the
temporary folder is renamed into place) it prints `edgekit-test: paused at POINT` on stderr and waits
until the file named by EDGEKIT_TEST_RELEASE exists (or 120 s), so a test can signal a real export
process at a known moment. Everything else is the unmodified CLI: its signal handling, cleanup and
exit codes are what is being tested. Wrapping the stage functions here keeps test hooks out of edgekit.
"""

from __future__ import annotations

import os
import sys
import time

import edgekit.bundle.folder as bundle_mod
import edgekit.export.pipeline as export_mod


def pause(name: str) -> None:
    # read at call time: tests/cli_zygote.py loads this module once and forks many commands
    if name != os.environ.get("EDGEKIT_TEST_PAUSE_AT", ""):
        return
    release = os.environ.get("EDGEKIT_TEST_RELEASE", "")
    print(f"edgekit-test: paused at {name}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.05)


_build, _verify, _commit = export_mod.build_decoder, export_mod._verify, bundle_mod._commit
_paused_once: set[str] = set()


def build_decoder(*args, on_layer=None, **kwargs):
    def hook(i: int) -> None:
        if on_layer is not None:
            on_layer(i)
        if "build" not in _paused_once:
            _paused_once.add("build")
            pause("build")

    return _build(*args, on_layer=hook, **kwargs)


def verify(*args, **kwargs):
    pause("verify")
    return _verify(*args, **kwargs)


def commit(*args, **kwargs):
    pause("commit")
    return _commit(*args, **kwargs)


export_mod.build_decoder, export_mod._verify, bundle_mod._commit = build_decoder, verify, commit

if __name__ == "__main__":
    from edgekit.cli import main

    main()
