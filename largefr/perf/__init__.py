"""Performance tooling, outside the library's model and head rooms.

`memory_plan.py`: per-rank memory of the class-partitioned head and the most classes a budget holds;
`plan_options.py`: the planner's inputs as command-line options (tools/plan_memory.py,
tools/dry_run.py, tools/scale_classes.py); `dry_run.py`: fake process groups that play one rank of
a large job; `head_bench.py`: step time and peak memory of the sharded head (tools/bench_head.py,
tools/scale_classes.py, tools/bench_backbone.py); `profiling.py`: per-phase timing of real training
steps (tools/profile_step.py).
"""
