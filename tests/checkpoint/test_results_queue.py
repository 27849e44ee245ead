"""megatron-core's checkpoint writer uses our results queue, whose manager process dies with the process that saved
(killed with SIGKILL, it runs no clean-up: megatron's own manager stayed behind for good, one per killed rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neva_tools.train.supervision import pid_alive

SAVER = textwrap.dedent("""
    import sys, time
    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from neva_tools.checkpoint import results_queue
    from neva_tools.checkpoint.dist import save_full

    save_full([("decoder.layers.0.mlp.weight", torch.ones(2, 3))], 1, __import__("pathlib").Path(sys.argv[1]))
    used = filesystem_async._get_write_results_queue() is results_queue.adopt_results_queue()
    print(results_queue.server_pid(), used, flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_queue_server_dies_with_a_killed_saver(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        line = saver.stdout.readline().split() if saver.stdout else []
        assert len(line) == 2, f"the saver printed {line!r} (exit {saver.poll()})"
        server, used = int(line[0]), line[1] == "True"
        assert used and server != saver.pid and pid_alive(server)  # megatron's writer uses our queue
        assert (out / "metadata.json").is_file()  # the checkpoint was written through it
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while pid_alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(server), f"the results queue's manager {server} outlived the killed saver"
    finally:
        if saver.poll() is None:
            saver.kill()
            saver.wait()
