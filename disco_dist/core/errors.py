"""One clear line for the user instead of a deep traceback.

Library code raises `UserError` for anything the user can fix (a flag, a path, a file, the data);
launchers wrap their `main` in `exit_on_user_error`, which prints the message and exits 2. Every rank
raises the same `UserError` for a shared input, so only rank 0 prints it; `RankError` is a fault that one
rank alone met (its disk, its file) and is printed by that rank. A full disk or quota anywhere becomes one
line too.

Where `DISCO_ERROR_LOG` names a file (the SLURM batch scripts set it to `RUN_DIR/slurm-<job>.errors`), every error
line is also appended there, with the time, the host and the exit code (`say_error`): the line of a rank whose
printed output went through a node that is gone (srun and the job's log live on the job's first node) is still there
to read. A rank that stops because another is gone (`PeerLost`) exits 75 (`EXIT_RETRY`): nothing to fix, the same
command goes on.
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

    exit_code = 2


EXIT_RETRY = 75  # EX_TEMPFAIL: nothing to fix, the same command goes on (the SLURM batch scripts requeue the job)


class PeerLost(RankError):
    """Another rank is gone (died, killed, its node lost): nothing the user must fix; rerunning the same command
    (--resume auto) goes on from what is kept."""

    exit_code = EXIT_RETRY


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RankError as err:
            say_error(f"error: rank {_rank()}: {err}", err.exit_code)
            exit_now(err.exit_code)
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


def say_error(line: str, code: int = 2) -> None:
    """Keep `line` in `DISCO_ERROR_LOG` (`record_stop`) with the exit code that follows, then print it to stderr. The
    file first: a rank whose printed output went through an `srun` on a lost node may find nobody reading its stderr
    (a broken pipe), and the kept line must not depend on it."""
    record_stop(line, code)
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # BrokenPipeError: the reader is gone; the line is kept in the file where one is set
        pass


def record_stop(line: str, code: int) -> None:
    """Append `TIME HOST exit CODE: line` to the file `DISCO_ERROR_LOG` names, if any: one write of one line, so the
    lines of ranks on several nodes never interleave. Exit 75 (`EXIT_RETRY`) says the same command goes on; the
    SLURM batch scripts requeue a failed run whose ranks said nothing else. A file that cannot be written costs
    nothing but that copy."""
    path = os.environ.get("DISCO_ERROR_LOG")
    if not path:
        return
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{stamp} {socket.gethostname()} exit {code}: {line}\n".encode())
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
