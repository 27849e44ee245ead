"""The logging policy of every command, and progress bars that show on rank 0 only and can be turned off.

:func:`setup_logging` (run by the ``neva`` entry point once its flags are parsed) sets one policy for every command:

=========  =========================  =====================================  ===========================
flags      ours (``neva_tools.*``)    libraries (megatron, open_clip, ...)   other ranks (global ≠ 0)
=========  =========================  =====================================  ===========================
(none)     INFO                       WARNING                                WARNING
``-q``     ERROR                      ERROR                                  ERROR
``-v``     DEBUG                      INFO (``-vv``: DEBUG)                  as rank 0
=========  =========================  =====================================  ===========================

``-q`` leaves errors and the command's result (printed on stdout) and turns progress bars off. Every line reads
``LEVEL: message``; a library's line names where it comes from and another rank's line its rank
(``WARNING [rank 1, megatron.core.foo]: ...``). Python warnings go through the same handler, each shown once with
the module that raised it. Library messages that carry no action for the user (:data:`QUIET_WARNINGS`: Transformer
Engine / Apex fallbacks, deprecations inside the libraries; :data:`QUIET_LOG_LINES`: torch's "No CUDA runtime is
found", ...) are dropped by :func:`install_noise_filters`, which the entry point runs before torch and megatron are
imported (some of them warn while being imported).

A user error in a job of several processes is printed by one process (:func:`first_to_report`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neva_tools.utils import progress_log

_PROGRESS_ENABLED = True
OURS = ("neva_tools", "__main__")  #: this project's loggers (and those of its scripts, run as ``__main__``)
REPORT_DIR_VAR = "NEVA_REPORT_DIR"  #: where the ranks of a job claim the printing of an error (set by the launcher)


@dataclass(frozen=True)
class Noise:
    """A library message that carries no action for the user, dropped at start."""

    message: str  #: regular expression matched at the start of the message (case-insensitive)
    module: str  #: a warning: regex matched at the start of the module that raised it; a log line: its logger
    why: str  #: why nobody needs to see it
    category: type[Warning] = Warning
    cpu_only: bool = False  #: dropped only when no CUDA device is available (the advice is for GPUs)


#: Python warnings dropped at start.
QUIET_WARNINGS = (
    Noise("Transformer Engine and Apex are not installed", "megatron", "megatron falls back to torch code",
          UserWarning),
    Noise("Apex is not installed", "megatron", "megatron falls back to torch's norms", UserWarning),
    Noise("full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
          "megatron's own default cuda_graph_scope", UserWarning),
    Noise(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"(pytorch_lightning|lightning\.pytorch)\.utilities",
          "Lightning's use of a torch API", FutureWarning),
    Noise("When using (async grad allreduce|sequence parallelism) it is recommended to set the environment variable "
          "CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core\.tensor_parallel", "a CUDA setting", UserWarning,
          cpu_only=True),
)  # fmt: skip
#: Library log lines dropped at start (``module`` is the logger that writes them).
QUIET_LOG_LINES = (
    Noise("No CUDA runtime is found", "torch.utils.cpp_extension", "torch found no CUDA toolkit: a CPU run"),
    Noise("LLaVA is work in progress", "megatron.core.models.multimodal.llava_model", "megatron's notice on LLaVA"),
)


def global_rank() -> int:
    """The process's global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def world_size() -> int:
    """The job's number of processes from the launcher's environment (1 when not distributed)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def is_ours(logger_name: str) -> bool:
    """Whether a logger belongs to this project (:data:`OURS`)."""
    return any(logger_name == name or logger_name.startswith(name + ".") for name in OURS)


def module_name(path: str) -> str:
    """The dotted module of a source file: ``.../site-packages/megatron/core/x.py`` → ``megatron.core.x`` (the
    loaded module of that file, or else the path below the longest ``sys.path`` entry holding it)."""
    if path.startswith("<"):  # <string>, <frozen runpy>, ...
        return path
    resolved = os.path.abspath(path)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == path and name != "__main__":
            return name
    roots = [os.path.abspath(entry or os.getcwd()) for entry in sys.path]
    root = max((r for r in roots if resolved.startswith(r.rstrip(os.sep) + os.sep)), key=len, default="")
    parts = list(Path(os.path.relpath(resolved, root) if root else os.path.basename(resolved)).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path


# -- noise: library messages without an action for the user ------------------------------------------------------


@dataclass(frozen=True)
class _DropMessage:
    """A logger filter dropping the records whose message starts with ``pattern`` (equal filters are added once)."""

    pattern: str

    def filter(self, record: logging.LogRecord) -> bool:
        return re.match(self.pattern, record.getMessage(), re.IGNORECASE) is None


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:  # a broken CUDA set-up: keep the advice
        return True


def is_quiet_warning(text: str, category: type[Warning], module: str) -> bool:
    """Whether a warning is one of :data:`QUIET_WARNINGS` (``module``: the module that raised it)."""
    return any(issubclass(category, n.category) and re.match(n.module, module) is not None
               and re.match(n.message, text, re.IGNORECASE) is not None and not (n.cpu_only and _cuda_available())
               for n in QUIET_WARNINGS)  # fmt: skip


def install_noise_filters() -> None:
    """Drop :data:`QUIET_WARNINGS` and :data:`QUIET_LOG_LINES`; run it before torch and megatron are imported.

    Each filter is precise (message and module, or message and logger); calling this again changes nothing.
    The warnings that are noise only on CPU are dropped where they are shown (``setup_logging``'s warning hook).
    """
    for noise in QUIET_WARNINGS:
        if not noise.cpu_only:
            warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.module)
    for noise in QUIET_LOG_LINES:
        logging.getLogger(noise.module).addFilter(_DropMessage(noise.message))


# -- the policy --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogPolicy:
    """The lowest level shown for our loggers and for the libraries' (a logging filter)."""

    ours: int
    library: int

    @classmethod
    def for_flags(cls, verbosity: int, rank: int = 0) -> LogPolicy:
        """``verbosity``: ``-v`` count minus ``-q`` count; ``rank``: the process's global rank."""
        if verbosity < 0:
            return cls(logging.ERROR, logging.ERROR)
        if verbosity > 0:
            return cls(logging.DEBUG, logging.INFO if verbosity == 1 else logging.DEBUG)
        return cls(logging.INFO if rank == 0 else logging.WARNING, logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (self.ours if is_ours(record.name) else self.library)


class LineFormatter(logging.Formatter):
    """``LEVEL: message``; ``LEVEL [rank R, origin]: message`` for another rank's line or a library's (its logger,
    or the module that raised a warning), and for our DEBUG lines (their logger)."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__("%(message)s")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"rank {self.rank}"] if self.rank else []
        origin = getattr(record, "origin", None)
        if origin is None and (not is_ours(record.name) or record.levelno < logging.INFO):
            origin = record.name if record.name != "root" else module_name(record.pathname)
        if origin:
            tags.append(origin)
        return f"{record.levelname}{' [' + ', '.join(tags) + ']' if tags else ''}: {text}"


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (also when it is replaced after set-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler's constructor and setStream assign it
        pass


_shown_warnings: set[tuple[str, str]] = set()
_standard_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:  # fmt: skip
    """``warnings.showwarning`` under :func:`setup_logging`: once per message, through logging, with its module."""
    if file is not None:  # an explicit destination: as Python does
        _standard_showwarning(message, category, filename, lineno, file, line)
        return
    text, module = str(message), module_name(filename)
    key = (category.__name__, text)
    if key in _shown_warnings or is_quiet_warning(text, category, module):
        return
    _shown_warnings.add(key)
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, text, extra={"origin": f"{module}:{lineno}"})


#: Loggers of Lightning's ``rank_zero_info``/``rank_zero_warn`` (its tips and banners): the policy is set on them
#: too, as Lightning sets its own loggers to INFO when it is imported.
_LIGHTNING_RANK_ZERO = tuple(f"{p}.utilities.rank_zero" for p in ("pytorch_lightning", "lightning.pytorch",
                                                                  "lightning_fabric", "lightning.fabric"))  # fmt: skip
#: Libraries that give their logger a handler of their own when nothing is configured yet (Lightning): adopted.
_OWN_HANDLERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
_HF_VERBOSITY, _HF_SET_BY_US = "TRANSFORMERS_VERBOSITY", "NEVA_SET_TRANSFORMERS_VERBOSITY"  # the latter: ours


def _set_policy_filter(filterer: logging.Filterer, policy: LogPolicy) -> None:
    for old in [f for f in filterer.filters if isinstance(f, LogPolicy)]:
        filterer.removeFilter(old)
    filterer.addFilter(policy)


def _library_loggers(policy: LogPolicy, formatter: logging.Formatter) -> None:
    """Bring the libraries that configure logging themselves under ``policy`` (and our line format)."""
    for name in _OWN_HANDLERS:
        lib = logging.getLogger(name)
        own = [h for h in lib.handlers if type(h) is logging.StreamHandler]
        if own and not lib.propagate:
            for handler in own:
                lib.removeHandler(handler)
            lib.propagate = True
        if lib.level == logging.INFO:  # the level Lightning sets: the root's level decides instead
            lib.setLevel(logging.NOTSET)
    for name in _LIGHTNING_RANK_ZERO:
        _set_policy_filter(logging.getLogger(name), policy)
    if "TORCH_LOGS" not in os.environ:  # torch's loggers have handlers of their own: our format and policy on them
        for name in ("torch", "torch.distributed"):
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)
                _set_policy_filter(handler, policy)
    level = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(policy.library, "error")
    if os.environ.get(_HF_VERBOSITY) in (None, os.environ.get(_HF_SET_BY_US)):  # not the user's choice
        os.environ[_HF_VERBOSITY] = os.environ[_HF_SET_BY_US] = level  # read when transformers sets up logging
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:
            hf_logging.set_verbosity(policy.library)


def setup_logging(verbosity: int = 0, progress: bool = True) -> None:
    """Set the logging policy of the module docstring (``verbosity``: ``-v`` count minus ``-q`` count).

    Progress bars are shown when ``progress`` is true, ``-q`` is not given and ``NEVA_NO_PROGRESS`` is not set.
    """
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = progress and verbosity >= 0 and os.environ.get("NEVA_NO_PROGRESS", "") in ("", "0")
    install_noise_filters()
    rank = global_rank()
    policy = LogPolicy.for_flags(verbosity, rank)
    formatter = LineFormatter(rank)
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.addFilter(policy)  # for the libraries that set their loggers' levels themselves
    logging.basicConfig(level=policy.library, handlers=[handler], force=True)
    for name in OURS:  # below the root's level when ours show more (the levels also hold where the filter is lost)
        logging.getLogger(name).setLevel(policy.ours if policy.ours < policy.library else logging.NOTSET)
    _library_loggers(policy, formatter)
    warnings.showwarning = _show_warning


def first_to_report(what: str = "error", *, wait_s: float = 1.0) -> bool:
    """Whether this process prints the ``what`` (a user error) that stops its job.

    True in a single process. In a job of several processes only the first process of its node to claim it does:
    rank 0 at once, the other ranks after ``wait_s`` seconds (an error every rank sees is told by rank 0; one that
    only another rank sees is told by that rank). The claim is a file created exclusively in ``$NEVA_REPORT_DIR``
    (a directory the launcher makes for the job and removes after it) or else the temporary directory, named after
    the parent process (the launcher of this node's ranks) and its start time.
    """
    if world_size() <= 1:
        return True
    if global_rank() != 0 and wait_s > 0:
        time.sleep(wait_s)
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    directory = os.environ.get(REPORT_DIR_VAR) or tempfile.gettempdir()
    try:
        fd = os.open(Path(directory) / f"neva-{what}-{parent}-{started}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:  # no place to agree on: better twice than never
        return True
    with os.fdopen(fd, "w") as claim:
        claim.write(f"{global_rank()}\n")
    return True


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """Progress on rank 0 when it is enabled, a silent pass-through elsewhere: a tqdm bar on a terminal (or on the
    ``file`` given), plain log lines when stderr is not one (:mod:`neva_tools.utils.progress_log`)."""
    off = kwargs.pop("disable", False)  # popped first: never passed to tqdm twice
    disable = not _PROGRESS_ENABLED or global_rank() != 0 or off
    if not disable and "file" not in kwargs and not progress_log.is_terminal(sys.stderr):
        return tqdm(iterable, **progress_log.line_kwargs(iterable, kwargs))
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
