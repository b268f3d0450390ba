"""The toolkit's library, in six rooms (docs/architecture.md draws them): core (errors, files, the config, the
tokenizers, the device), models (checkpoints, a model's source and its loader, LoRA, the exports), data (datasets,
preparing them, benchmark tasks), training (the loop's guards, evaluation, the schedule, the run's log), serving
(generation and the OpenAI-compatible server) and reports (tables and plots of runs). An import points down that list
or stays in its room, never up. The root's scripts (train.py, sample.py), tools/ and data/ import the library; it
imports the root's public modules model.py and configurator.py and never a script.

Comments cite "tutorial chNN": the Chinese tutorial series on nanoGPT's train.py that the README names (ch01 the
configuration parameters, ch03 the training loop, ch04 the complete guide and its experiments) and "the tutorial's
summary", its closing summary of train.py with the experiment guide.
"""
