"""Datasets: reading train.bin/val.bin into batches (BatchPlan), preparing text and chat data, benchmark tasks.
Imports core and models (chat data takes the tokenizer of the model it fine-tunes)."""
