"""Tokenizer: exact round trips, ids and decoded text equal to transformers' AutoTokenizer (the
oracle) on a tokenizer trained here, loading tokenizers that transformers saved, config variants,
errors on bad input, and the training CLI in a subprocess."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import processors

from data.templates import CHATML_TEMPLATE, R1_ZERO_TEMPLATE
from data.tokenizer import (BOS_TOKEN, DEFAULT_ADDED_TOKENS, DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN,
                            Tokenizer, iter_corpus, main)

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Worked arithmetic in the recipe's format, English prose, other scripts, chat markers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        docs.append(f"What is {a} + {b}?\n<think>\nAdd the columns of {a} and {b}.\nSo {a + b}.\n</think>\n"
                    f"<answer>\n{a + b}\n</answer>")
    docs += ["The quick brown fox jumps over the lazy dog, doesn't it? It's the fox's day."] * 20
    docs += ["Héllo wörld — ünïcode naïve café. 日本語のテキスト。 Привет мир! 😀🎉"] * 10
    docs += ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n2+2=4\n</think>"
             "<answer>4</answer><|im_end|>\n"] * 10
    return docs


SAMPLES = [
    "",
    "What is 123 + 456?",
    "<think>\n3+6=9, carry 0.\nSo 579.\n</think>\n<answer>\n579\n</answer>",
    "<think>x</think> <answer> 4 </answer>",
    "  leading and trailing spaces  ",
    "tabs\t\tand\r\nwindows newlines\n\n\nand runs     of spaces",
    "digits 0123456789 and 3.14159e-10, -42",
    "Héllo wörld 日本語 Привет 😀🎉 e\u0301 (combining)",
    "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nok\n</think>\nhello<|im_end|>\n<|end_of_text|><|pad|><|pad|>",
    "tags glued<think>to</think>words<answer>and</answer>more",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "weird <think >not a tag</think > <Think> <|im_start |>",
]


def random_texts(n: int, seed: int) -> list[str]:
    """Random strings over many scripts, whitespace, emoji and the added tokens (no surrogates)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x10000, 0x100FF)]
    pieces = list(TAGS) + list(DEFAULT_SPECIAL_TOKENS)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.1:
                parts.append(rng.choice(pieces))
            else:
                lo, hi = rng.choice(ranges)
                parts.append(chr(rng.randint(lo, hi)))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=400, chat_template=R1_ZERO_TEMPLATE)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> Path:
    return trained.save(tmp_path_factory.mktemp("tok") / "trained")


@pytest.fixture(scope="module")
def hf(saved):
    return transformers.AutoTokenizer.from_pretrained(saved)


# ----------------------------------------------------------------------------- trained tokenizer


def test_trained_layout(trained):
    every = list(DEFAULT_SPECIAL_TOKENS) + list(DEFAULT_ADDED_TOKENS)
    assert [trained.id_to_token(i) for i in range(len(every))] == every
    assert (trained.bos_token, trained.eos_token, trained.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2)
    assert trained.special_ids == set(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert trained.special_tokens == {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    assert len(every) + 256 < trained.vocab_size <= 400
    for token in every:
        assert trained.encode(token) == [trained.token_to_id(token)]
    # every digit is its own token, whatever the corpus
    assert len(trained.encode("1234567890")) == 10
    # no merge was spent inside the tags: "<think" is not a token of the BPE model
    assert trained.token_to_id("<think") is None and trained.token_to_id("think>") is None


def test_round_trip(trained):
    for text in SAMPLES + random_texts(300, seed=1):
        assert trained.decode(trained.encode(text)) == text


def test_skip_special_tokens_keeps_the_tags(trained):
    text = SAMPLES[8]
    expected = text
    for token in DEFAULT_SPECIAL_TOKENS:
        expected = expected.replace(token, "")
    decoded = trained.decode(trained.encode(text), skip_special_tokens=True)
    assert decoded == expected
    assert all(tag in decoded for tag in ("<think>", "</think>"))


def test_add_special_tokens_prepends_bos(trained):
    assert trained.encode("hi", add_special_tokens=True) == [trained.bos_id] + trained.encode("hi")


def test_batch_equals_single(trained):
    texts = SAMPLES + random_texts(20, seed=2)
    for special in (False, True):
        assert trained.encode_batch(texts, add_special_tokens=special) == \
            [trained.encode(t, add_special_tokens=special) for t in texts]
    ids = [trained.encode(t) for t in texts]
    for skip in (False, True):
        assert trained.decode_batch(ids, skip_special_tokens=skip) == \
            [trained.decode(x, skip_special_tokens=skip) for x in ids]


def test_offsets_cover_the_text(trained):
    for text in SAMPLES + random_texts(100, seed=3):
        ids, offsets = trained.encode_with_offsets(text)
        assert ids == trained.encode(text)
        assert len(offsets) == len(ids)
        covered = 0
        for (s, e), token_id in zip(offsets, ids):
            # a token starts where the last ended, or one character earlier when the two share the
            # bytes of a multi-byte character (each then reports the whole character)
            assert s == covered or (s == covered - 1 and len(text[s].encode()) > 1), (text, offsets)
            assert e >= covered and e > s
            covered = e
            if text[s:e].isascii():
                assert trained.decode([token_id]) == text[s:e]
        assert covered == len(text)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="bos_token"):
        Tokenizer.train(["abc"], vocab_size=400, bos_token="<s>")
    with pytest.raises(ValueError, match="distinct"):
        Tokenizer.train(["abc"], vocab_size=400, added_tokens=("<think>", "<think>"))


# ----------------------------------------------------------------------------- transformers as the oracle


def test_ids_and_text_equal_transformers(trained, hf):
    assert len(hf) == trained.vocab_size
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, None)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (trained.bos_id, trained.eos_id, trained.pad_id)
    assert hf.chat_template == R1_ZERO_TEMPLATE
    for text in SAMPLES + random_texts(100, seed=4):
        ids = trained.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert trained.encode(text, add_special_tokens=True) == hf(text)["input_ids"], text
        for skip in (False, True):
            assert trained.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    batch = SAMPLES[1:6]
    assert trained.encode_batch(batch) == hf(batch, add_special_tokens=False)["input_ids"]


def test_save_layout_and_reload(trained, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, None)
    assert config["clean_up_tokenization_spaces"] is False
    assert config["chat_template"] == R1_ZERO_TEMPLATE
    decoder = config["added_tokens_decoder"]
    assert {v["content"]: v["special"] for v in decoder.values()} == \
        {**{t: True for t in DEFAULT_SPECIAL_TOKENS}, **{t: False for t in TAGS}}
    assert all(not v["lstrip"] and not v["rstrip"] for v in decoder.values())
    assert json.loads((saved / "special_tokens_map.json").read_text()) == trained.special_tokens

    again = Tokenizer.from_pretrained(saved)
    assert again.special_tokens == trained.special_tokens
    assert again.chat_template == R1_ZERO_TEMPLATE
    assert again.vocab_size == trained.vocab_size and again.special_ids == trained.special_ids
    for text in SAMPLES:
        assert again.encode(text, add_special_tokens=True) == trained.encode(text, add_special_tokens=True)


def _hf_tokenizer(trained, **kwargs):
    backend = type(trained.backend).from_str(trained.backend.to_str())
    backend.post_processor = kwargs.pop("post_processor", None)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def test_from_pretrained_reads_what_transformers_saved(trained, tmp_path):
    bos_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                                  special_tokens=[(BOS_TOKEN, trained.bos_id)])
    hf_tok = _hf_tokenizer(trained, post_processor=bos_processor, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                           pad_token="<|new_pad|>")  # a pad token the vocabulary lacks: transformers adds it
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)

    assert ours.chat_template == CHATML_TEMPLATE == oracle.chat_template
    assert ours.vocab_size == len(oracle) == trained.vocab_size + 1
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (oracle.bos_token_id, oracle.eos_token_id, oracle.pad_token_id)
    assert ours.special_ids == {i for i, t in oracle.added_tokens_decoder.items() if t.special}
    for text in SAMPLES + ["<|new_pad|><|new_pad|>x"]:
        assert ours.encode(text) == oracle(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == oracle(text)["input_ids"]
        assert oracle(text)["input_ids"][:1] == [trained.bos_id]
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


def _write_dir(path: Path, trained, config: dict, post_processor=None, **files) -> Path:
    path.mkdir()
    backend = type(trained.backend).from_str(trained.backend.to_str())
    backend.post_processor = post_processor
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, value in files.items():
        (path / name.replace("__", ".")).write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_config_variants_match_transformers(trained, tmp_path):
    added = {"__type": "AddedToken", "content": BOS_TOKEN, "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False}
    templates = [{"name": "default", "template": "{{ messages[0].content }}"},
                 {"name": "tool_use", "template": "tools"}]
    cases = {
        # bos as an AddedToken object, pad null, named templates; add_bos/add_eos_token are ignored
        # (transformers v5 lets tokenizer.json's post-processor decide)
        "objects": ({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added, "eos_token": EOS_TOKEN,
                     "pad_token": None, "chat_template": templates, "add_bos_token": True, "add_eos_token": True},
                    {}),
        "flags off": ({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "add_bos_token": False,
                       "add_eos_token": True, "additional_special_tokens": ["<|extra|>"]}, {}),
        # legacy: no added_tokens_decoder, so special_tokens_map.json overrides the config's names
        "legacy map": ({"bos_token": BOS_TOKEN, "eos_token": "<|pad|>"},
                       {"special_tokens_map__json": {"eos_token": {"content": EOS_TOKEN}, "pad_token": PAD_TOKEN}}),
        # chat_template.jinja beside the config wins over the config's template
        "jinja file": ({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "chat_template": "config"},
                       {"chat_template__jinja": "{{ 'from the file' }}"}),
    }
    bos_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, 0)])
    for k, (name, (config, files)) in enumerate(cases.items()):
        d = _write_dir(tmp_path / f"case{k}", trained, config, post_processor=bos_processor, **files)
        ours = Tokenizer.from_pretrained(d)
        oracle = transformers.AutoTokenizer.from_pretrained(d)
        assert (ours.bos_token, ours.eos_token, ours.pad_token) == \
            (oracle.bos_token, oracle.eos_token, oracle.pad_token), name
        expected_template = oracle.get_chat_template() if oracle.chat_template is not None else None
        assert ours.chat_template == expected_template, name
        assert ours.vocab_size == len(oracle), name
        for text in SAMPLES[1:5] + ["x<|extra|>y"]:
            assert ours.encode(text, add_special_tokens=True) == oracle(text)["input_ids"], name
            assert ours.encode(text) == oracle(text, add_special_tokens=False)["input_ids"], name
    assert Tokenizer.from_pretrained(tmp_path / "case2").eos_token == EOS_TOKEN
    extra = Tokenizer.from_pretrained(tmp_path / "case1")
    assert extra.vocab_size == trained.vocab_size + 1 and extra.token_to_id("<|extra|>") in extra.special_ids
    for k in (0, 1):  # the post-processor of tokenizer.json (bos only) is what counts
        assert Tokenizer.from_pretrained(tmp_path / f"case{k}").encode("hi", add_special_tokens=True) == \
            [trained.bos_id] + trained.encode("hi")
    assert Tokenizer.from_pretrained(tmp_path / "case3").chat_template == "{{ 'from the file' }}"


def test_from_pretrained_errors(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_pretrained(empty)
    assert str(empty) in str(err.value) and "tokenizer.json is missing" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")

    bad = _write_dir(tmp_path / "bad", trained, {})
    (bad / "tokenizer_config.json").write_text('{"bos_token": "<s>",\n "eos_token": }')
    with pytest.raises(ValueError) as err:
        Tokenizer.from_pretrained(bad)
    assert f"{bad / 'tokenizer_config.json'}:2:" in str(err.value)

    wrong = _write_dir(tmp_path / "wrong", trained, {"bos_token": 3})
    with pytest.raises(ValueError, match="'bos_token' must be a string"):
        Tokenizer.from_pretrained(wrong)

    broken = _write_dir(tmp_path / "broken", trained, {})
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid"):
        Tokenizer.from_pretrained(broken)


# ----------------------------------------------------------------------------- corpus files and CLI


def test_iter_corpus_columns(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"text": "plain"}, {"prompt": "Q: ", "completion": "A", "other": 1},
            {"messages": [{"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a", "reasoning_content": "r"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert list(iter_corpus(f)) == ["plain", "Q: A", "u", "a", "r"]
    t = tmp_path / "c.txt"
    t.write_text("one\n\ntwo words\r\n")
    assert list(iter_corpus(t)) == ["one", "two words"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=f"{bad}:2: 'text' must be a string"):
        list(iter_corpus(bad))
    with pytest.raises(ValueError, match="expected .jsonl or .txt"):
        list(iter_corpus(_touch(tmp_path / "c.csv")))


def _touch(path: Path) -> Path:
    path.write_text("x\n")
    return path


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.tokenizer", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_trains_and_saves(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(60)))
    out = tmp_path / "tok"
    run = _run_cli("train", "--data", data, "--vocab-size", 320, "--out", out, "--min-frequency", 2)
    assert run.returncode == 0, run.stderr
    tok = Tokenizer.from_pretrained(out)
    assert f"vocab size {tok.vocab_size}" in run.stdout and str(out) in run.stdout
    assert tok.vocab_size <= 320 and tok.chat_template == R1_ZERO_TEMPLATE
    assert tok.decode(tok.encode(corpus(1)[0])) == corpus(1)[0]

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    (tmp_path / "plain.txt").write_text("\n".join(corpus(30)))
    assert main(["train", "--data", str(tmp_path / "plain.txt"), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok2"), "--chat-template", str(template)]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "tok2").chat_template == "{{ messages }}"
    assert main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok3"),
                 "--chat-template", "chatml"]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "tok3").chat_template == CHATML_TEMPLATE

    # an existing tokenizer is never replaced without --force
    before = (out / "tokenizer.json").read_bytes()
    run = _run_cli("train", "--data", data, "--vocab-size", 300, "--out", out)
    assert run.returncode == 1 and "already exists: refusing to replace it (pass --force)" in run.stderr
    assert (out / "tokenizer.json").read_bytes() == before
    assert main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(out), "--force"]) == 0
    assert Tokenizer.from_pretrained(out).vocab_size <= 300


def test_cli_reports_malformed_lines(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    run = _run_cli("train", "--data", data, "--vocab-size", 300, "--out", tmp_path / "out")
    assert run.returncode == 1
    assert f"{data}:3: invalid JSON" in run.stderr
    assert not (tmp_path / "out").exists()

    data.write_text('{"text": "fine"}\n{"content": "no usable column"}\n')
    assert main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: expected a 'text' column" in err and "['content']" in err
    assert main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "out"),
                 "--chat-template", "chatm1"]) == 1
    assert "neither a built-in template" in capsys.readouterr().err


def test_cli_encode(saved, trained, capsys):
    assert main(["encode", "--tokenizer", str(saved), "<think>12+3</think>"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ids"] == trained.encode("<think>12+3</think>")
    assert "".join(shown["pieces"]) == "<think>12+3</think>"
    assert shown["tokens"][0] == "<think>"


def test_copy_of_saved_dir_loads_without_config(saved, tmp_path):
    # a bare tokenizer.json (no config) loads, with no named tokens and no template
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(saved / "tokenizer.json", d / "tokenizer.json")
    bare = Tokenizer.from_pretrained(d)
    assert bare.special_tokens == {} and bare.chat_template is None and bare.bos_id is None
    assert bare.encode("What is 1 + 2?") == Tokenizer.from_pretrained(saved).encode("What is 1 + 2?")
