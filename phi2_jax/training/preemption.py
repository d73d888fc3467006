"""Stopping a training job on SIGTERM: every process at the same step, whichever process got the signal.

A scheduler that preempts a job may signal only some of its processes (a node
drained, one pod evicted). If each process stopped on its own signal, the
signalled one would enter Orbax's barriered save while the others entered the
next step's collectives, and both would wait for ever. So the processes agree:
after each step every process casts its local flag into a tiny all-reduce (a
max over one int per process), and all read the result one step later, so the
host never waits for the step it has just dispatched. Everyone reads the same
value after the same step, so everyone stops, and saves, at the same step.

The signal handler is installed by the command (`install_sigterm_handler`),
never by the library.
"""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """A flag a SIGTERM handler sets; the training loop reads it between steps."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum, frame) -> None:
        self.requested = True


def install_sigterm_handler(stop: StopRequest) -> None:
    """Makes SIGTERM set `stop` instead of killing the process (a command's process-wide change)."""
    signal.signal(signal.SIGTERM, stop.handler)


class StopAgreement:
    """`any process asked to stop`, agreed over all processes through one tiny collective.

    With one process there is nothing to agree on: `cast` returns the local flag as is.
    """

    def __init__(self) -> None:
        import jax

        self.multi = jax.process_count() > 1
        if self.multi:
            import jax.numpy as jnp
            import numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            # One device per process takes part: the fewer participants, the cheaper the collective.
            first = {}
            for device in jax.devices():
                first.setdefault(device.process_index, device)
            mesh = Mesh(np.array([first[p] for p in sorted(first)]), ("all",))
            self._sharding = NamedSharding(mesh, PartitionSpec("all"))
            self._local = 1
            self._shape = (len(first),)
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def cast(self, flag: bool) -> Any:
        """Dispatches this process's vote; every process must call it at the same point. Returns a handle."""
        if not self.multi:
            return bool(flag)
        import jax
        import numpy as np

        local = np.full((self._local,), int(flag), np.int32)
        return self._max(jax.make_array_from_process_local_data(self._sharding, local, self._shape))

    @staticmethod
    def read(vote: Any) -> bool:
        """True if any process voted to stop (blocks until the vote's collective has run)."""
        import numpy as np

        return bool(np.asarray(vote)) if not isinstance(vote, bool) else vote

    def any(self, flag: bool) -> bool:
        """`cast` and `read` at once: a blocking agreement (used outside the step loop)."""
        return self.read(self.cast(flag))
