r"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment (DESIGN §8).

One process per host (or, on CPU, several local processes that each fake some devices):

  # host 0 (its address is the coordinator's)
  python -m experiments.train --config=... --workdir=/shared/run \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
  # host 1
  python -m experiments.train --config=... --workdir=/shared/run \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1

The same values can come from the environment instead (``MODALIMMUNE_COORDINATOR``,
``MODALIMMUNE_NUM_PROCESSES``, ``MODALIMMUNE_PROCESS_ID``); ``--coordinator_address=auto`` leaves
everything to JAX's own cluster detection (Cloud TPU, Slurm, Open MPI, ...). With none of them set,
or one process, nothing is initialised and the run is single-process.

After start-up every process builds the same global mesh over all devices; the trainer feeds each
process's own rows (``shard_index = process_index``) and assembles global arrays with
``jax.make_array_from_process_local_data``. The workdir must be shared: orbax writes the arrays
from every process, and only process 0 writes the JSON files. On CPU the cross-process collectives
are gloo (the default of ``jax_cpu_collectives_implementation`` in this JAX).
"""

import os

import jax

from modalimmune_jax.training.errors import ConfigError

ENV_COORDINATOR = "MODALIMMUNE_COORDINATOR"
ENV_NUM_PROCESSES = "MODALIMMUNE_NUM_PROCESSES"
ENV_PROCESS_ID = "MODALIMMUNE_PROCESS_ID"
AUTO = "auto"


def _env_value(env, name, *, integer):
    value = (env.get(name) or "").strip()
    if not value:
        return None
    if not integer:
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} must be an integer") from None


def resolve(coordinator_address=None, num_processes=None, process_id=None, *, environ=None):
    """The distributed settings, each from the argument (a binary passes its flag), else the
    environment.

    Args:
      coordinator_address: ``host:port`` of process 0, or ``"auto"``.
      num_processes: the process count.
      process_id: this process's id.
      environ: the environment to read (default ``os.environ``).

    Returns:
      ``(coordinator_address, num_processes, process_id)``: ``(None, 1, 0)`` for a
      single-process run; ``("auto", num or None, id or None)`` for JAX's cluster detection.

    Raises:
      ConfigError: a multi-process setting is incomplete or out of range.
    """
    env = os.environ if environ is None else environ

    def pick(arg, env_name, integer):
        return arg if arg is not None else _env_value(env, env_name, integer=integer)

    coordinator = pick(coordinator_address, ENV_COORDINATOR, False)
    num = pick(num_processes, ENV_NUM_PROCESSES, True)
    pid = pick(process_id, ENV_PROCESS_ID, True)
    if coordinator == AUTO:
        return AUTO, num, pid
    if coordinator is None and num in (None, 1) and pid in (None, 0):
        return None, 1, 0
    if num is None or num < 1:
        raise ConfigError(f"--num_processes={num}: a multi-host run needs the process count "
                          f"(flag or ${ENV_NUM_PROCESSES})")
    if num == 1:
        if pid not in (None, 0):
            raise ConfigError(f"--process_id={pid} with --num_processes=1")
        return None, 1, 0
    if coordinator is None:
        raise ConfigError(f"--num_processes={num} needs --coordinator_address=host:port "
                          f"(or ${ENV_COORDINATOR})")
    if pid is None or not 0 <= pid < num:
        raise ConfigError(f"--process_id={pid} must be in [0, {num}) (flag or ${ENV_PROCESS_ID})")
    return coordinator, num, pid


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is asked for.

    Call it first, before anything touches a JAX backend. Settings come from the arguments (the
    binaries pass ``--coordinator_address``, ``--num_processes``, ``--process_id``), else the
    environment (module docstring). Idempotent.

    Returns:
      True when this process is part of an initialised multi-process run, else False (a no-op).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator, num, pid = resolve(coordinator_address, num_processes, process_id)
    if coordinator is None:
        return False
    if coordinator == AUTO:
        jax.distributed.initialize(num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                                   process_id=pid)
    return True
