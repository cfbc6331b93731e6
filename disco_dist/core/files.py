"""Files: where the repository is, JSON written atomically, and file digests.

Everything that writes a JSON record (indexes, run configs, summaries, results) goes through
`write_json_atomic`: a reader never sees half a file, and a crash leaves the old one whole.
"""

import hashlib
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO_ROOT / "ds_configs"
RECIPES = REPO_ROOT / "recipes"


def write_json_atomic(path, content) -> None:
    """Write `content` as indented JSON to `path` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
