"""The tokenizer the project builds itself, for the tiny text encoders (no downloads).

A WordPiece vocabulary over a fixed word list plus every printable ASCII character (as a word start and
as a ``##`` continuation), so each listed word is one token of its own -- the demo trains a model to
follow "a {colour} {shape} on a {colour} background", which needs distinct ids for those words -- and
any other text still tokenizes: unknown words split into characters, accents are stripped, and words
with characters outside ASCII become the unknown token. Built in code, so the same vocabulary comes out on every machine.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

DEMO_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "grey")
DEMO_SHAPES = ("circle", "square", "triangle")

# Words common in captions; the demo words first so their ids stay small and stable.
WORDS = (
    *DEMO_COLOURS,
    *DEMO_SHAPES,
    "background",
    *"""a an the on in of with and or at to from by for over under near behind above below
    is are was it its this that there their some many one two three four five small large big little
    tall short long wide round dark light bright pale colourful colorful orange purple pink brown gold
    silver gray cyan magenta teal beige image photo picture painting drawing illustration render view
    close up top side front back left right center middle corner edge shape shapes rectangle oval star
    line lines dot dots pattern texture surface wall floor ground sky cloud clouds sun moon water sea
    river lake beach mountain mountains tree trees forest grass flower flowers field road street city
    building house room window door table chair car bus train boat plane bird dog cat horse animal
    man woman person people child boy girl face hand hair standing sitting walking holding wearing
    shirt dress hat food plate cup glass bottle book phone screen text sign logo art style detailed
    realistic abstract simple plain solid blank empty centered""".split(),
)


def _vocabulary() -> dict[str, int]:
    pieces = list(SPECIAL_TOKENS)
    pieces += list(dict.fromkeys(WORDS))
    chars = [c for c in string.printable if not c.isspace()]
    pieces += [c for c in chars if c not in pieces]
    pieces += [f"##{c}" for c in chars]
    return {piece: i for i, piece in enumerate(pieces)}


def build_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """A deterministic tokenizer: ``<|startoftext|> ... <|endoftext|>``, right padding with ``<pad>``."""
    vocab = _vocabulary()
    core = Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    core.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
    )
