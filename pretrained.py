"""OpenAI's GPT-2 weights, through the optional transformers package (a download on first use, then its cache)."""
from errors import UserError, import_optional
from model import GPT


def load_gpt2(model_type, dropout=0.0):
    """GPT(model_type) with OpenAI's weights; a missing package or an offline first use is a one-line UserError."""
    import_optional("transformers", f"init_from={model_type}")
    try:
        return GPT.from_pretrained(model_type, dict(dropout=dropout))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {model_type} weights from Hugging Face ({first[:150]}): the first use needs "
                        f"internet; afterwards they come from the Hugging Face cache") from None
