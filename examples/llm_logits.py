"""KDLoss on LLM-style logits: (B, T, V) bf16 student and teacher, next-token labels with -100 padding.

    python examples/llm_logits.py                          # B=4, T=256, V=32000 on the GPU if there is one
    python examples/llm_logits.py --batch 2 --seq 16 --vocab 1000        # tiny, for a CPU

The loss is (1-α)·CE + α·T²·KL(teacher ‖ student) per token, averaged over the tokens that are not padding; it takes
the (B, T-1, V) time-shifted views as they are (no copy) and gives the student's logits their gradient in bf16.
"""

import argparse

import torch

import spacedkd_fast as skd


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    b, t, v = args.batch, args.seq, args.vocab

    # Stand-ins for the two models' outputs: logits at every position, and token ids.
    student_logits = (torch.randn(b, t, v, device=device) * 2).to(torch.bfloat16).requires_grad_(True)
    teacher_logits = (torch.randn(b, t, v, device=device) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, v, (b, t), device=device)
    lengths = torch.randint(t // 2, t + 1, (b,), device=device)
    labels = tokens[:, 1:].clone()  # position i predicts token i + 1
    labels[torch.arange(t - 1, device=device)[None, :] >= (lengths[:, None] - 1)] = -100  # padding

    loss_fn = skd.KDLoss(temperature=2.0, alpha=0.5, ignore_index=-100)
    loss = loss_fn(student_logits[:, :-1], teacher_logits[:, :-1], labels)  # strided views, no copy
    loss.backward()

    reference = skd.kd_loss_reference(student_logits.detach()[:, :-1].double(), teacher_logits[:, :-1].double(),
                                      labels, temperature=2.0, alpha=0.5)
    tokens_counted = int((labels != -100).sum())
    print(f"{device}: loss {loss.item():.6f} (float64 reference {reference.item():.6f}) over {tokens_counted} of "
          f"{labels.numel()} positions; student grad {tuple(student_logits.grad.shape)} "
          f"{str(student_logits.grad.dtype).removeprefix('torch.')}, "
          f"zero at padding: {bool((student_logits.grad[:, :-1][labels == -100] == 0).all())}")
    return {"loss": loss.item(), "reference": reference.item(), "tokens": tokens_counted}


if __name__ == "__main__":
    main()
