"""The ground floor: errors and one-line messages, atomic file writes and locks, the device and dtype, process
setup, the command-line parser, the training config (Config) and the tokenizers. Imports nothing else of the toolkit."""
