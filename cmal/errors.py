"""The one error contract of every command: what a user can fix is a UserError, printed as one
line on stderr with exit status 2; anything else is a bug and keeps its traceback."""
import os
import sys

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class UserError(Exception):
    """A failure the user can fix: bad data, settings, files or devices. Its message says what is
    wrong in terms of what was given, and what to do."""


def one_line(exc):
    """The message of `exc` on one line. Errors raised in DataLoader workers arrive with the
    worker's traceback in their text; its last line is "module.ErrorName: message"."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(exc).__name__


def run_command(body, *args, on_interrupt=None):
    """Run a command's `body(*args)` and return its exit status: a UserError becomes one line on
    stderr and USER_ERROR_STATUS; Ctrl-C becomes `on_interrupt()`'s line (if any) and
    INTERRUPTED_STATUS; output piped into a program that stopped reading ends quietly."""
    try:
        return body(*args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        if on_interrupt is not None:
            print(f"\n{on_interrupt()}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:  # `| head`: stop quietly, and keep Python's exit from complaining
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
