"""Training: the loop's guards (guards.py), what trains a model (setup.py: optimizer, autocast, GradScaler), the
schedule, evaluation, stops, timing, the run's log and out_dir, and the checks before a model is built (init_from.py).
Imports core, models and data; train.py holds the loop itself."""
