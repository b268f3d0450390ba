"""The toolkit's library: one module per job (see README, Layout). The root's scripts (train.py, sample.py),
tools/ and data/ import it; it imports the root's public modules model.py and configurator.py, never a script."""
