"""Recaptioning: a VLM writes a detailed caption (alt text as a hint), an LLM shortens it to one sentence.

Backends (``recaption.backend`` in the pipeline config): ``transformers``, ``vllm`` (optional ``gpu``
extra) and ``alt-text``, the model-free smoke backend that stores the cleaned alt text as both captions.
"""

from etl.recaption.backends import AltTextCaptioner, Captioner, TransformersCaptioner, VllmCaptioner, get_captioner
from etl.recaption.shard import RecaptionResult, RecaptionStats, caption_rows, recaption_shard

__all__ = [
    "AltTextCaptioner",
    "Captioner",
    "RecaptionResult",
    "RecaptionStats",
    "TransformersCaptioner",
    "VllmCaptioner",
    "caption_rows",
    "get_captioner",
    "recaption_shard",
]
