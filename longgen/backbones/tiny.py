"""Offline tiny text-encoder pieces for tiny random pipelines (tests, the demo): no hub, no files."""

from __future__ import annotations

_WORDS = (
    "a the of and in on with to red green blue yellow white black circle square ball shape moving "
    "bouncing fast slow video cat dog city night day sky sea light dark small large left right up down "
    # the synthetic world's captions (longgen.data.synthetic: WorldSpec.caption): object count, the rest of
    # its palette, sizes and paces, so that a caption's tokens name what the clip shows (not <unk>)
    "1 2 3 4 shapes cyan magenta medium quickly slowly grey background "
    # where an object starts and where it heads (caption style "position")
    "at top bottom middle"
).split()
"""The word list; appended words take the ``w<i>`` fillers' ids, so earlier words keep theirs."""


def tiny_tokenizer(model_max_length: int = 32, vocab_size: int = 64, bos: bool = False, eos: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` that saves and loads like a real tokenizer.

    Special tokens: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``<s>`` = 3; then a small fixed word
    list, padded with ``w<i>`` words up to ``vocab_size``. Unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    words = list(dict.fromkeys(_WORDS))
    words += [f"w{i}" for i in range(max(0, vocab_size - len(specials) - len(words)))]
    vocab = {tok: i for i, tok in enumerate(specials + words[: vocab_size - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )
