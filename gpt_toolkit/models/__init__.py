"""Model I/O: checkpoint files, where a model comes from (source.ModelSource, the one loader), transformers and
GPT-2 weights, LoRA adapters, FSDP sharding, memory estimates, the GGUF export. Imports core only."""
