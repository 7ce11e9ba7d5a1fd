"""Stop texts: a generation ends where one of them appears; the text shown stops before it.

Generations are decoded from all their tokens so far (so multi-byte characters and
SentencePiece spaces come out right), and the text offered for streaming holds back any
ending that could still grow into a stop text, or an incomplete character.
"""

from __future__ import annotations

from typing import Sequence


class StopText:
    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.text = ""  # the generation's text so far, cut before a stop text once one appears
        self.stopped = False

    def update(self, ids: Sequence[int]) -> bool:
        """Feed the generation's tokens so far; True once a stop text has appeared."""
        if self.stopped:
            return True
        text = self.tokenizer.decode(list(ids))
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
        else:
            self.text = text
        return self.stopped

    def safe_text(self) -> str:
        """What can be shown now: never part of a stop text or half a character."""
        if self.stopped:
            return self.text
        text = self.text
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[:len(text) - hold]
