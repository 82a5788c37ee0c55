"""`sslbench report`: leaderboard tables built from run records, beside the published numbers.

The package, its arrows pointing down only: ``command`` (the CLI) -> ``tables`` (tables built from data),
``html`` / ``render`` (output as text) and ``online`` (Table 6's answers); ``tables`` -> ``efficiency``
(label-efficiency tables and plot) -> ``plots`` -> ``cells`` (Table, Row, Cell, Group) -> ``runs`` (the records
collected into a DataFrame, read and hashed through sslbench.store); ``published`` (the leaderboard YAML) and
``online`` read only the recipes and the store.

Published numbers are data (``leaderboards/voco_supplement.yaml``: the VoCo supplement's Tables 1, 3-7,
each cell with its source); measured numbers are the run folders under ``runs/finetune`` (their
``metrics.json``, ``status.json`` and ``recipe.yaml``). Nothing in a table is typed by hand. This follows
mmpretrain: results as data (metafile.yml), tables generated with tabulate, and a rich regression table
coloured by agreement with the expected value.

Rules the tables keep:

* **Protocols are never averaged together.** Each cell groups its runs by protocol and shows every group
  separately, inside the same cell, most runs first, each labelled ``[preset, λ, p:<hash>]`` whenever the
  cell holds more than one group (and the table gets a note saying so).
  The protocol of a run is the hash of its resolved recipe (``recipe.yaml``) without ``run.seed``, with
  the pre-training's protocol hash (recomputed from its recipe, also without its seed) as ``init.hash`` and
  the number of processes of each stage where there were several. A ``finetune --init FILE`` start from a
  recorded pre-training's backbone.pt is hashed by that pre-training's protocol too (runs._init_pretraining), so
  two executions of one pre-training recipe join; other files by their hash. A record carries this one hash
  (``metrics.json: protocol``, the run key's protocol part); recomputing it
  (sslbench.store.run_key.seed_free_protocols) gives exactly that for today's records and keeps records written
  by older versions comparable. Where ``recipe.yaml`` (or the pre-training's) cannot be read, the recorded hash
  is used.
* **Comparable or not shown as comparable.** One function, ``runs.comparability``, decides where a run stands:
  beside the published number (with Δ) only when it follows the published protocol (real data in the
  fine-tuning and its pre-training, ``--preset paper`` for both, the task's and the method's full schedule,
  the recipe's split, labelled cases and scoring). Every other run fills its own column next to the real one,
  ``<Dataset> (phantom)``, ``(tiny preset)``, ``(reduced schedule)`` or ``(other protocol)``, never with a Δ.
* **Phantoms are never the real dataset.** Runs that read phantom data anywhere (``"phantom": true`` in
  their record, their task's recipe, or their pre-training's record or recipe) fill the ``(phantom)`` column,
  their values prefixed ``PHANTOM`` in every format.
* **Scoring eras are not mixed.** A segmentation record without metrics.json's ``scoring`` block was scored
  before the empty-set rules of 2026-12-03: its group is kept apart and marked ``‡scoring``, unless its
  per-case rows show a Dice for every class in every case (runs.scored_alike_by_the_rules: no empty truth,
  so the rules give it the same scores). HD95 (mm,
  ``mean_hd95``) gets its own column in the comparison table where runs record it (the supplement publishes
  no HD95).
* Dice in records is a fraction; tables are in percent like the paper. Mean ± sample std over seeds
  (runs), Δ = measured mean - published, n = number of runs.
* **Environments are never mixed silently.** Each run's torch / monai versions (its env.json, and its
  pre-training's) travel with it; a group whose runs differ is marked ``‡env`` and a table whose measured runs
  span several environments gets a note listing them, and the terminal a warning.
* Table 6 is published on hidden leaderboard test sets; sslbench evaluates validation splits, so no run
  record fills it (the YAML's ``measured: false``). Its measured values are what the leaderboards answered,
  recorded as data (``<runs>/leaderboards/online.yaml`` or ``--online FILE``; sslbench/report/online.py): each
  stands where its run's comparability puts it, with its provenance (run folder, date, submission id).

``--format html`` writes one self-contained page (sslbench/report/html.py); every report output is written
atomically and world-readable (0644).
"""
