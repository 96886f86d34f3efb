"""Embedded synthetic domains with distinct statistics, byte-level tokens, generated from a seed.

Every example is ``prompt + answer`` as ASCII bytes, right-padded with 0 to ``seq_len``;
the model is trained (and scored) on predicting the answer bytes only. Domains:

  arith    modular arithmetic over digits: ``"3+8="`` -> ``"1"`` ((a+b) mod 10)
  reverse  four letters a-f reversed: ``"cafe<"`` -> ``"efac"``
  sort     five letters a-f sorted: ``"cafeb>"`` -> ``"abcef"``
  grammar  Dyck-1 membership of 8 parentheses (half of them balanced): ``"(()())()?"`` -> ``"Y"``
  add      two-digit addition, three answer digits: ``"37+85="`` -> ``"122"`` (the harder
           task of ``trainops rl``: carries make a briefly pre-trained model start far below
           the ceiling)

A text file (one line ``prompt<TAB>answer``) is a domain too; its examples are drawn
uniformly from its lines. Batches are a pure function of the generator's seed, so the
data position of a run is just its step counter.
"""
from __future__ import annotations

import glob
import os

import torch

__all__ = ["Domain", "make_domains", "VOCAB", "PAD"]

VOCAB = 128  # ASCII
PAD = 0


def _codes(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("ascii")), dtype=torch.int64)


class Domain:
    """``sample(gen, n)`` -> (tokens [n, seq_len] int64, loss mask [n, seq_len] int64).

    ``mask[b, i] = 1`` where token ``i + 1`` is an answer byte, i.e. where the logits at
    position ``i`` are scored.
    """

    chance: float | None = None  # exact-match accuracy of a uniform guess per answer byte

    def __init__(self, name: str, seq_len: int):
        self.name, self.seq_len = name, seq_len

    def raw(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompt, answer = self.raw(gen, n)
        p, a = prompt.shape[1], answer.shape[1]
        if p + a > self.seq_len:
            raise ValueError(f"domain {self.name!r} needs seq_len >= {p + a}, got {self.seq_len}")
        tokens = torch.zeros(n, self.seq_len, dtype=torch.int64)
        tokens[:, :p], tokens[:, p:p + a] = prompt, answer
        mask = torch.zeros_like(tokens)
        mask[:, p - 1:p + a - 1] = 1
        return tokens, mask


class Arith(Domain):
    chance = 0.1

    def raw(self, gen, n):
        d = torch.randint(0, 10, (n, 2), generator=gen)
        prompt = torch.stack([d[:, 0] + 48, torch.full((n,), ord("+")), d[:, 1] + 48, torch.full((n,), ord("="))], 1)
        return prompt, (d.sum(1, keepdim=True) % 10) + 48


class Reverse(Domain):
    sep, fn, length, letters = "<", staticmethod(lambda x: x.flip(1)), 4, 6
    chance = letters ** -length

    def raw(self, gen, n):
        x = torch.randint(0, self.letters, (n, self.length), generator=gen) + ord("a")
        return torch.cat([x, torch.full((n, 1), ord(self.sep))], 1), self.fn(x)


class Sort(Reverse):
    sep, fn, length = ">", staticmethod(lambda x: x.sort(1).values), 5
    chance = Reverse.letters ** -length


class Grammar(Domain):
    chance = 0.5

    def raw(self, gen, n):
        m = 8 * n + 8
        # Random arrangements of four "(" and four ")": 14 of the 70 are balanced.
        order = torch.rand(m, 8, generator=gen).argsort(1)
        steps = torch.where(order < 4, 1, -1)
        balanced = (steps.cumsum(1) >= 0).all(1)
        bal_idx, unb_idx = balanced.nonzero().flatten(), (~balanced).nonzero().flatten()
        half = min(n // 2, bal_idx.numel())
        pick = torch.cat([bal_idx[:half], unb_idx[: n - half]])
        pick = pick[torch.randperm(n, generator=gen)]
        chars = torch.where(steps[pick] > 0, ord("("), ord(")"))
        prompt = torch.cat([chars, torch.full((n, 1), ord("?"))], 1)
        return prompt, torch.where(balanced[pick], ord("Y"), ord("N")).view(n, 1)


class Add(Domain):
    chance = 1e-3

    def raw(self, gen, n):
        a, b = torch.randint(0, 100, (2, n), generator=gen)
        digits = lambda x, k: torch.stack([(x // 10 ** (k - 1 - i)) % 10 + 48 for i in range(k)], 1)  # noqa: E731
        prompt = torch.cat([digits(a, 2), torch.full((n, 1), ord("+")), digits(b, 2), torch.full((n, 1), ord("="))], 1)
        return prompt, digits(a + b, 3)


class TextFile(Domain):
    """Lines ``prompt<TAB>answer`` of a text file (ASCII); drawn uniformly with replacement."""

    def __init__(self, path: str, seq_len: int):
        super().__init__(os.path.splitext(os.path.basename(path))[0], seq_len)
        pairs = []
        with open(path, encoding="ascii", errors="replace") as fh:
            for no, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{no}: expected 'prompt<TAB>answer'")
                prompt, answer = line.split("\t", 1)
                if not prompt or not answer or len(prompt) + len(answer) > seq_len:
                    raise ValueError(f"{path}:{no}: prompt and answer must be non-empty and fit seq_len={seq_len}")
                pairs.append((prompt, answer))
        if not pairs:
            raise ValueError(f"{path}: no examples")
        self.pairs = pairs

    def sample(self, gen, n):
        idx = torch.randint(0, len(self.pairs), (n,), generator=gen).tolist()
        tokens = torch.zeros(n, self.seq_len, dtype=torch.int64)
        mask = torch.zeros_like(tokens)
        for b, i in enumerate(idx):
            prompt, answer = self.pairs[i]
            codes = _codes(prompt + answer).clamp_max(VOCAB - 1)
            tokens[b, :codes.numel()] = codes
            mask[b, len(prompt) - 1:len(prompt) + len(answer) - 1] = 1
        return tokens, mask


_EMBEDDED = {"arith": Arith, "reverse": Reverse, "sort": Sort, "grammar": Grammar, "add": Add}


def make_domains(names: list[str], seq_len: int) -> list[Domain]:
    """Domains for the names of ``TrainConfig.tasks`` (embedded names, files or globs)."""
    out = []
    for name in names:
        if name in _EMBEDDED:
            out.append(_EMBEDDED[name](name, seq_len))
            continue
        paths = sorted(glob.glob(name))
        if not paths:
            raise ValueError(f"tasks: {name!r} is neither an embedded domain ({', '.join(_EMBEDDED)}) nor a file")
        out.extend(TextFile(p, seq_len) for p in paths)
    for d in out:  # fail early when a domain does not fit
        d.sample(torch.Generator().manual_seed(0), 2)
    return out


def generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of ints (seed, rank, phase, step, ...)."""
    h = 0x243F6A8885A308D3
    for k in key:
        h = (h * 0x100000001B3 ^ (int(k) + 0x9E3779B97F4A7C15)) % (2**61 - 1)
    return torch.Generator().manual_seed(h)
