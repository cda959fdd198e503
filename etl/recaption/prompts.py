"""The recaptioning prompts, in one place; each can be overridden in the pipeline config.

Worded as in the reference run: the VLM gets the alt text as a hint that may be wrong, the LLM distils
the detailed caption into one sentence of at most 40 words and answers with the caption alone.
"""

from __future__ import annotations

from etl.config import RecaptionConfig

VLM_PROMPT = (
    "Please make a detailed but succinct caption of this image. If you see text or objects, be sure to "
    "describe them in detail along with any other aspects of the foreground and background. If there is "
    "any important text in the image, include it in the caption. As a hint, here is the alt-text attribute "
    "of the image, which may or may not have to do with the image:\n\nHint:\n```\n{alt_text}\n```"
)

LLM_SYSTEM_PROMPT = "You are a helpful assistant"

LLM_PROMPT = (
    "Please take the following image caption and attempt to distill it into a single sentence. Remove any "
    "redundant lines or descriptions and make it a maximum of 40 words in length.\n\n```\n{caption}\n```\n\n"
    "Please only write the caption and no other text."
)


def vlm_messages(alt_text: str, cfg: RecaptionConfig) -> list[dict]:
    """One user turn: the image, then the request with the alt text as a hint."""
    # str.replace rather than str.format: user templates and alt texts may hold literal braces.
    text = (cfg.vlm_prompt or VLM_PROMPT).replace("{alt_text}", alt_text)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def llm_messages(caption: str, cfg: RecaptionConfig) -> list[dict]:
    text = (cfg.llm_prompt or LLM_PROMPT).replace("{caption}", caption)
    system = cfg.llm_system_prompt if cfg.llm_system_prompt is not None else LLM_SYSTEM_PROMPT
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def without_template_bos(tokenizer, prompts: list[str]) -> list[str]:
    """Rendered prompts less the bos token their chat template wrote, when the tokenizer adds one anyway:
    Llama-3's template writes <|begin_of_text|> and its tokenizer adds it again, and a model given two
    sees a sequence unlike any it was trained on. Tokenize the result with special tokens added."""
    bos = tokenizer.bos_token
    if not bos or tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
        return prompts
    return [prompt[len(bos):] if prompt.startswith(bos) else prompt for prompt in prompts]


def render_vlm_prompts(processor, alt_texts: list[str], cfg: RecaptionConfig) -> list[str]:
    """The VLM's prompts through its processor's chat template, ready for generation."""
    prompts = [processor.apply_chat_template(vlm_messages(alt, cfg), add_generation_prompt=True) for alt in alt_texts]
    return without_template_bos(processor.tokenizer, prompts)


def render_llm_prompts(tokenizer, captions: list[str], cfg: RecaptionConfig) -> list[str]:
    prompts = [
        tokenizer.apply_chat_template(llm_messages(caption, cfg), add_generation_prompt=True, tokenize=False)
        for caption in captions
    ]
    return without_template_bos(tokenizer, prompts)
