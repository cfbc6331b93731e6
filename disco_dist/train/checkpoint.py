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

from ..cluster import distributed
from ..cluster.resilience import lost_peer_error
from ..core.errors import RankError, UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
ENGINE_TAG = "engine"


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir) -> list:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "COMPLETE").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resume_hint(run_dir) -> str:
    """What a training run that stops on a lost peer keeps, and how to go on (the end of its one line)."""
    return f"the last complete checkpoint is {latest_checkpoint(run_dir) or 'none yet'}; rerun with --resume auto"


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
    problem = None
    if distributed.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run that died while writing
        problem = _space_problem(engine, run_dir, final)
        if problem is None:
            partial.mkdir()
    problem = distributed.broadcast_object(problem)  # every rank stops, before anyone writes a byte
    if problem:
        raise UserError(problem)
    try:
        engine.save_checkpoint(str(partial / "engine"), tag=ENGINE_TAG, save_latest=False)
        torch.save(rng_state(), partial / f"rng-rank{distributed.rank()}.pt")
        if distributed.rank() == 0:
            torch.save(extra, partial / "extra.pt")
            (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        lost = lost_peer_error(err, lambda: resume_hint(run_dir)) if isinstance(err, RuntimeError) else None
        if lost is not None:  # a collective of the engine's save failed: a peer is gone, not the disk
            raise lost from None
        # this rank stops here; the launcher (deepspeed, or srun --kill-on-bad-exit) ends the others
        raise RankError(
            f"could not write checkpoint {final.name} ({err}); the unfinished folder {partial.name} is "
            f"never resumed from, {latest_checkpoint(run_dir) or 'no earlier checkpoint'} is intact; "
            "free space and rerun with --resume auto"
        ) from None
    distributed.barrier()  # every rank's files are on disk
    if distributed.rank() == 0:
        marker = {
            "step": step,
            "world_size": distributed.world_size(),
            "optimizer_groups": len(engine.optimizer.param_groups),
            "trained_elements": trained_elements(engine),
        }
        (partial / "COMPLETE").write_text(json.dumps(marker) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _space_problem(engine, run_dir, final: Path) -> str | None:
    """Refuse a checkpoint that cannot fit: its size is the newest complete one's, or for the first about
    3 copies of the parameters (weights and Adam's two moments) plus 10%."""
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        needed = folder_bytes(newest)
    else:
        needed = 3 * sum(p.numel() * p.element_size() for p in engine.module.parameters())
    needed = int(needed * 1.1)
    free = shutil.disk_usage(checkpoint_root(run_dir)).free
    if needed <= free:
        return None
    kept = f"the last complete checkpoint {newest} is intact" if newest else "no checkpoint was written yet"
    return (
        f"not enough space for checkpoint {final.name} in {checkpoint_root(run_dir)}: it needs about "
        f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {kept}. Free space (or lower "
        "--keep-checkpoints) and rerun with --resume auto"
    )


def resolve_resume(resume: str | None, run_dir) -> Path | None:
    """--resume: None/"" (start fresh), "auto" (newest complete one, if any), or a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise UserError(
            f"--resume {resume}: not a complete checkpoint folder (no COMPLETE marker); "
            f"use --resume auto to take the newest complete one in {checkpoint_root(run_dir)}"
        )
    return path


def trained_elements(engine) -> int:
    """Parameter elements the run trains (what its optimizer state covers), the same on every rank."""
    return sum(p.numel() for p in engine.module.parameters() if p.requires_grad)


def load_checkpoint(engine, path: Path) -> tuple:
    """Restore the engine and this rank's RNG; return (trainer_state, extra)."""
    marker = json.loads((path / "COMPLETE").read_text())
    if marker["world_size"] != distributed.world_size():
        raise UserError(
            f"{path} was written by {marker['world_size']} ranks, this run has {distributed.world_size()}: "
            "the data order and optimizer partitions depend on it; resume with the same number of ranks"
        )
    groups, elements = len(engine.optimizer.param_groups), trained_elements(engine)
    # e.g. --logit-scale-lr or --freeze-word-embeddings changed since: the optimizer state would not fit
    if (marker.get("optimizer_groups", groups), marker.get("trained_elements", elements)) != (groups, elements):
        raise UserError(
            f"{path} was written training {marker.get('trained_elements', '?')} parameter elements in "
            f"{marker['optimizer_groups']} optimizer groups, this run trains {elements} in {groups}: resume with the "
            "run's own --logit-scale-lr and --freeze-word-embeddings settings (see its config.json)"
        )
    engine.load_checkpoint(
        str(path / "engine"), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    set_rng_state(torch.load(path / f"rng-rank{distributed.rank()}.pt", weights_only=True))
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    extra = torch.load(path / "extra.pt", weights_only=True)
    return trainer_state, extra
