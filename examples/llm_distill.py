"""Distil a small causal language model from a bigger one through the fused-linear KD loss.

    python examples/llm_distill.py                                   # ~1 min on 2 CPU cores; the GPU if there is one
    python examples/llm_distill.py --teacher-steps 60 --steps 40 --seq 24    # tiny, for CI

Both models are defined here (a pre-norm transformer with a causal mask and an untied output head) and learn a
synthetic language: token sequences from a fixed random Markov chain in which each token has a few likely
successors, so there is something to learn and a ceiling to measure against (the chain's own next-token
accuracy). Sequences have random lengths and are right-padded; the padded positions are labelled -100.

1. The teacher (4 layers, width 128) is trained with plain cross-entropy.
2. The student (2 layers, width 64) learns from it with ``FusedLinearKDLoss``: the loss takes the student's last
   hidden states and ``student.lm_head.weight``, the teacher's last hidden states and ``teacher.lm_head.weight``,
   and never builds the (B·T, V) logits of either model (chunks of ``--chunk-size`` rows). The gradient reaches
   ``student.lm_head.weight.grad`` and the student's layers through autograd, as from ``nn.Linear``.

The teacher's vocabulary is larger than the student's (``--teacher-extra-tokens`` ids past the student's, never
seen in the data: a teacher whose embedding table was padded, as 152064 against 151936 between two Qwen sizes).
``vocab_mismatch="truncate"`` restricts the teacher to the student's ids, renormalized over them, through the first
rows of its head (a view, no copy); ``distillation_loss`` is the one place that maps the two models' outputs onto
the loss.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import spacedkd_fast as skd

IGNORE = -100
PAD = 0  # token id of padding (its labels are IGNORE, so its value never matters)


class TinyCausalLM(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm transformer blocks with a causal mask, a final norm and
    an output head ``lm_head`` (``nn.Linear(dim, vocab, bias=False)``)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids -> ``(B, T, dim)`` last hidden states (the input of ``lm_head``)."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))


class MarkovLanguage:
    """Sequences of a random first-order Markov chain over ``vocab`` tokens (id 0 is padding, never generated):
    each token has ``branches`` possible successors with random probabilities."""

    def __init__(self, vocab: int, branches: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(1, vocab, (vocab, branches), generator=gen)
        self.probs = torch.distributions.Dirichlet(torch.ones(branches)).sample((vocab,))
        self.gen = gen

    def batch(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)``, both ``(batch, seq)``: labels are the next tokens, IGNORE past each length."""
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(1, self.vocab, (batch,), generator=self.gen)
        for i in range(seq):
            pick = torch.multinomial(self.probs[tokens[:, i]], 1, generator=self.gen).squeeze(1)
            tokens[:, i + 1] = self.successors[tokens[:, i], pick]
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=self.gen)
        padded = torch.arange(seq + 1)[None, :] >= lengths[:, None] + 1
        tokens[padded] = PAD
        labels = tokens[:, 1:].clone()
        labels[padded[:, 1:]] = IGNORE
        return tokens[:, :-1], labels

    def best_accuracy(self) -> float:
        """Next-token accuracy of predicting each token's likeliest successor (the ceiling)."""
        return float(self.probs.max(dim=1).values.mean())


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(inputs).argmax(dim=-1)
    counted = labels != IGNORE
    return float((predicted[counted] == labels[counted]).float().mean())


def distillation_loss(loss_fn: skd.FusedLinearKDLoss, student: TinyCausalLM, teacher: TinyCausalLM,
                      inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fused-linear KD loss of one batch: hidden states and heads in, no logits built."""
    with torch.no_grad():
        teacher_hidden = teacher.hidden(inputs)  # (B, T, 128); the teacher's head is frozen (teacher_grad=False)
    return loss_fn(student.hidden(inputs), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512, help="the student's vocabulary (the data's tokens)")
    parser.add_argument("--teacher-extra-tokens", type=int, default=16,
                        help="ids past the student's in the teacher's vocabulary (0: the same vocabulary)")
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="student distillation steps")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows (tokens) per chunk of the fused loss")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    language = MarkovLanguage(args.vocab)
    teacher_vocab = args.vocab + args.teacher_extra_tokens
    teacher = TinyCausalLM(teacher_vocab, dim=128, layers=4, heads=4, max_len=args.seq).to(device)
    student = TinyCausalLM(args.vocab, dim=64, layers=2, heads=2, max_len=args.seq).to(device)
    held_out = [x.to(device) for x in language.batch(256, args.seq)]
    started = time.perf_counter()

    # 1. The teacher: plain next-token cross-entropy.
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(args.teacher_steps):
        inputs, labels = (x.to(device) for x in language.batch(args.batch, args.seq))
        loss = nn.functional.cross_entropy(teacher(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    teacher.eval()
    print(f"teacher: next-token accuracy {accuracy(teacher, *held_out):.3f} (the chain's ceiling "
          f"{language.best_accuracy():.3f}) after {args.teacher_steps} steps")

    # 2. The student, from the teacher, through the fused-linear loss.
    loss_fn = skd.FusedLinearKDLoss(temperature=args.temperature, alpha=args.alpha, ignore_index=IGNORE,
                                    vocab_mismatch="truncate", chunk_size=args.chunk_size)
    inputs, labels = (x.to(device) for x in language.batch(args.batch, args.seq))
    fused = distillation_loss(loss_fn, student, teacher, inputs, labels)
    with torch.no_grad():  # the same loss from materialized logits, once, to show they agree
        materialized = skd.kd_loss(student(inputs), teacher(inputs), labels, temperature=args.temperature,
                                   alpha=args.alpha, ignore_index=IGNORE, vocab_mismatch="truncate")
    same = abs(fused.item() - materialized.item()) <= 1e-4 * max(1.0, abs(materialized.item()))
    print(f"fused-linear loss {fused.item():.6f}, from materialized logits {materialized.item():.6f} (same: {same}); "
          f"{int((labels != IGNORE).sum())} of {labels.numel()} positions counted, chunks of {args.chunk_size} rows; "
          f"teacher vocabulary {teacher_vocab}, student {args.vocab}")

    student_before = accuracy(student, *held_out)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    first = last = None
    for step in range(args.steps):
        inputs, labels = (x.to(device) for x in language.batch(args.batch, args.seq))
        loss = distillation_loss(loss_fn, student, teacher, inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    student_after = accuracy(student, *held_out)
    head_grad = student.lm_head.weight.grad is not None
    print(f"student: distillation loss {first:.4f} -> {last:.4f} over {args.steps} steps; next-token accuracy "
          f"{student_before:.3f} -> {student_after:.3f}; lm_head.weight.grad set: {head_grad}; "
          f"{time.perf_counter() - started:.1f} s on {device}")
    return dict(teacher_accuracy=accuracy(teacher, *held_out), student_before=student_before,
                student_after=student_after, first_loss=first, last_loss=last, same=same)


if __name__ == "__main__":
    main()
