"""Build the default model's training corpus and tokenizer from two public-domain texts.

Sources (Debian packages; both texts are in the public domain, see training/data/SOURCES.md):
  jargon-text  /usr/share/doc/jargon-text/jargon.txt.gz   The Jargon File 4.4.7 (E. S. Raymond, ed.)
  dict-devil   /usr/share/dictd/devil.dict.dz              The Devil's Dictionary (Ambrose Bierce, 1911)

Writes training/data/{train,heldout}.txt (one cleaned paragraph per line; every 20th paragraph held
out, so the split is deterministic) and training/data/tokenizer.json (byte-level BPE, seeded).
Run once, as root on Debian: apt-get install jargon-text dict-devil; python training/prepare_corpus.py
The outputs are committed, so training needs nothing from Debian.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import sys
import unicodedata
from pathlib import Path

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL = Path("/usr/share/dictd/devil.dict.dz")  # dictzip is gzip-compatible
DATA = Path(__file__).resolve().parent / "data"
HELDOUT_EVERY = 20
VOCAB_SIZE = 4096
SEED = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Typography the texts use, as the ASCII a tokenizer of 4k pieces should spend no pieces on.
ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
                       "\u2026": "...", "\u00a9": "(c)", "\u00d7": "x", "\u00a0": " "})


def to_ascii(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.translate(ASCII))
    return text.encode("ascii", "ignore").decode()


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each reflowed onto one line."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def jargon_paragraphs(text: str) -> list[str]:
    # The body starts at chapter 1; before it are the title and table of contents.
    text = text[re.search(r"^Chapter\s+1\.", text, re.M).start():]
    out: list[str] = []
    head = None
    for para in paragraphs(to_ascii(text).replace("{", "").replace("}", "")):
        if re.match(r"^:[^:]+:", para) and len(para.split()) <= 8:  # an entry's head: ":blit: /blit/, vt."
            head = para
            continue
        if len(para.split()) < 4 or set(para) <= set("=- "):  # headings, index letters, rules
            continue
        out.append(f"{head} {para}" if head else para)
        head = None
    return out


def devil_paragraphs(text: str) -> list[str]:
    # Before the preface: the dictd database header and the e-text's title page.
    text = text[text.index("PREFACE"):].replace("_", "")
    return [p for p in paragraphs(to_ascii(text)) if len(p.split()) >= 4]


def build_corpus(jargon: Path, devil: Path) -> tuple[list[str], list[str]]:
    paras = jargon_paragraphs(gzip.open(jargon, "rt", encoding="utf-8").read())
    paras += devil_paragraphs(gzip.open(devil, "rt", encoding="utf-8", errors="replace").read())
    train = [p for i, p in enumerate(paras) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [p for i, p in enumerate(paras) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def train_tokenizer(lines: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    random.seed(SEED)  # the BPE trainer is deterministic for a given input; the seed is for the record
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jargon", type=Path, default=JARGON)
    parser.add_argument("--devil", type=Path, default=DEVIL)
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args(argv)
    for path, package in ((args.jargon, "jargon-text"), (args.devil, "dict-devil")):
        if not path.is_file():
            print(f"error: {path} not found (apt-get install {package})", file=sys.stderr)
            return 1
    train, heldout = build_corpus(args.jargon, args.devil)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text("\n".join(train) + "\n")
    (args.out / "heldout.txt").write_text("\n".join(heldout) + "\n")
    tok = train_tokenizer(train)
    tok.save(str(args.out / "tokenizer.json"))
    n_train = sum(len(tok.encode(p).ids) for p in train)
    n_held = sum(len(tok.encode(p).ids) for p in heldout)
    print(f"{len(train)} train paragraphs ({n_train} tokens), {len(heldout)} held out ({n_held} tokens), "
          f"vocab {tok.get_vocab_size()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
