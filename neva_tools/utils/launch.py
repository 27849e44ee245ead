"""``python -m neva_tools.utils.launch TORCHRUN_ARGS...``: torchrun (``torch.distributed.run``) with a short ending.

``scripts/train.sh`` runs this instead of ``torch.distributed.run``; it takes the same arguments. What changes:

- when a rank fails, torchrun raises ``ChildFailedError``, whose traceback and failure table (about 35 lines) end
  up below the rank's own message. Here a user error (exit status 2) ends with the rank's ``neva: error: ...``
  line, printed by one rank (:func:`neva_tools.utils.log.first_to_report`, which agrees in the directory this
  launcher gives the job in ``$NEVA_REPORT_DIR``); any other failure ends with one line naming the rank, its exit
  status or signal. The exit status is the failed rank's (128 + N for signal N) instead of torchrun's 1;
- torchrun's own per-rank failure lines ("failed (exitcode: 2) local_rank: 1 ...", "Sending process ... closing
  signal SIGTERM") are kept for ``-v``;
- with several processes per node and no ``OMP_NUM_THREADS``, it is set to 1 as torchrun does, without torchrun's
  banner about it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence

from neva_tools.utils.log import REPORT_DIR_VAR, install_noise_filters

USER_ERROR = 2  # the ``neva`` exit status of a NevaError
_VERBOSE = ("-v", "-vv", "-vvv", "--verbose")


def failure_line(rank: int, exitcode: int) -> str:
    """The last line for a rank that failed with ``exitcode`` (negative: killed by that signal)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"neva: rank {rank} was killed by {name}{hint}"
    return f"neva: rank {rank} failed with exit status {exitcode}; its output above says why"


def exit_status(exitcode: int) -> int:
    """A launcher's exit status for a rank's ``exitcode`` (128 + N for signal N)."""
    return exitcode if exitcode > 0 else 128 - exitcode


def first_failure(failures: dict[int, object]) -> tuple[int, int]:
    """(global rank, exit code) of the failure that stopped the job: the earliest, not counting the ranks torchrun
    stopped itself (SIGTERM) when another could say why (torchrun's timestamps are whole seconds)."""
    codes = {rank: int(getattr(f, "exitcode", 1)) for rank, f in failures.items()}
    times = {rank: float(getattr(f, "timestamp", 0)) for rank, f in failures.items()}
    causes = [r for r in codes if codes[r] != -signal.SIGTERM] or list(codes)
    rank = min(causes, key=lambda r: (times[r], codes[r] != USER_ERROR, r))
    return rank, codes[rank]


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv``; return the job's exit status."""
    install_noise_filters()
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = list(sys.argv[1:] if argv is None else argv)
    nproc = str(torchrun.parse_args(argv).nproc_per_node)
    if nproc.isdigit() and int(nproc) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own choice, without its banner
    if not any(arg in _VERBOSE for arg in argv):
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="neva-launch-") as reports:
        os.environ[REPORT_DIR_VAR] = reports
        try:
            torchrun.main(argv)
        except ChildFailedError as exc:
            rank, code = first_failure(exc.failures)
            told = any(name.startswith("neva-error-") for name in os.listdir(reports))
            if not (code == USER_ERROR and told):
                print(failure_line(rank, code), file=sys.stderr, flush=True)
            return exit_status(code)
        except SignalException as exc:
            if not any(name.startswith("neva-interrupt-") for name in os.listdir(reports)):
                print(f"neva: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
