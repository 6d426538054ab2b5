"""Shared entry-point behaviour of the data tools: logging to stderr, clean error exits."""
from __future__ import annotations

import logging
import sys
from typing import Callable


def run_tool(main: Callable[[], object]) -> None:
    """Run a tool's main(); bad input or paths exit 1 with the message, Ctrl-C exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: no output was written (temporary files were removed)",
              file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
