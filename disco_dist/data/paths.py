"""Where the data lives, and a data file that must be there.

Where the data lives: `--data-root` flag, else `$DISCO_DATA_ROOT`, else `../shared/data` beside the
repository (or beside the current directory) when it exists.
"""

import os
from pathlib import Path

from ..core.errors import UserError
from ..core.files import REPO_ROOT

ENV_VAR = "DISCO_DATA_ROOT"
HOW_TO_SET = f"pass --data-root DIR or set {ENV_VAR}=DIR (the folder holding sts/, sick/, nli/, wiki/)"


def resolve_data_root(flag: str | os.PathLike | None = None) -> Path:
    if flag:
        root = Path(flag)
        if not root.is_dir():
            raise UserError(f"data root {root} (from --data-root) is not a folder; {HOW_TO_SET}")
        return root
    if os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
        if not root.is_dir():
            raise UserError(f"data root {root} (from ${ENV_VAR}) is not a folder; {HOW_TO_SET}")
        return root
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise UserError(f"no data root found (no --data-root, no ${ENV_VAR}, no ../shared/data); {HOW_TO_SET}")


def require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise UserError(f"missing data file {path}; {HOW_TO_SET}")
    return Path(path)
