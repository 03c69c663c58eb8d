"""What every foe-* command does with bad input: one line on stderr naming the option or field
and the fix, exit 2, before any process starts (``OneLineParser``, ``at_least``, ``link_rate``,
``fail``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn


def fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit 2, like every other error
    (--help still prints the full usage)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see {self.prog} --help")


def at_least(least: int) -> Callable[[str], int]:
    """argparse ``type`` of a count option: a whole number of at least ``least``, so that 0 or
    a negative count is refused by the parser, before any process starts."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}; pass at least {least}")
        return value

    return count


_TC_RATE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]i?)?(bit|bps)", re.IGNORECASE)


def link_rate(text: str) -> str:
    """argparse ``type`` of --link-rate: a positive rate in tc's syntax (1gbit, 100mbit,
    12.5mbps), so that a typo is refused before any network namespace is built."""
    match = _TC_RATE.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a link rate; pass a positive number "
                                         f"with a tc unit, e.g. 1gbit, 100mbit or 10gbit")
    return text
