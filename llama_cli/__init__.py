"""llama-cli: LLaMA text completion from Meta-format checkpoints, on CPU or GPU, one or many processes.

`from llama_cli import Llama` is a drop-in for `from llama import Llama`. Heavy modules
(torch) are imported on first use, so `llama-cli --help` stays fast.
"""

__version__ = "0.1.0"
__all__ = ["Llama", "ModelArgs", "Transformer", "UserError", "RuntimeFailure"]


def __getattr__(name):
    if name == "Llama":
        from .generation import Llama
        return Llama
    if name in ("ModelArgs", "Transformer"):
        from . import model
        return getattr(model, name)
    if name in ("UserError", "RuntimeFailure"):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'llama_cli' has no attribute {name!r}")
