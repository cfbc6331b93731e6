"""One clear line for the user instead of a deep traceback.

Library code raises `UserError` for anything the user can fix (a flag, a path, a file, the data);
launchers wrap their `main` in `exit_on_user_error`, which prints the message and exits 2.
"""
import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input: its message names the thing and the fix."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one line, not one per rank
                print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
