"""Atomic, restorable checkpoints: engine (model, optimizer, scheduler), trainer state, queue, RNG.

Layout: <run>/checkpoints/step-00000100/ with engine/ (DeepSpeed's files), trainer_state.json, extra.pt
(the CKD queue and similar tensors), rng-rank<R>.pt, and COMPLETE, the marker written last. Everything is
written into a `.step-00000100.partial` folder first and renamed once every rank has finished, so a
checkpoint folder without the `.partial` name is whole; `latest_checkpoint` looks at those alone.
"""
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from . import distributed
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
ENGINE_TAG = "engine"


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir) -> list:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "COMPLETE").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir, step: int, trainer_state: dict, extra: dict, keep: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the final folder."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    partial = root / f".step-{step:08d}.partial"
    if distributed.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while writing
        partial.mkdir()
    distributed.barrier()
    engine.save_checkpoint(str(partial / "engine"), tag=ENGINE_TAG, save_latest=False)
    torch.save(rng_state(), partial / f"rng-rank{distributed.rank()}.pt")
    if distributed.rank() == 0:
        torch.save(extra, partial / "extra.pt")
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    distributed.barrier()  # every rank's files are on disk
    if distributed.rank() == 0:
        (partial / "COMPLETE").write_text(json.dumps({"step": step, "world_size": distributed.world_size()}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def resolve_resume(resume: str | None, run_dir) -> Path | None:
    """--resume: None/"" (start fresh), "auto" (newest complete one, if any), or a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no COMPLETE marker); "
                        f"use --resume auto to take the newest complete one in {checkpoint_root(run_dir)}")
    return path


def load_checkpoint(engine, path: Path) -> tuple:
    """Restore the engine and this rank's RNG; return (trainer_state, extra)."""
    marker = json.loads((path / "COMPLETE").read_text())
    if marker["world_size"] != distributed.world_size():
        raise UserError(f"{path} was written by {marker['world_size']} ranks, this run has {distributed.world_size()}: "
                        "the data order and optimizer partitions depend on it; resume with the same number of ranks")
    engine.load_checkpoint(str(path / "engine"), tag=ENGINE_TAG, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    set_rng_state(torch.load(path / f"rng-rank{distributed.rank()}.pt", weights_only=True))
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    extra = torch.load(path / "extra.pt", weights_only=True)
    return trainer_state, extra
