"""Tokenizer: a small class over Hugging Face `tokenizers` that reads and writes checkpoint tokenizers.

It does what the training loops, the sampler and the tiny recipe need from a tokenizer, without
`transformers` at run time:

    tok = Tokenizer.from_pretrained(checkpoint_dir)     # tokenizer.json + tokenizer_config.json
    ids = tok.encode(text)                              # no BOS: chat templates write their own
    text = tok.decode(ids)
    tok = Tokenizer.train(texts, vocab_size=400)        # the tiny recipe's byte-level BPE
    tok.save(out_dir)                                   # a layout transformers.AutoTokenizer loads

What is read from a checkpoint directory, and how it matches `transformers` (v5):
  - tokenizer.json is the tokenizer (model, pre-tokenizer, decoder, post-processor, added tokens).
  - tokenizer_config.json names the special tokens (bos/eos/pad/unk/..., each a string, a
    {"content": ...} object or null) and may carry `chat_template` (a string, or a list of
    {name, template} from which "default" is taken), `added_tokens_decoder` and `model_max_length`.
    Named tokens and `added_tokens_decoder` entries missing from tokenizer.json are added, as
    transformers does. `add_bos_token` / `add_eos_token` are ignored: transformers v5 drops them
    whenever tokenizer.json exists, whose post-processor alone decides what add_special_tokens=True
    adds (v4's LlamaTokenizerFast rebuilt the post-processor from them instead).
  - special_tokens_map.json is read only when tokenizer_config.json has no `added_tokens_decoder`
    (transformers' legacy rule); its named tokens then override the config's.
  - chat_template.jinja (written by transformers v5) overrides the config's `chat_template`.
  - `clean_up_tokenization_spaces` is never applied: transformers v5 ignores it for BPE models,
    which covers every checkpoint family this project targets.

The tiny recipe's tokenizer (`Tokenizer.train`) is a byte-level BPE with the digit-splitting
pre-tokenizer of Qwen2 (every digit is its own pre-token, which suits arithmetic), no normalizer
(so decode(encode(t)) == t for any text) and these added tokens, in id order from 0:

    <|begin_of_text|>  bos     special: stripped by decode(skip_special_tokens=True)
    <|end_of_text|>    eos     special; the end-of-turn token of the r1-zero template
    <|pad|>            pad     special
    <|im_start|>, <|im_end|>   special; ChatML turn markers
    <think>, </think>, <answer>, </answer>
                       NOT special: always one token, but kept by skip_special_tokens=True,
                       because the format and accuracy rewards read them in decoded text.

All added tokens have lstrip/rstrip/normalized False, so the text around them round-trips
exactly. With add_special_tokens=True the trained tokenizer prepends bos (Llama-3 style);
encode's default is add_special_tokens=False because chat templates write bos themselves.

CLI:
    python -m data.tokenizer train --data corpus.jsonl --vocab-size 400 --out DIR
    python -m data.tokenizer encode --tokenizer DIR "some text"
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from data.templates import BUILTIN_TEMPLATES

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
DEFAULT_ADDED_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newline runs, other whitespace. Bytes are then mapped by ByteLevel (no regex).
PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The named special tokens transformers knows (and passes to chat templates when set).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers writes this as model_max_length when a tokenizer has no limit.
NO_LENGTH_LIMIT = int(1e30)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the named special tokens and the chat template of a checkpoint.

    Ids are ints in [0, vocab_size); `vocab_size` counts added tokens. Offsets are character
    offsets into the encoded Python string, [start, end).
    """

    def __init__(self, backend: tokenizers.Tokenizer, named_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None):
        self.backend = backend
        named_tokens = dict(named_tokens or {})
        unknown = set(named_tokens) - set(NAMED_TOKENS)
        assert not unknown, f"unknown named tokens {sorted(unknown)}; expected some of {NAMED_TOKENS}"
        self._named = {k: v for k, v in named_tokens.items() if v is not None}
        for name, content in self._named.items():
            assert backend.token_to_id(content) is not None, f"{name} {content!r} is not in the vocabulary"
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._offsets_backend = None  # built on first use by encode_with_offsets

    # -- named special tokens -------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self._named.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._named.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._named.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._named.get("unk_token")

    @property
    def bos_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id_of("pad_token")

    def _id_of(self, name: str) -> int | None:
        content = self._named.get(name)
        return None if content is None else self.backend.token_to_id(content)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set ({"bos_token": "<s>", ...}): what chat templates get."""
        return dict(self._named)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (the ones decode(skip_special_tokens=True) drops)."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens=True applies the post-processor (e.g. a BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of each text (tokenized in parallel by the Rust library)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets) of `text` without special tokens; offsets[k] = (start, end) characters of token k.

        The post-processor is left out: with add_special_tokens=False it adds no ids, but a
        ByteLevel post-processor with trim_offsets=True would shrink offsets to exclude spaces,
        and chat masks need each token's full extent. A byte-level token that holds part of a
        multi-byte character reports that whole character.
        """
        if self._offsets_backend is None:
            self._offsets_backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._offsets_backend.post_processor = None
        enc = self._offsets_backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (see the module docstring for what is read)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory (expected a tokenizer directory "
                                    f"holding tokenizer.json)")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json is missing; only tokenizers saved in the "
                                    f"`tokenizers` JSON format (tokenizer.json) can be loaded")
        source = tokenizer_file.read_text(encoding="utf-8")
        _parse_json(source, tokenizer_file)  # JSON syntax errors are reported with line and column
        try:
            backend = tokenizers.Tokenizer.from_str(source)
        except Exception as e:  # the Rust library's error type is not exported
            raise ValueError(f"{tokenizer_file}: not a valid `tokenizers` file: {e}") from None

        config_file = path / "tokenizer_config.json"
        config = _read_json_object(config_file) if config_file.is_file() else {}
        named = {}
        for name in NAMED_TOKENS:
            if name in config:
                named[name] = _token_content(config[name], config_file, name)
        map_file = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and map_file.is_file():
            token_map = _read_json_object(map_file)
            for name in NAMED_TOKENS:
                if name in token_map:
                    named[name] = _token_content(token_map[name], map_file, name)

        # Tokens the config knows but tokenizer.json lacks are added, as transformers does.
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_file}: 'added_tokens_decoder' must be an object {{id: token}}")
        for key in sorted(decoder, key=lambda k: int(k) if str(k).isdigit() else -1):
            entry = decoder[key]
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ValueError(f"{config_file}: added_tokens_decoder[{key!r}] must be an object with "
                                 f"a string 'content'")
            if backend.token_to_id(entry["content"]) is None:
                backend.add_tokens([_added_token(entry)])
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else extra  # v5 may name them
        if not isinstance(extra, list):
            raise ValueError(f"{config_file}: 'additional_special_tokens' must be a list of tokens")
        for content in list(named.values()) + [_token_content(t, config_file, "additional_special_tokens")
                                               for t in extra]:
            if content is not None and backend.token_to_id(content) is None:
                backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])

        chat_template = _config_chat_template(config.get("chat_template"), config_file)
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        max_length = config.get("model_max_length")
        max_length = max_length if isinstance(max_length, int) and max_length < NO_LENGTH_LIMIT else None
        return cls(backend, named, chat_template=chat_template, model_max_length=max_length)

    def save(self, path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

        transformers.AutoTokenizer.from_pretrained(path) loads the result as a
        PreTrainedTokenizerFast with the same ids, special tokens and chat template.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        decoder = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            **{k: v for k, v in self._named.items() if k not in ("bos_token", "eos_token", "pad_token",
                                                                 "unk_token")},
            "added_tokens_decoder": decoder,
            "model_max_length": self.model_max_length or NO_LENGTH_LIMIT,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(path / "tokenizer_config.json", config)
        _write_json(path / "special_tokens_map.json", dict(self._named))
        return path

    # -- training -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS,
              added_tokens=DEFAULT_ADDED_TOKENS, min_frequency: int = 2, bos_token: str | None = BOS_TOKEN,
              eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN,
              chat_template: str | None = None, model_max_length: int | None = None) -> Tokenizer:
        """Train a byte-level BPE on `texts` (see the module docstring for its layout).

        vocab_size counts everything: special and added tokens (ids 0..k-1, in the order given),
        the 256 byte symbols, then merges until vocab_size or until no pair occurs min_frequency
        times. Texts are split at the special and added tokens before counting pairs, exactly as
        encode splits them, so no merge is spent on the inside of "<think>".
        """
        special_tokens, added_tokens = list(special_tokens), list(added_tokens)
        every = special_tokens + added_tokens
        if len(set(every)) != len(every):
            raise ValueError(f"special_tokens and added_tokens must be distinct, got {every}")
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and token not in special_tokens:
                raise ValueError(f"{name} {token!r} must be one of special_tokens {special_tokens}")
        smallest = len(every) + 256
        if vocab_size < smallest:
            raise ValueError(f"vocab_size {vocab_size} is too small: the {len(every)} added tokens and "
                             f"256 byte symbols alone need {smallest}")

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=every, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(_split_at(texts, every), trainer=trainer)

        # The trainer marks all its tokens special; the tags must survive skip_special_tokens.
        spec = json.loads(backend.to_str())
        for entry in spec["added_tokens"]:
            entry["special"] = entry["content"] in special_tokens
            entry["normalized"] = entry["lstrip"] = entry["rstrip"] = entry["single_word"] = False
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        if bos_token is not None:
            backend.post_processor = _bos_eos_processor(backend, bos_token, None)
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        return cls(backend, named, chat_template=chat_template, model_max_length=model_max_length)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


# ---------------------------------------------------------------------------------------------
# Helpers for loading, saving and training
# ---------------------------------------------------------------------------------------------


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def _read_json_object(path: Path) -> dict:
    value = _parse_json(path.read_text(encoding="utf-8"), path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value, path: Path, key: str) -> str | None:
    """A special token as configs write it: "<s>", {"content": "<s>", ...} (an AddedToken) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: '{key}' must be a string, an object with a string 'content', or null; "
                     f"got {value!r}")


def _added_token(entry: dict) -> AddedToken:
    return AddedToken(entry["content"], single_word=bool(entry.get("single_word", False)),
                      lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                      normalized=bool(entry.get("normalized", not entry.get("special", False))),
                      special=bool(entry.get("special", False)))


def _config_chat_template(value, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates of which "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in value):
            raise ValueError(f"{path}: 'chat_template' as a list must hold {{name, template}} objects")
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, dict):
        return value.get("default")
    raise ValueError(f"{path}: 'chat_template' must be a string or a list of {{name, template}} objects, "
                     f"got {type(value).__name__}")


def _bos_eos_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    """The post-processor "[bos] $A [eos]" (pairs: "[bos] $A [eos] [bos] $B [eos]"), as transformers'
    update_post_processor builds it."""
    def piece(token, type_id):
        return [f"{token}:{type_id}"] if token is not None else []
    single = piece(bos, 0) + ["$A:0"] + piece(eos, 0)
    pair = single + piece(bos, 1) + ["$B:1"] + piece(eos, 1)
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)


def _split_at(texts: Iterable[str], tokens: list[str]) -> Iterator[str]:
    """The pieces of each text between occurrences of `tokens` (longest match first)."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    for text in texts:
        for piece in pattern.split(text):
            if piece:
                yield piece


# ---------------------------------------------------------------------------------------------
# Training corpus files
# ---------------------------------------------------------------------------------------------


def iter_corpus(path) -> Iterator[str]:
    """Documents of a tokenizer training file.

    A `.txt` file holds one document per line (empty lines skipped). A `.jsonl` file holds one
    JSON object per line, read from its first present column: `text` (a string); else `prompt`
    and `completion` (strings, joined into one document); else `messages` (each message's
    `content`, and `reasoning_content` when present, one document each). Blank lines are skipped;
    a malformed line raises ValueError naming `file:line`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .jsonl or .txt corpus)")
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"{path}: unknown corpus format {path.suffix!r}; expected .jsonl or .txt")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line
            else:
                yield from _jsonl_documents(line, f"{path}:{lineno}")


def _jsonl_documents(line: str, where: str) -> Iterator[str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")

    def text_of(key, value):
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        return value

    if "text" in row:
        yield text_of("text", row["text"])
    elif "prompt" in row and "completion" in row:
        yield text_of("prompt", row["prompt"]) + text_of("completion", row["completion"])
    elif "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of objects with 'content'")
        for j, m in enumerate(messages):
            yield text_of(f"messages[{j}].content", m.get("content"))
            if m.get("reasoning_content") is not None:
                yield text_of(f"messages[{j}].reasoning_content", m["reasoning_content"])
    else:
        raise ValueError(f"{where}: expected a 'text' column, 'prompt' and 'completion', or 'messages'; "
                         f"the row has {sorted(row)}")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _chat_template_arg(value: str) -> str:
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {value}: neither a built-in template "
                                f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing Jinja file")
    return path.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer and save it in Hugging Face layout")
    p.add_argument("--data", required=True, help=".jsonl (text | prompt+completion | messages) or .txt file")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, added tokens included")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it")
    p.add_argument("--chat-template", default="r1-zero", help="r1-zero | chatml | path to a Jinja file")
    p.add_argument("--force", action="store_true", help="replace the tokenizer files already in --out")
    p = sub.add_parser("encode", help="print the tokens of a text")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("text")
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            existing = Path(args.out) / "tokenizer.json"
            if existing.exists() and not args.force:
                # a model trained with the old tokenizer would silently decode garbage with a new one
                raise ValueError(f"{existing} already exists: refusing to replace it (pass --force)")
            template = _chat_template_arg(args.chat_template)
            n_docs = 0

            def documents():
                nonlocal n_docs
                for doc in iter_corpus(args.data):
                    n_docs += 1
                    yield doc

            tok = Tokenizer.train(documents(), vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                  chat_template=template)
            out = tok.save(args.out)
            print(f"vocab size {tok.vocab_size} ({n_docs} documents from {args.data}); saved to {out}")
        else:
            tok = Tokenizer.from_pretrained(args.tokenizer)
            ids = tok.encode(args.text)
            print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids],
                              "pieces": [tok.decode([i]) for i in ids]}, ensure_ascii=False))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def load_tokenizer(tokenizer_dir=None, model_dir=None) -> Tokenizer:
    """The tokenizer of a run: `--tokenizer DIR`, else the `--model DIR` folder's own tokenizer files."""
    path = tokenizer_dir or model_dir
    if path is None:
        raise ValueError("no tokenizer: give --tokenizer DIR (or --model DIR holding tokenizer files)")
    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (give --tokenizer DIR holding a Hugging Face tokenizer)")
    return Tokenizer.from_pretrained(path)
