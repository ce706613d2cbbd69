"""Batch inference (OpenAI's Files and Batches API) as Slurm job arrays: files.py (uploads and produced files),
validation.py (the input checked line by line, split into shards), batches.py (create, list, read, cancel),
submission.py (the job array), runner.py (inside each task: the engine's server and the shard's lines), lines.py
(the files' lines, resume and merge), tracking.py (the reconciler's step). Imports nothing: the runner runs inside a
job."""
