"""Model loading: aliases (``tiny``, ``tiny-derived``, ``smollm2-135m``), GGUF files, folders, hub ids."""

from l2zo.models.loading import LoadedModel, load_model, model_aliases, set_attn_implementation, smollm2_gguf

__all__ = ["LoadedModel", "load_model", "model_aliases", "set_attn_implementation", "smollm2_gguf"]
