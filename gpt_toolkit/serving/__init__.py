"""Generation and serving: sampling helpers, the OpenAI-compatible server and its chat page, task scoring through
generation. Imports core, models and data."""
