"""Offline tokenizers for the zoo: the real CLIP BPE and a small deterministic T5 Unigram vocabulary.

There is no model hub here, and `CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")` without network
silently returns a 2-token tokenizer, so both tokenizers are written from local data and checked after loading.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

# The real CLIP BPE ships inside open_clip; find it without importing open_clip (that imports torchvision).
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407
CLIP_MAX_LENGTH = 77
# A known tokenization of the real CLIP tokenizer, used to prove the rebuilt one is the real one.
CLIP_PROBE = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in the real T5 vocabulary
T5_MAX_LENGTH = 512  # FLUX.1's tokenizer_2 model_max_length
T5_N_WORDS = 3000     # lower-case words taken from the CLIP merges, earliest merge first
T5_N_CAPITALIZED = 200  # capitalized copies of the first words, so sentence starts stay one piece
# Word-internal suffixes, so inflected words split like "▁sitt" "ing" rather than into single letters.
T5_SUFFIXES = ("ing", "ed", "ly", "er", "ers", "es", "est", "ion", "al", "ness", "ment", "ity")
SPACE = "\u2581"      # SentencePiece's word-boundary marker


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"open_clip is not installed; it ships {CLIP_BPE_FILE}, the CLIP BPE merges")
    path = Path(spec.origin).parent / CLIP_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (same as open_clip's and transformers')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_merges() -> list[str]:
    """The 48,894 merges CLIP uses (the file holds more; CLIP keeps 49152 - 256 - 2 of them, after a header line)."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """Bytes, bytes + end-of-word, one token per merge, then the two specials: exactly CLIP's 49,408 ids."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ValueError(f"rebuilt CLIP vocab has {len(tokens)} tokens ({len(set(tokens))} unique), expected {CLIP_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, model_max_length: int = CLIP_MAX_LENGTH):
    """Write vocab.json, merges.txt and tokenizer_config.json, load them back as a CLIPTokenizer and check it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder)
    text, expected = CLIP_PROBE
    got = tok(text).input_ids
    if len(tok) != CLIP_VOCAB_SIZE or got != expected:
        raise RuntimeError(f"rebuilt CLIP tokenizer is wrong: {len(tok)} tokens, {text!r} -> {got}, "
                           f"expected {expected}")
    return tok


def t5_vocab() -> list[tuple[str, float]]:
    """A deterministic ~3.3k-piece Unigram vocabulary: specials, the bare word marker, every printable ASCII
    character (so any ASCII prompt tokenizes without <unk>), a few suffixes, then whole words in CLIP merge order
    (early merges are frequent). Scores are log-probabilities: words score -2.3 to -9, suffixes -6, characters -10,
    so Viterbi prefers whole words, then word + suffix, over spelling words out."""
    words: list[str] = ["a", "i"]
    for merge in clip_merges():
        tok = "".join(merge.split())
        if tok.endswith("</w>"):
            word = tok[: -len("</w>")]
            if len(word) >= 2 and word.isascii() and word.isalpha() and word.islower():
                words.append(word)
        if len(words) >= T5_N_WORDS:
            break
    pieces = [(p, 0.0) for p in T5_SPECIALS] + [(SPACE, -5.0)]
    pieces += [(chr(c), -10.0) for c in range(33, 127)]
    pieces += [(suffix, -6.0) for suffix in T5_SUFFIXES]
    pieces += [(SPACE + w, round(-math.log(rank + 10), 6)) for rank, w in enumerate(words)]
    pieces += [(SPACE + w.capitalize(), round(-math.log(rank + 10) - 1.0, 6)) for rank, w in enumerate(words[:T5_N_CAPITALIZED])]
    seen = set()
    unique = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    return unique


def write_t5_tokenizer(folder: Path, model_max_length: int = T5_MAX_LENGTH):
    """Write a T5 tokenizer that `T5TokenizerFast.from_pretrained(folder)` loads; return the loaded tokenizer."""
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = Path(folder)
    tok = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    loaded = T5TokenizerFast.from_pretrained(folder)
    ids = loaded("a photo of a cat").input_ids
    if [loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id] != [0, 1, 2] or loaded.unk_token_id in ids:
        raise RuntimeError(f"synthetic T5 tokenizer is wrong: specials {loaded.all_special_ids}, probe ids {ids}")
    return loaded
