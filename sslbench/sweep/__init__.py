"""`sslbench sweep`: Optuna studies over one recipe key, each trial a normal protocol run.

    sslbench sweep lambda --task mmwhs --root /data/MM-WHS             # Table 3: grid 0.5, 1.0, 1.5
    sslbench sweep task.finetune.lr --sampler tpe --trials 20 --low 1e-4 --high 1e-2 --log

Each trial resolves the base recipe plus ``--set <key>=<value>``, calls
:func:`sslbench.protocol.run_protocol` with ``resume=True`` (pre-train with that value if the method
pre-trains, fine-tune, evaluate) and returns the validation Dice (maximised). The run folder is an ordinary
run record, so ``sslbench report`` reads trials like any run (the λ grid fills Table 3). Trial user
attributes: ``run_folder``, ``value``, ``protocol`` (the fine-tuning protocol hash), ``dice``, ``phantom``,
``action`` (new, resume, or skip: told from a finished record).

Optuna chooses the points and keeps the study; the result store decides who does a point: its run folder (the
run key the protocol computes) and that folder's lock (the protocol's own). See worker.py for the loop.

Storage (storage.py): an Optuna journal file ``<out>/sweeps/<study>.journal`` by default (``JournalStorage``
over ``JournalFileBackend``, safe for several processes; Optuna's FAQ advises against SQLite for parallel work),
or any RDB URL (``postgresql://...`` gets the installed driver, printed URLs hide the password); ``optuna-dashboard
<journal>`` opens the journal as it is (tests/test_sweep_storage.py). The default study name (spec.py) joins key,
method, task, preset and seed with a hash of the resolved base protocol (the swept key left out) and of the
search space, so a sweep of another protocol never shares a study and the same command finds its own again.

Pruning: trials report the validation Dice of every periodic validation with ``trial.report(dice, step)``;
searches prune with ``MedianPruner`` (default) or ``HyperbandPruner`` (resource = training steps), grids never
prune (Table 3 needs every point to the end). A pruned trial leaves an unfinished run folder (resumable,
ignored by the report).

Modules: spec (the sweep's definition, validated), storage, worker (the loop, and the torchrun followers),
summary (the table), cli (options, main).
"""
from __future__ import annotations

from .cli import DESCRIPTION, EPILOG, add_arguments, main, run  # noqa: F401
from .spec import ALIASES, DEFAULT_VALUES, Sweep, build_sweep, check_key, format_value, show_value  # noqa: F401
from .storage import open_storage, public_url  # noqa: F401
from .summary import print_summary  # noqa: F401
from .worker import (ATTR_ERROR, ATTR_SPEC, ATTR_STALE, ATTR_SUPERSEDED, ATTR_WORKER, SweepStop,  # noqa: F401
                     Worker, check_data, command, follow, worker_gone)
