"""How a user error reaches the user: one ``error:`` line on stderr and exit code 2, also for the argparse tools
and for errors Hydra's ``instantiate`` wrapped."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

from npft_lightning.core.errors import UserError


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A user error inside the block (see :func:`user_message`) becomes one ``error:`` line on stderr and exit code 2;
    anything else, or everything with ``HYDRA_FULL_ERROR=1``, keeps its traceback."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only user errors are shortened, everything else re-raises
        message = user_message(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the ``python -m npft_lightning.<module>`` tools: a bad command line is one ``error:`` line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user error, also when Hydra's ``instantiate`` wrapped it; else None.

    A ``ValueError`` raised by one of our constructors while Hydra builds it from the config names
    the bad value and the fix, so it is shown the same way as a :class:`UserError`.
    """
    from hydra.errors import InstantiationException

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return str(err).splitlines()[0]
        if isinstance(err, InstantiationException):
            cause = err.__cause__ or err.__context__
            if isinstance(cause, (UserError, ValueError)):
                return str(cause).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None
