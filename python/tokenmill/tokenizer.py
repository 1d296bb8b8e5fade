# TEMPORARY STUB (not committed)
import json

from tokenmill import _core


class Tokenizer:
    def __init__(self, n, specials):
        self.n_vocab = n
        self.special_tokens = specials
        self._core = _core.PyTokenizer(n)

    @classmethod
    def from_tiktoken(cls, ranks, pattern=None, special_tokens=None):
        sp = dict(special_tokens or {})
        return cls(max([*ranks.values(), *sp.values()]) + 1, sp)

    def encode_ordinary(self, t):
        return list(t.encode())

    def decode(self, ids):
        return bytes(ids).decode()

    def save(self, p):
        open(p, "w").write(json.dumps([self.n_vocab, self.special_tokens]))

    @classmethod
    def load(cls, p):
        n, s = json.load(open(p))
        return cls(n, s)
