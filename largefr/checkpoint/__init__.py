"""Checkpoints of the whole training state (docs/DESIGN.md section 8).

`save_load.py`: save, load and validate (collective over the data-parallel group); `engine.py`:
DeepSpeed's files inside; `folders.py`: the checkpoint folder (temporary names, pruning, what
`--resume auto` takes); `storage.py`: free space and failed writes named; `resume_config.py`: which
config keys may change on resume; `files.py`: the files of one checkpoint (names, manifest, digests,
safe loading); `rows.py`: rows moved block by block between head files and tensors (or new files),
hashed on the way; `reshard.py`: head rows by class id across world sizes, the offline re-split and
the backbone export; `parts.py`: each part's state (`largefr.stateful`) routed by kind to files and
checked, knowing no field names; `rng.py`: the process RNG states as a part; `train_state.py`: the
parts of a training run, and its save and restore.
"""
