"""Evaluation, the parts that `kdpipe evaluate` (stages/evaluate.py) puts together.

- `runs`: what run folders and `kdpipe run` experiments say (the latest finished run, its data, its teacher)
- `specs`: the models of the table (hub ids, folders, LoRA adapters, run folders) and loading them
- `tasks`: the task registry (classify, exact-match, perplexity) and the data checks they need
- `checkers`: exact-match checkers (--checker)
- `fidelity`: fidelity to the teacher on a held-out cache
- `harness`: lm-evaluation-harness tasks
- `report`: the table, results.json/.csv and predictions.jsonl
- `scoring`: the model mechanics (log-likelihoods, generation); `metrics`: the metrics; `plots`: the plots

`runs`, `tasks`, `checkers` and `report` import no torch, so the CLI can read the config cheaply.
"""
