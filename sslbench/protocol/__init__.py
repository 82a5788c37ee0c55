"""The one protocol: pretrain(method, corpus) -> checkpoint -> finetune(task) -> evaluate(task) -> record.

Written once for every method and task: a method only supplies a loss on a batch of corpus volumes
(sslbench/methods/), a task only supplies a recipe (benchmarks/), a reader where its layout is new
(sslbench/data/layouts/) and, for a new kind of task, a task kind (sslbench/tasks/). Training is counted in
steps and runs through one loop (loop.py); every random draw of step ``s`` is seeded by (run seed, s), so a run
killed at any moment and continued from its last checkpoint ends with the same metrics as an uninterrupted run
(on the CPU, where kernels are deterministic).

Modules: run (the whole protocol), pretraining, finetuning, evaluate, loop, runtime, optim, runs, plan,
feasibility, track2d. This package's namespace is its public surface (the commands call these names).
"""
from __future__ import annotations

# The protocol layer's public surface (cli, sweep, bench and predict call these):
from .evaluate import reevaluate  # noqa: F401
from .run import run_protocol  # noqa: F401
from ..data.loaded import check_cases, labeled_subset  # noqa: F401
from ..data.cases import case_cache, load_cases  # noqa: F401
from ..data.locate import PhantomNotWritten, data_home, locate_data, read_splits  # noqa: F401
from .finetuning import _finetune, finetune  # noqa: F401
from .loop import DataWait, Loop, Validation, stop_if_not_finite  # noqa: F401
from .optim import make_optimizer, make_schedule, param_groups, pretrain_optimizer, pretrain_schedule  # noqa: F401
from .plan import refuse_pretraining_for_2d  # noqa: F401
from .plan import PlannedRun, check_finetune_loader, dry_run, finetune_view, plan_run, planned_runs, preflight  # noqa: F401
from .pretraining import _pretrain, check_loader, pretrain, pretrain_stream, stream_features  # noqa: F401
from .runs import (FinetuneRun, Outcome, _rank_report, _SilentRecord, check_run_cases,  # noqa: F401
                   checkpoint_provenance, file_digest, open_finetune, resume_finetune, run_scope)
from .runtime import (COMPILE_FEATURE_TOLERANCE, COMPILE_ROUNDING_FACTOR, align_optimizer_state,  # noqa: F401
                      autocast, check_compiled_method, compile_method, compiled, compiled_feature_problems,
                      make_progress, seeded_probe, select_device, use_bf16, use_run_attention)

