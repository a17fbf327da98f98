"""The text a served completion returns, built token by token the same way for streaming and not.

    out = ChoiceText(tok, stop=["\\n\\n"], stop_ids={eos})
    delta = out.feed(new_token_ids)      # text that is safe to send now ("" while it may still change)
    delta = out.finish(finish_reason)    # the rest; out.text is then the whole returned text

What the returned text is (OpenAI's convention, as vLLM serves it):

- the decoded completion without special tokens: a stop token the model sampled (EOS, <|im_end|>)
  and any other special token decode to nothing, and so do ids beyond the tokenizer's vocabulary
  (a padded embedding has rows no token names);
- cut before the first stop string of the request (the stop string itself is not returned);
  the engine stops at the token that completes it, and the few characters of that token past the
  stop are dropped here.

Incremental decoding (the technique vLLM and transformers' TextStreamer use): decoding each new
token alone is wrong (byte-level BPE splits one character over tokens; SentencePiece drops a
token's leading space at the start of a string), and decoding everything again each step costs
O(length^2). So the text of ids[prefix:] is compared with that of ids[prefix:read]: what it adds
is new, unless it ends in U+FFFD (an incomplete UTF-8 sequence: wait for the next token). With stop
strings, the last len(longest stop) - 1 characters are held back, since they may begin a stop.
`finish` then decodes the whole completion once, so the returned text is exactly the full decode;
a stream has sent a prefix of it and sends the rest, so streamed text equals the non-streamed.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
PREFIX_TOKENS = 6   # tokens of left context each incremental decode starts from


class ChoiceText:
    def __init__(self, tok, stop: list[str] | None = None, stop_ids=()):
        self.tok, self.stop = tok, [s for s in (stop or []) if s]
        self.stop_ids = set(stop_ids)
        self.vocab = tok.vocab_size
        self.ids: list[int] = []
        self.text = ""          # decoded so far (before stop truncation)
        self.sent = 0           # characters of it handed out
        self._prefix = self._read = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if 0 <= i < self.vocab], skip_special_tokens=True)

    def _cut(self, text: str) -> tuple[str, bool]:
        """text up to the first stop string, and whether one was found."""
        hits = [text.find(s) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def feed(self, token_ids: list[int]) -> str:
        """Take newly sampled ids; returns the text that is final now."""
        if self.finished or not token_ids:
            return ""
        self.ids += list(token_ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = max(0, len(self.ids) - PREFIX_TOKENS), len(self.ids)
        text, stopped = self._cut(self.text)
        safe = len(text) if stopped else max(self.sent, len(text) - self.hold)
        delta, self.sent = text[self.sent:safe], max(self.sent, safe)
        return delta

    def finish(self) -> str:
        """The completion ended: the rest of its text (the whole decode, cut at a stop string)."""
        if self.finished:
            return ""
        self.finished = True
        ids = self.ids
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]   # a stop token that is not marked special still does not belong to the text
        self.text, _ = self._cut(self._decode(ids))
        delta = self.text[self.sent:] if len(self.text) >= self.sent else ""
        self.sent = len(self.text)
        return delta
