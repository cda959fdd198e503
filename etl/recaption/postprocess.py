"""Cleaning of alt texts and generated captions, and detection of captions that failed.

``clean_caption`` strips the boiler-plate openings VLMs start with; ``detailed_failure`` and
``short_failure`` name why a caption is unusable (the row then goes to the rejects as ``caption_failed``).
"""

from __future__ import annotations

import html
import itertools
import re
from typing import NamedTuple

# Finished rows hold captions cleaned and judged by these rules, and are reused by later runs (resume.py):
# bump this when a change to them would clean or judge a caption differently, and they are made again.
RULES_VERSION = 1

# The reference run's list of boiler-plate openings and what replaces each. Both capitalisations are
# matched (see _OPENINGS): models start lower-case after an unusual chat template.
BOILERPLATE_OPENINGS = [
    *[(f"{subject} image {verb} ", "") for subject in ("The", "This") for verb in (
        "showcases", "portrays", "appears to be", "is", "depicts",
        "features", "captures", "shows", "displays", "presents",
    )],
    *[(f"In {article} {noun}, ", replacement) for article in ("this", "the") for noun, replacement in (
        ("picture", ""),
        ("artwork", "Artwork of "),
        ("illustration", "Illustration of "),
        ("depiction", ""),
        ("piece", ""),
        ("image", ""),
        ("art piece", "Art of "),
        ("scene", ""),
    )],
]

_OPENINGS = BOILERPLATE_OPENINGS + [(opening[0].lower() + opening[1:], rep) for opening, rep in BOILERPLATE_OPENINGS]

# Phrases the reference run saw a looping LLaVA repeat ("... no text, no other objects, no text ...").
LOOP_PHRASES = (" no text", " other objects", " additional objects", " no objects ", "alt-text")
MAX_LOOP_PHRASES = 5
MIN_DISTINCT_WORDS = 3
# A span of 1..MAX_LOOP_NGRAM words repeated back to back this many times is a decoding loop.
MAX_LOOP_NGRAM = 8
MIN_LOOP_REPEATS = 4

# How a chat model answers when it talks instead of captioning.
_PREAMBLE = re.compile(
    r"^\s*(?:sure|certainly|okay|ok|of course)?[,!.]?\s*"
    r"(?:here(?:'s| is| are)|below is)\b[^\n:]*?(?:caption|sentence|version|summary)[^\n:]*:\s*",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"^\s*(?:i'm sorry|i am sorry|sorry,|i cannot|i can't|i can not|i'm unable|i am unable|as an ai|"
    r"unfortunately|there is no caption|please provide)",
    re.IGNORECASE,
)
_CHATTER_TAIL = re.compile(r"\n\s*(?:(?:let me know|i hope|this caption)\b|note:).*\Z", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_WHITESPACE = re.compile(r"\s+")
# A short quotation, as a caption transcribes a sign: "..." or “...”, at most 80 characters.
_QUOTED_TEXT = re.compile(r'"[^"\n]{1,80}"|“[^”\n]{1,80}”')
# Opening quote -> its closing quote.
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’"}
# The SPEC's short caption is one sentence of at most ~40 words; well past that, the LLM ignored the prompt.
MAX_SHORT_WORDS = 60


def clean_alt_text(text: str | None) -> str:
    """HTML entities decoded, tags dropped, whitespace collapsed."""
    if not text:
        return ""
    # Alt texts are attribute values, not documents: a tag regex is enough and needs no HTML parser.
    text = _TAG.sub(" ", html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def strip_openings(caption: str) -> str:
    """Remove boiler-plate openings (repeatedly: "In this image, the image shows ...") and capitalise."""
    caption = caption.strip()
    changed = True
    while changed:
        changed = False
        for opening, replacement in _OPENINGS:
            if caption.startswith(opening):
                caption = replacement + caption[len(opening) :].lstrip()
                changed = True
    return capitalize_first(caption)


def capitalize_first(caption: str) -> str:
    # Only the first letter: str.capitalize() would lower-case names and the text quoted from the image.
    return caption[:1].upper() + caption[1:]


def clean_caption(caption: str) -> str:
    """A detailed VLM caption ready to store: whitespace tidied, openings stripped."""
    return strip_openings(_WHITESPACE.sub(" ", caption).strip())


def clean_short_caption(caption: str) -> str:
    """The LLM's answer reduced to the caption: a "Here is the caption:" preamble, quotes and sign-offs go."""
    caption = _CHATTER_TAIL.sub("", _PREAMBLE.sub("", caption.strip()))
    caption = _WHITESPACE.sub(" ", caption).strip().strip("`").strip()
    if _wrapped_in_quotes(caption):
        caption = caption[1:-1].strip()
    return strip_openings(caption)


def _wrapped_in_quotes(caption: str) -> bool:
    """The whole caption is one quotation: '"A dog."', not '"OPEN" sign under a "SALE" poster'."""
    if len(caption) < 2 or _QUOTE_PAIRS.get(caption[0]) != caption[-1]:
        return False
    inner = caption[1:-1]
    if caption[0] in "'‘":  # an apostrophe inside a word (dog's, '90s excepted) is not a quote
        inner = re.sub(r"(?<=\w)['’](?=\w)", "", inner)
    return caption[0] not in inner and caption[-1] not in inner


def _words(caption: str) -> list[str]:
    return re.findall(r"\w+(?:[-']\w+)*", caption.lower())


def find_loop(caption: str) -> str | None:
    """Describe the repetition loop in ``caption``, or None. Text quoted from the image ("SALE SALE SALE
    SALE" on a poster, as the VLM prompt asks it to transcribe) is not searched for repeated words."""
    phrase_count = sum(caption.lower().count(phrase) for phrase in LOOP_PHRASES)
    if phrase_count > MAX_LOOP_PHRASES:
        return f"{phrase_count} stock phrases ('no text', 'other objects', ...)"
    quotes = itertools.count()  # each quotation becomes one word of its own: never part of a repeat
    words = _words(_QUOTED_TEXT.sub(lambda _: f" quoted{next(quotes)} ", caption))
    for n in range(1, MAX_LOOP_NGRAM + 1):
        for start in range(len(words) - n * MIN_LOOP_REPEATS + 1):
            span = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == span for k in range(1, MIN_LOOP_REPEATS)):
                return f"'{' '.join(span)}' repeated {MIN_LOOP_REPEATS}+ times in a row"
    return None


def detailed_failure(caption: str) -> tuple[str, str] | None:
    """(kind, message) when a cleaned detailed caption is unusable; kinds: empty, loop, too_few_words."""
    if not caption.strip():
        return "empty", "the model returned no text"
    loop = find_loop(caption)
    if loop:
        return "loop", loop
    distinct = len(set(_words(caption)))
    if distinct < MIN_DISTINCT_WORDS:
        return "too_few_words", f"{distinct} distinct words (need {MIN_DISTINCT_WORDS})"
    return None


def short_failure(raw: str, cleaned: str) -> tuple[str, str] | None:
    """Like ``detailed_failure`` for the LLM's answer, plus "chatter" (a refusal or talk instead of a
    caption) and "too_long" (more than MAX_SHORT_WORDS words: not the one short sentence asked for)."""
    if _REFUSAL.match(raw) or _REFUSAL.match(cleaned) or (cleaned and cleaned.rstrip().endswith("?")):
        return "chatter", f"not a caption: {raw.strip()[:80]!r}"
    if word_count(cleaned) > MAX_SHORT_WORDS:
        return "too_long", f"{word_count(cleaned)} words (at most {MAX_SHORT_WORDS})"
    return detailed_failure(cleaned)


def word_count(caption: str) -> int:
    return len(_words(caption))


class Verdict(NamedTuple):
    """A cleaned caption, or why there is none (kind: empty, loop, too_few_words, chatter, too_long)."""

    caption: str | None
    kind: str | None = None
    message: str | None = None


def judge_detailed(raw: list[str]) -> list[Verdict]:
    verdicts = []
    for text in raw:
        caption = clean_caption(text)
        failure = detailed_failure(caption)
        verdicts.append(Verdict(None, *failure) if failure else Verdict(caption))
    return verdicts


def judge_short(raw: list[str]) -> list[Verdict]:
    verdicts = []
    for text in raw:
        caption = clean_short_caption(text)
        failure = short_failure(text, caption)
        verdicts.append(Verdict(None, *failure) if failure else Verdict(caption))
    return verdicts
