"""How the check records a failure: one line per error, a row that fails without ending its part,
and SIGTERM, which is no failure of a part."""

from __future__ import annotations

import traceback


class Terminated(BaseException):
    """SIGTERM: not a failure of one part, so no part catches it; the finally blocks still run."""


def terminate(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def describe(exc: BaseException) -> str:
    """The exception's type and message on one line, at most 2,000 characters (for the JSON)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def guarded(what: str, fn) -> dict:
    """fn()'s dict, or {"error": ...} when it raises: one failing row does not end its part."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        print(f"  {what}: ERROR {describe(exc)}", flush=True)
        return {"error": describe(exc)}
