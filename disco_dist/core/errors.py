"""One clear line for the user instead of a deep traceback.

Library code raises `UserError` for anything the user can fix (a flag, a path, a file, the data);
launchers wrap their `main` in `exit_on_user_error`, which prints the message and exits 2. Every rank
raises the same `UserError` for a shared input, so only rank 0 prints it; `RankError` is a fault that one
rank alone met (its disk, its file) and is printed by that rank. A full disk or quota anywhere becomes one
line too.

Where `DISCO_ERROR_LOG` names a file (the SLURM batch scripts set it to `RUN_DIR/slurm-<job>.errors`), every error
line is also appended there, with the time and the host (`say_error`): the line of a rank whose printed output went
through a node that is gone (srun and the job's log live on the job's first node) is still there to read.
"""

import datetime
import errno
import functools
import os
import socket
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
            say_error(f"error: rank {_rank()}: {err}")
        except UserError as err:
            if _rank() == "0":  # one line, not one per rank
                say_error(f"error: {err}")
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            say_error(
                f"error: rank {_rank()}: {err.strerror} while writing {err.filename or 'a file'}; nothing already "
                "written was replaced: free space there and rerun (training: --resume auto)"
            )
        exit_now(2)

    return wrapper


def say_error(line: str) -> None:
    """Print `line` to stderr and append it, with the time and this host, to the file `DISCO_ERROR_LOG` names (one
    write of one line, so the lines of ranks on several nodes never interleave). A file that cannot be written
    costs nothing but that copy."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("DISCO_ERROR_LOG")
    if not path:
        return
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{stamp} {socket.gethostname()} {line}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def exit_now(code: int) -> None:
    """Exit with `code`. A rank of a live process group skips the interpreter's teardown, where the
    communication stack's threads can abort the process ("terminate called ...") and turn exit 2 into a crash."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
