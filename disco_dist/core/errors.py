"""One clear line for the user instead of a deep traceback.

Library code raises `UserError` for anything the user can fix (a flag, a path, a file, the data);
launchers wrap their `main` in `exit_on_user_error`, which prints the message and exits 2. Every rank
raises the same `UserError` for a shared input, so only rank 0 prints it; `RankError` is a fault that one
rank alone met (its disk, its file) and is printed by that rank. A full disk or quota anywhere becomes one
line too.
"""

import errno
import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input: its message names the thing and the fix."""


class RankError(UserError):
    """A problem met by this rank alone: printed by it, with its rank."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RankError as err:
            print(f"error: rank {_rank()}: {err}", file=sys.stderr, flush=True)
        except UserError as err:
            if _rank() == "0":  # one line, not one per rank
                print(f"error: {err}", file=sys.stderr, flush=True)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            print(
                f"error: rank {_rank()}: {err.strerror} while writing {err.filename or 'a file'}; nothing already "
                "written was replaced: free space there and rerun (training: --resume auto)",
                file=sys.stderr,
                flush=True,
            )
        exit_now(2)

    return wrapper


def exit_now(code: int) -> None:
    """Exit with `code`. A rank of a live process group skips the interpreter's teardown, where the
    communication stack's threads can abort the process ("terminate called ...") and turn exit 2 into a crash."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
