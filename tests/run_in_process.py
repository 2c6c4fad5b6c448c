"""Launched by the tests: several runs of the real entry point's config and hooks, one after the
other in *one* process (as a reused sweep worker does), with evidence that each left the process
as it found it::

    python tests/run_in_process.py OUT.json -- <pretrain_k400.py flags> -- <flags> ...

For each run OUT.json holds the summary and whether the launcher environment and the RNG states
were the same after the run as before it, and the process group gone (the config is frozen).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from carl_scale.train.trainer import run  # noqa: E402
from launch.pretrain_k400 import hooks_for, parse  # noqa: E402

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rng_fingerprint() -> str:
    return hashlib.sha256(repr((random.getstate(), np.random.get_state()[1].tolist(),
                                torch.get_rng_state().tolist())).encode()).hexdigest()


def fork_collects() -> bool:
    """Whether a process forked now (as the next run's DataLoader workers are) can run the garbage
    collector: a process group left for the collector would be freed in the child, where gloo
    waits forever for threads that were not forked."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a hang ends as SIGALRM
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def main() -> None:
    out, *rest = sys.argv[1:]
    groups, cur = [], None
    for a in rest:
        if a == "--":
            cur = []
            groups.append(cur)
        else:
            cur.append(a)
    random.seed(123)
    results = []
    for flags in groups:
        cfg, _ = parse(flags)
        before = ({k: os.environ.get(k) for k in ENV_KEYS}, rng_fingerprint())
        summary = run(cfg, hooks_for(cfg))
        after = ({k: os.environ.get(k) for k in ENV_KEYS}, rng_fingerprint())
        results.append({"flags": flags, "summary": summary, "env_restored": before[0] == after[0],
                        "rng_restored": before[1] == after[1],
                        "group_destroyed": not torch.distributed.is_initialized(), "fork_safe": fork_collects()})
    Path(out).write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
