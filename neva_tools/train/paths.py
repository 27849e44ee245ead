"""Where a run lives and what it resumes from: NeMo's ``exp_manager`` keys.

The run directory is ``exp_manager.explicit_log_dir`` when set, else ``exp_manager.exp_dir/name``. The checkpoint a
run resumes from is ``exp_manager.resume_from_checkpoint`` when set (it must be a complete, usable checkpoint), else,
with ``resume_if_exists``, the newest complete one under ``RUN_DIR/checkpoints`` that passes
``neva_tools.train.checkpoint.problems`` (a newer one that does not is skipped with a warning naming its bad files;
none usable is an error); ``resume_ignore_no_checkpoint: false`` makes a missing one an error, as in NeMo.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)


def run_directory(cfg: DictConfig) -> Path:
    """The run directory of ``cfg``."""
    explicit = cfg.exp_manager.explicit_log_dir
    if explicit:
        return Path(str(explicit)).expanduser()
    return Path(str(cfg.exp_manager.exp_dir or "runs")).expanduser() / str(cfg.name)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint directory this run resumes from, or None for a fresh start."""
    from neva_tools.train import checkpoint as ckpt
    from neva_tools.utils.log import global_rank

    em = cfg.exp_manager
    if em.resume_from_checkpoint:
        path = Path(str(em.resume_from_checkpoint)).expanduser()
        complete = list(ckpt.checkpoints(path.parent))
        if path.resolve() not in [p.resolve() for p in complete]:
            raise NevaError(f"exp_manager.resume_from_checkpoint ({path}) is not a complete checkpoint directory "
                            f"(RUN_DIR/checkpoints/step=N with metadata.json); complete ones in {path.parent}: "
                            f"{', '.join(p.name for p in complete) or 'none'}")  # fmt: skip
        bad = ckpt.problems(path)
        if bad:
            others = [p for p in reversed(complete) if p.resolve() != path.resolve()]
            usable = next((p for p in others if not ckpt.problems(p)), None)
            advice = f", or resume from {usable}: the newest usable one there" if usable else " (no other is usable)"
            raise NevaError(f"exp_manager.resume_from_checkpoint ({path}) cannot be resumed from: {'; '.join(bad)}. "
                            f"Restore the checkpoint from a copy{advice}")  # fmt: skip
        return path
    if not em.resume_if_exists:
        return None
    root = run_dir / "checkpoints"
    found, skipped = ckpt.latest_usable(root)
    details = "; ".join(f"{p.name}: {' / '.join(bad)}" for p, bad in skipped.items())
    if skipped and found is None:
        raise NevaError(f"no checkpoint in {root} can be resumed from ({details}). Restore them from a copy, move them "
                        "away to start this run fresh, or set exp_manager.resume_if_exists=false")  # fmt: skip
    if skipped and global_rank() == 0:
        logger.warning("skipping checkpoint(s) that cannot be resumed from (%s); resuming from %s instead (a skipped "
                       "checkpoint is replaced when the run reaches its step again)", details, found)  # fmt: skip
    if found is None and not em.resume_ignore_no_checkpoint:
        raise NevaError(f"exp_manager.resume_if_exists is true and resume_ignore_no_checkpoint false, but "
                        f"{run_dir / 'checkpoints'} holds no complete checkpoint; set "
                        "exp_manager.resume_ignore_no_checkpoint=true to start fresh")  # fmt: skip
    return found
