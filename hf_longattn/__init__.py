"""hf_longattn: training-free long-context sparse attention for Hugging Face Llama, Mistral and Gemma models.

    from hf_longattn import patch_model
    patch_model(model, method="hip")

Importing the package registers every method with transformers as `longattn_<method>`, so
`from_pretrained(..., attn_implementation="longattn_hip")` works as well.
"""

from .config import ConfigError, MethodConfig
from .kernels import SparsePattern, dense_attention, sparse_attention
from .methods import AttentionCall, SparseMethod, register_method
from .models import UnsupportedModelError
from .patch import available_methods, is_patched, patch_model, patched, register_all, registered_name, unpatch_model

register_all()

__version__ = "0.1.0"
__all__ = [
    "patch_model", "unpatch_model", "patched", "is_patched", "available_methods", "registered_name",
    "SparsePattern", "sparse_attention", "dense_attention", "SparseMethod", "AttentionCall", "register_method",
    "MethodConfig", "ConfigError", "UnsupportedModelError",
]
