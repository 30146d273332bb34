"""The command-line boundary every binary shares: flag errors, one-line errors, paths, logging.

A binary is ``flags, then one call``::

    def main(argv):
        cli.main(argv, lambda: trainer.train_command(_CONFIG.value, _WORKDIR.value))

    if __name__ == "__main__":
        cli.run(main)

`run` parses flags through `flag_errors`, so a mistyped flag, enum value or ``--config.<field>``
is ``error: ...`` naming it with exit code 2, never absl's usage dump; `run_cli` does the same for
bad input found later (`errors.USER_ERRORS`). ``MODALIMMUNE_DEBUG=1`` shows tracebacks instead.
"""

import contextlib
import os
import re
import sys

from absl import app, flags, logging

from modalimmune_jax.training import distributed
from modalimmune_jax.training.config import absolute_path
from modalimmune_jax.training.errors import USER_ERRORS

__all__ = ["absolute_path", "check_no_arguments", "define_distributed_flags", "flag_errors",
           "initialize_distributed", "main", "one_line", "parse_flags", "quiet_libraries", "run",
           "run_cli"]


def one_line(message) -> str:
    """`message` (an exception or text) joined onto one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_with_error(message) -> None:
    """Prints ``error: <message>`` on one line to stderr and exits with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _debug() -> bool:
    return bool(os.environ.get("MODALIMMUNE_DEBUG"))


def run_cli(fn):
    """Runs `fn`, turning bad input (`errors.USER_ERRORS`) into a one-line error and exit code 2."""
    try:
        return fn()
    except USER_ERRORS as e:
        if _debug():
            raise
        exit_with_error(e)


@contextlib.contextmanager
def flag_errors(argv):
    """Turns a bad command-line flag into ``error: ...`` naming the flag, and exit code 2.

    absl prints a bad flag as a usage block; ml_collections turns a config file's ValueError into
    a traceback inside the message, and raises a bare AttributeError for an unknown
    ``--config.<field>`` (while parsing ``--config``, or at definition time for a config-dict
    flag such as unlearn's ``--hparams``).
    """
    try:
        yield
    except flags.Error as e:
        if _debug():
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        exit_with_error(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
    except (AttributeError, KeyError) as e:
        if _debug():
            raise
        inner = e.args[0] if e.args else e
        while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(msg))
            inner = inner.args[0]
        text = one_line(inner)
        field = (re.findall(r"'([^']+)'", text) or [""])[0]
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and "." in a]
        named = [a for a in overrides if a.split(".")[-1] == field] or overrides or ["a flag"]
        hint = text[text.index("Did you mean"):] if "Did you mean" in text else ""
        exit_with_error(f"{named[0]}: no such config field {field!r}. {hint}".strip())


def parse_flags(argv):
    """absl's flag parsing with :func:`flag_errors`: ``app.run(main, flags_parser=parse_flags)``."""
    with flag_errors(argv):
        return flags.FLAGS(argv)


def check_no_arguments(argv) -> None:
    """Refuses positional arguments with one line (a space inside a flag value splits it)."""
    if len(argv) > 1:
        extra = " ".join(repr(a) for a in argv[1:])
        exit_with_error(f"unexpected argument(s) {extra}: every option is a --flag=value; a "
                        "value with spaces must be quoted (e.g. --config='...:digits,tiny')")


def quiet_libraries() -> None:
    """orbax logs every checkpoint file at INFO; keep stderr readable unless --verbosity is set."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run(main_fn) -> None:
    """``app.run(main_fn)`` with one-line flag errors (the entry point of every binary)."""
    app.run(main_fn, flags_parser=parse_flags)


def main(argv, command) -> None:
    """The body of every binary's ``main``: checks, start-up, `command`, its closing summary.

    A binary that called `define_distributed_flags` joins its multi-host run first.

    Args:
      argv: absl's leftover arguments (only the program name is allowed).
      command: ``() -> str``, the binary's one call; it returns the closing summary, printed to
        stdout by process 0.
    """
    check_no_arguments(argv)
    quiet_libraries()
    if "coordinator_address" in flags.FLAGS:
        initialize_distributed()  # before anything touches a JAX backend
    text = run_cli(command)
    if text:
        import jax  # noqa: PLC0415 -- the backend starts only after distributed start-up

        if jax.process_index() == 0:
            print(text, flush=True)


_DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def define_distributed_flags() -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` (multi-host runs)."""
    (
        flags.DEFINE_string(
            "coordinator_address", None,
            "host:port of process 0's coordinator service for multi-host runs; 'auto' uses JAX's "
            f"cluster detection. Default: ${distributed.ENV_COORDINATOR}, else a single-process "
            "run."),
        flags.DEFINE_integer(
            "num_processes", None,
            f"Number of processes in a multi-host run (${distributed.ENV_NUM_PROCESSES})."),
        flags.DEFINE_integer(
            "process_id", None,
            f"This process's id in [0, num_processes) (${distributed.ENV_PROCESS_ID})."),
    )


def initialize_distributed() -> None:
    """`distributed.initialize` from the flags of `define_distributed_flags` (else environment).

    Call before anything touches a JAX backend.
    """
    run_cli(lambda: distributed.initialize(*(flags.FLAGS[n].value for n in _DISTRIBUTED_FLAGS)))
