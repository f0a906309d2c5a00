"""The command-line shell that every command of the project shares (``converters.hf2engine``,
``engine.embed``, ``engine.serve``, ``engine.train``).

One owner for what a user sees of a command, whatever the command does:
- arguments are parsed before anything heavy is imported, so ``--help`` and usage errors answer at
  once (this module imports the standard library only);
- an error is one line, ``PROG: error: ...``, on stderr, with exit status 2, for a usage error and
  for bad input alike (a missing file, a corrupt checkpoint, a refused option);
- SIGINT, SIGTERM, SIGHUP and SIGQUIT become :class:`Interrupted` (a ``KeyboardInterrupt``) inside
  :func:`signals_interrupt`, so the command's clean-up runs for each as for Ctrl-C; the command then
  prints ``PROG: interrupted by SIGNAL; ...`` with its own advice (what was kept, how to resume) and
  exits with the shell's ``128 + signal`` (130 for Ctrl-C, 143 for SIGTERM);
- :func:`deferred_interrupts` holds a signal off during a section that must not stop halfway.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Sequence

USAGE_ERROR = 2  # argparse's status for a usage error; ours for bad input too
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


def error_line(exc: BaseException) -> str:
    """``exc`` as the one line a command prints: white space folded, never empty; an OSError names
    its file."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def fail(name: str, message: str | BaseException) -> int:
    """Print ``NAME: error: MESSAGE`` (one line) on stderr; returns the exit status for it."""
    text = error_line(message) if isinstance(message, BaseException) else " ".join(message.split())
    print(f"{name}: error: {text}", file=sys.stderr)
    return USAGE_ERROR


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line under the command's short ``name``, the
    ``--help`` hint in place of the usage block; subcommand parsers inherit the name."""

    def __init__(self, *args: Any, name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.name}: error: {message} (see --help)\n")

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", lambda **kw: Parser(name=self.name, **kw))
        return super().add_subparsers(**kwargs)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status once argparse has printed help (0) or an error (2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USAGE_ERROR)


def run(name: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        body: Callable[[argparse.Namespace], int | None], *,
        on_interrupt: Callable[[argparse.Namespace], str] = lambda args: "stopped",
        user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """A command's whole life: parse ``argv`` with ``parser``, then ``body(args)`` with signals turned
    into :class:`Interrupted`. ``body`` imports what it needs itself (after parsing). Its user errors
    (every error class of this project is a ValueError) become one line and exit 2; an interrupt prints
    ``on_interrupt(args)``, the advice after ``interrupted by SIGNAL;``, and exits ``128 + signal``.
    Returns the exit status."""
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        with signals_interrupt():
            status = body(args)
    except user_errors as exc:
        return fail(name, exc)
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted by {signal_name(exc)}; {on_interrupt(args)}", file=sys.stderr)
        return exit_code(exc)
    return 0 if status is None else status


# ---------------------------------------------------------------------------------------------------
# Signals


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: KeyboardInterrupt) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def signal_name(exc: KeyboardInterrupt) -> str:
    return exc.signame if isinstance(exc, Interrupted) else "SIGINT"


_deferred = threading.local()


def _handler(signum: int, frame: Any) -> None:
    if getattr(_deferred, "depth", 0):
        _deferred.pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Inside: SIGINT, SIGTERM, SIGHUP and SIGQUIT raise :class:`Interrupted` in the main thread
    (a command line's clean-up then runs as for Ctrl-C). Previous handlers are restored on exit.
    Outside the main thread (a library caller's worker) nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for s in _SIGNALS:
            previous[s] = signal.signal(s, _handler)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """A section that must not stop halfway. A signal arriving inside (under
    :func:`signals_interrupt`) is held and raised when the section ends; the yielded function says
    whether one arrived, so the section can undo its work before that happens."""
    _deferred.depth = getattr(_deferred, "depth", 0) + 1
    try:
        yield lambda: getattr(_deferred, "pending", None) is not None
    finally:
        _deferred.depth -= 1
        pending = getattr(_deferred, "pending", None)
        if _deferred.depth == 0 and pending is not None:
            _deferred.pending = None
            raise Interrupted(pending)
