"""Bad user input: one exception type, and how the command-line entry points report it.

:class:`ConfigError` carries ``(option, value, reason, hint)``; ``option`` is the option path as the user writes
it in a config or on the command line (``model.lm.lora.r``, ``heads.analysis.top_fraction``). The dataclass
configs raise it (or a plain ``ValueError`` whose message starts with ``<option>=<value>``) with the path they
know -- a :class:`~posheads.models.ModelConfig` says ``model.lora.r`` whether it sits at ``model`` (evaluation)
or ``model.lm`` (training); :func:`located` rewrites the path to where the section really is.

:func:`run_cli` wraps an entry point: a :class:`ConfigError` (or an ``argparse`` / jsonargparse parse error)
becomes ``error: <option>=<value>: <reason>`` (plus ``hint: ...``) on stderr and exit status 2, without a
traceback; ``--traceback`` on the command line or ``POSHEADS_TRACEBACK=1`` shows the traceback instead.

No Lightning, no W&B here.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = [
    "EXIT_USAGE",
    "TRACEBACK_ENV",
    "TRACEBACK_FLAG",
    "ConfigError",
    "as_config_error",
    "from_argparse",
    "located",
    "run_cli",
    "user_input",
]

#: Exit status of a command that refused its input (as argparse uses).
EXIT_USAGE = 2
#: Environment variable that makes the entry points show tracebacks of input errors.
TRACEBACK_ENV = "POSHEADS_TRACEBACK"
#: Command-line flag with the same effect (removed from the arguments before parsing).
TRACEBACK_FLAG = "--traceback"

_UNSET: Any = object()
_VERB = re.compile(r" (?=(?:must|is|are|has|have|exceeds|needs|does|cannot|should|not)\b)")
# an option path at the start of a message: ``a.b_c``, ``a.b[0].c``, ``trainer.callbacks[0].init_args.x``
_OPTION = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\])*(?:\.[A-Za-z_][\w]*(?:\[\d+\])*)*)(?==|\s|:|$)")


class ConfigError(ValueError):
    """Bad input, named by its option path (as the user writes it) and value.

    Args:
        option: the option path, e.g. ``model.lm.lora.r``.
        value: the offending value (omit when there is none to show, e.g. a missing option).
        reason: what is wrong, e.g. ``must be >= 1``.
        hint: what to do about it (optional).

    ``str(err)`` is ``<option>=<value!r>: <reason>`` (``<option>: <reason>`` without a value) and, with a hint,
    ``; hint: <hint>``. A subclass of ``ValueError``, so callers that catch ``ValueError`` keep working.
    """

    def __init__(self, option: str, value: Any = _UNSET, reason: str = "", hint: str | None = None):
        self.option = str(option)
        self.value = value
        self.reason = str(reason)
        self.hint = hint
        self._raw: str | None = None  # a converted message (see as_config_error), printed as it is
        super().__init__(self.message)

    @property
    def has_value(self) -> bool:
        return self.value is not _UNSET

    @property
    def message(self) -> str:
        """The one line (without the hint)."""
        if self._raw is not None:
            return self._raw
        head = f"{self.option}={self.value!r}" if self.has_value else self.option
        return f"{head}: {self.reason}" if self.reason else head

    def __str__(self) -> str:
        return self.message + (f"; hint: {self.hint}" if self.hint else "")

    def lines(self) -> list[str]:
        """What the command line prints: ``error: ...`` and, with a hint, ``hint: ...``."""
        out = [f"error: {self.message}"]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out

    def relocated(self, old: str, new: str) -> ConfigError:
        """The same error with the option path prefix ``old`` replaced by ``new`` (a no-op when the path does
        not start with ``old``)."""
        if not _starts(self.option, old) or old == new:
            return self
        option = new + self.option[len(old) :]
        err = ConfigError(option, self.value, self.reason, self.hint)
        # every mention of the section in the text moves with it ("rope.a=1 must be >= rope.b=2")
        mention = re.compile(r"(?<![\w.])" + re.escape(old) + r"(?=[.\[=])")
        if self._raw is not None:
            err._raw = mention.sub(new, self._raw)
        else:
            err.reason = mention.sub(new, self.reason)
        err.args = (err.message,)
        return err


def _starts(option: str, prefix: str) -> bool:
    return option == prefix or option.startswith(prefix + ".") or option.startswith(prefix + "[")


def as_config_error(err: BaseException, hint: str | None = None) -> ConfigError:
    """``err`` as a :class:`ConfigError`: itself, or a plain exception whose message (``<option>=<value> ...``
    as the project's validation writes them) is kept as the line; the option path is read off its start."""
    if isinstance(err, ConfigError):
        return err
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    match = _OPTION.match(text)
    if match and text[match.end() : match.end() + 1] == "=":
        # "<option>=<value> must ..." -> "<option>=<value>: must ..." (the one format of every message)
        verb = _VERB.search(text, match.end())
        if verb and ": " not in text[match.end() : verb.start()]:
            text = text[: verb.start()] + ":" + text[verb.start() :]
    out = ConfigError(match.group(1) if match else "", hint=hint)
    out._raw = text or type(err).__name__
    out.args = (out.message,)
    return out


@contextlib.contextmanager
def located(
    *moves: tuple[str, str], catch: tuple[type[BaseException], ...] = (ValueError,)
) -> Iterator[None]:
    """Re-raise errors of the block as :class:`ConfigError` with the option paths moved: ``located(("model",
    "model.lm"))`` turns ``model.lora.r=0: ...`` into ``model.lm.lora.r=0: ...``. Exceptions of the types in
    ``catch`` (``ValueError`` by default) are converted (:func:`as_config_error`); others pass through."""
    try:
        yield
    except catch as err:
        out = as_config_error(err)
        for old, new in moves:
            moved = out.relocated(old, new)
            if moved is not out:
                out = moved
                break
        if out is err:
            raise
        raise out from err


@contextlib.contextmanager
def user_input(*moves: tuple[str, str], extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """A validation stage: ``ValueError``, ``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``,
    ``TypeError`` (and the types in ``extra``) raised in the block are the input's fault and become
    :class:`ConfigError` (paths moved as in :func:`located`)."""
    with located(
        *moves,
        catch=(ValueError, FileNotFoundError, NotADirectoryError, PermissionError, TypeError, *extra),
    ):
        yield


# ------------------------------------------------------------------------------------------ parse errors

_PARSER_KEY = re.compile(r'(?:Parser key|Key) "([^"]+)"')
_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$", re.S)


def from_argparse(err: BaseException, known: Iterable[str] = ()) -> ConfigError:
    """A jsonargparse / argparse parse error as one :class:`ConfigError` line (the innermost option path of a
    nested error, its first reason; for an unknown option the closest known ones as a hint)."""
    text = str(err).strip()
    known = sorted(set(known))

    def near(option: str) -> str | None:
        close = difflib.get_close_matches(option, known, n=3, cutoff=0.75)
        return ("did you mean " + " or ".join(f"--{c}" for c in close) + "?") if close else None

    m = _GROUP.search(text)
    if m:
        option = f"{m.group(1)}.{m.group(2)}"
        return ConfigError(option, reason="is not an option", hint=near(option) or "see --help")
    m = _UNRECOGNIZED.search(text)
    if m:
        words = m.group(1).split()
        option = words[0].lstrip("-") if words else ""
        if "=" in option:
            option = option.split("=", 1)[0]
        return ConfigError(option, reason="is not an option", hint=near(option) or "see --help")
    keys = _PARSER_KEY.findall(text)
    if keys:
        path = keys[0]
        for inner in keys[1:]:  # nested: Parser key "rope" ... Parser key "factor"
            path = path + "." + inner if not inner.startswith(path) else inner
        lines = [ln.strip() for ln in text.splitlines()]
        reasons = [
            ln for ln in lines if ln.startswith(("Expected", "File does not exist", "Not a", "Does not"))
        ]
        # our own validation messages appear as "- <option>=<value> ..." inside union errors
        ours = [ln[2:] for ln in lines if ln.startswith("- ") and _OPTION.match(ln[2:]) and "=" in ln]
        if ours:
            out = as_config_error(ValueError(ours[0]))
            return out
        reason = reasons[-1] if reasons else lines[-1] if lines else text
        value: Any = _UNSET
        got = re.search(r"Got value: (.*)$", reason)
        if got:
            value = got.group(1)
            reason = reason[: got.start()].strip().rstrip(".")
        if path == "config":
            return ConfigError("--config", reason=reason[:1].lower() + reason[1:])
        return ConfigError(path, value, reason[:1].lower() + reason[1:])
    return as_config_error(ValueError(text.splitlines()[0] if text else type(err).__name__))


# ------------------------------------------------------------------------------------------ entry points

T = TypeVar("T")


def traceback_wanted(argv: Sequence[str]) -> bool:
    return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip().lower() not in (
        "",
        "0",
        "false",
    )


def run_cli(fn: Callable[[list[str]], T], argv: Sequence[str] | None, prog: str) -> T:
    """Call ``fn(argv)`` for the entry point ``prog`` (``argv`` defaults to ``sys.argv[1:]``, with ``--traceback`` removed) and turn input
    errors into ``error: ...`` lines on stderr and ``SystemExit(2)``; with ``--traceback`` /
    ``POSHEADS_TRACEBACK=1`` the exception propagates with its traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    show = traceback_wanted(args)
    args = [a for a in args if a != TRACEBACK_FLAG]
    try:
        return fn(args)
    except (ConfigError, argparse.ArgumentError) as err:
        if show:
            raise
        out = err if isinstance(err, ConfigError) else from_argparse(err)
        sys.stdout.flush()
        print("\n".join(out.lines()), file=sys.stderr)
        print(f"(pass {TRACEBACK_FLAG} or set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_USAGE) from None
