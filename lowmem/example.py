"""Train a tiny LLaMA on CPU with a lowmem optimizer and print the loss and optimizer-state bytes.

The corpus is the Python standard library's own source (present on every machine), read as bytes,
so nothing is downloaded: the vocabulary is the 256 byte values. Run ``python -m lowmem.example``
(``--optimizer apollo_mini``, ``--optimizer galore+came+8bit``, ``--steps 60``, ... ; ``--help`` for all
options).
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

from .optim import available_optimizers, create_optimizer
from .optim.registry import get_spec


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def tiny_llama(hidden: int = 128, layers: int = 4):
    """A LLaMA built from a config (no download) with a byte-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random windows of ``seq + 1`` bytes."""
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()]).long()


def rank_option(optimizer: str, rank: int) -> dict:
    """``{"rank": rank}`` for the low-rank optimizers, nothing for the rest (and APOLLO-Mini's fixed rank 1)."""
    return {"rank": rank} if get_spec(optimizer).group.get("rank", 0) > 1 else {}


def train(optimizer: str, steps: int, lr: float, rank: int, seed: int = 0, log_every: int | None = 10) -> dict:
    """Train and return the first/last loss and the optimizer's state bytes."""
    torch.manual_seed(seed)
    model = tiny_llama()
    opt = create_optimizer(optimizer, model, lr=lr, **rank_option(optimizer, rank))
    data, gen = stdlib_bytes(), torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for step, ids in zip(range(1, steps + 1), batches(data, batch=8, seq=128, generator=gen), strict=False):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return {
        "first_loss": losses[0], "last_loss": sum(losses[-5:]) / min(5, len(losses)),
        "state_bytes": opt.state_bytes(), "seconds": time.perf_counter() - start,
        "params": sum(p.numel() for p in model.parameters()),
    }


def optimizer_name(name: str) -> str:
    """A registered or generic (``galore+came+8bit``) optimizer name, else argparse's error with the fix."""
    try:
        get_spec(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw", type=optimizer_name,
                        help=f"one of {', '.join(available_optimizers())}, or <method>+<rule>[+<precision>]")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = train(args.optimizer, args.steps, args.lr, args.rank)
    baseline = train("adamw", 1, args.lr, args.rank, log_every=None)["state_bytes"]
    print(
        f"\n{args.optimizer}: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} in {args.steps} steps "
        f"({result['seconds']:.1f}s), model {result['params']:,} params\n"
        f"optimizer state: {result['state_bytes']:,} bytes (AdamW on the same model: {baseline:,} bytes, "
        f"{result['state_bytes'] / baseline:.1%})"
    )


if __name__ == "__main__":
    main()
