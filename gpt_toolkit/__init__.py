"""The toolkit's library: one flat package, one module per job (README, Layout). The root's scripts (train.py,
sample.py), tools/ and data/ import it; it imports the root's public modules model.py and configurator.py and never a
script.

Comments cite "tutorial chNN": the Chinese tutorial series on nanoGPT's train.py that the README names (ch01 the
configuration parameters, ch03 the training loop, ch04 the complete guide and its experiments) and "the tutorial's
summary", its closing summary of train.py with the experiment guide.
"""
