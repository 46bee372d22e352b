"""Where launchers found ``run_async``; it lives with the event loop (loop.py) now."""

from ..loop import CommandResult, run_async

__all__ = ["CommandResult", "run_async"]
