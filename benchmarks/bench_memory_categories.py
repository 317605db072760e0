"""Still for the split of a step's peak by category and the layer-wise gradient check (``bench_memory_plan.py`` gives
the current peaks; benchmarks/RESULTS.md, "Memory by category during a training step").

CPU benchmark: peak live tensor bytes by category (parameters, gradients, optimizer state, activations, ...)
during a training step, for torch AdamW and lowmem's GaLore / layer-wise / APOLLO-Mini optimizers.

A LLaMA built from a ``transformers.LlamaConfig`` (fp32, untied embeddings, random weights, random tokens) runs
``--steps`` training steps (forward + backward + ``optimizer.step()`` + ``zero_grad()``) per optimizer under
``torch.distributed._tools.mem_tracker.MemTracker``, which follows every tensor storage and labels it:
``Parameter`` / ``Buffer`` (module tensors), ``Gradient`` (a parameter's gradient, labelled by a grad hook),
``Activation`` (created in forward), ``Temp`` (created in backward, e.g. activation gradients),
``Optstate`` (``optimizer.state`` tensors, and anything created inside ``optimizer.step()``), ``Other``.
The tracker is entered once per step, so its peak is that step's; the tables report the last (steady) step, and
for gradient accumulation also step 1 (GaLore's projector refresh step). The bytes are exact storage sizes.

Gradient check (the script exits 1 if it fails): in layer-wise mode at most one parameter's gradient may be live
(plus, with accumulation, what is held between micro-batches). Checked twice: with MemTracker's per-category
maximum over the step, and independently with post-accumulate-grad hooks registered before the optimizer's
(so they run before a layer-wise update frees the gradient) that sum ``p.grad.nbytes`` over all parameters.
"Held between micro-batches" = the bytes of every ``.grad`` still set plus GaLore's projected running sums
(``optimizer.layerwise._projected_sums``), measured right after each accumulating backward; the sums are counted by
hand because MemTracker files them under ``Temp`` (they are created inside backward). Likewise, a layer-wise
optimizer creates its state inside backward in step 1, so MemTracker calls it ``Temp`` until ``step()`` ends.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_memory_categories.py``.
"""

import argparse
import contextlib
import time
import warnings

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem

MIB = 2**20
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")
# (label, optimizer name or None for torch.optim.AdamW, gradient accumulation steps)
CONFIGS = [
    ("adamw_torch", None, 1),
    ("galore_adamw", "galore_adamw", 1),
    ("galore_adamw_layerwise", "galore_adamw_layerwise", 1),
    ("apollo_mini_layerwise", "apollo_mini_layerwise", 1),
    ("galore_adamw_layerwise, accum 2", "galore_adamw_layerwise", 2),
    ("apollo_mini_layerwise, accum 2", "apollo_mini_layerwise", 2),
]


class StepTracker(MemTracker):
    """MemTracker that also keeps each category's own maximum since ``__enter__`` (MemTracker itself keeps the
    breakdown at the moment of the total's peak)."""

    def __init__(self):
        super().__init__()
        self.category_max: dict[str, int] = {}
        self.phase = self.peak_phase = ""  # set by the caller: where in the step we are / where the total peaked

    def __enter__(self):
        super().__enter__()
        self.category_max = by_name(self.get_tracker_snapshot())
        return self

    def _update_snap(self, *args, **kwargs):
        super()._update_snap(*args, **kwargs)
        for name, value in by_name(self._curr_mem_snap).items():
            if value > self.category_max.get(name, 0):
                self.category_max[name] = value
                if name == "Total":
                    self.peak_phase = self.phase


def by_name(snapshot: dict) -> dict[str, int]:
    """``{category name: bytes}`` of a MemTracker snapshot (summed over devices; here only the CPU)."""
    out: dict[str, int] = {}
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            out[name] = out.get(name, 0) + value
    return out


class GradCounter:
    """Independent gradient count: a post-accumulate-grad hook on every parameter, registered before the optimizer
    (hooks run in registration order, so this sees each gradient before a layer-wise update frees it)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums: dict = {}  # the optimizer's projected running sums, set once it exists
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda _: self.sample())
        self.reset()

    def reset(self) -> None:
        self.max_grad = self.max_sums = 0

    def grad_bytes(self) -> int:
        return sum(p.grad.nbytes for p in self.params if p.grad is not None)

    def sums_bytes(self) -> int:
        return sum(t.nbytes for t in self.sums.values())

    def sample(self) -> None:
        self.max_grad = max(self.max_grad, self.grad_bytes())
        self.max_sums = max(self.max_sums, self.sums_bytes())


def build_model(args) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def state_bytes(optimizer, model) -> dict[str, int]:
    """Exact bytes of the ``optimizer.state`` tensors: their elements (``nbytes``), split into the decoder layers'
    linear weights (GaLore / APOLLO's targets) and the rest, and the storages they keep alive (a view keeps its
    whole base storage)."""
    linear = {id(p) for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    out = dict(linear=0, rest=0, storage=0)
    storages = {}
    for p, s in optimizer.state.items():
        for t in s.values():
            if torch.is_tensor(t):
                out["linear" if id(p) in linear else "rest"] += t.nbytes
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    out["storage"] = sum(storages.values())
    return out


def run_config(args, label: str, name: str | None, accum: int) -> list[dict]:
    model = build_model(args)
    counter = GradCounter(model)  # before the optimizer: its hooks must run first
    if name is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = lowmem.create_optimizer(name, model, lr=1e-3)
    layerwise = getattr(optimizer, "layerwise", None)
    if layerwise is not None:
        counter.sums = layerwise._projected_sums
    largest = max(p.nbytes for p in counter.params)
    tracker = StepTracker()
    tracker.track_external(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, args.steps + 1):
        counter.reset()
        held = 0  # bytes held between micro-batches: gradients left in .grad plus projected sums
        t0 = time.perf_counter()
        with tracker:
            for micro in range(accum):
                tracker.reset_mod_stats()  # MemTracker refuses a second forward of the root module otherwise
                last = micro == accum - 1
                context = contextlib.nullcontext() if last else layerwise.accumulating()
                with context:
                    tracker.phase = f"forward {micro + 1}" if accum > 1 else "forward"
                    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
                    loss = model(tokens, labels=tokens).loss / accum
                    tracker.phase = tracker.phase.replace("forward", "backward")
                    loss.backward()
                del loss
                counter.sample()
                if not last:
                    held = max(held, counter.grad_bytes() + counter.sums_bytes())
            tracker.phase = "optimizer.step()"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        peak = by_name(tracker.get_tracker_snapshot("peak"))
        state = state_bytes(optimizer, model)
        rows.append(dict(label=label, step=step, accum=accum, layerwise=layerwise is not None, peak=peak,
                         max=dict(tracker.category_max), hook_grad=counter.max_grad, sums=counter.max_sums,
                         held=held, largest=largest, state=state, seconds=seconds,
                         phase=tracker.peak_phase))
        print(f"  {label}: step {step} took {seconds:.1f} s, peak {peak['Total'] / MIB:.2f} MiB", flush=True)
        if tracker.category_max["Total"] != peak["Total"]:  # MemTracker samples its peak after each op
            print(f"  note: highest total seen between ops {tracker.category_max['Total']:,} B; 'peak in' refers to it")
    return rows


def check(row: dict) -> tuple[int, bool, bool]:
    """(bound, MemTracker passes, hook count passes) for a layer-wise row; the bound is one parameter's gradient
    plus what accumulation holds between micro-batches."""
    bound = row["largest"] + row["held"]
    return bound, row["max"]["Gradient"] <= bound, row["hook_grad"] <= bound


def mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def tables(rows: list[dict]) -> str:
    head = "| optimizer | step | " + " | ".join(CATEGORIES) + " | **total peak** |"
    sep = "|---|---:|" + "---:|" * (len(CATEGORIES) + 1)
    lines = ["Live bytes by category at the step's total peak (MemTracker), MiB:", "",
             head + " peak in |", sep + "---|"]
    lines += [f"| {r['label']} | {r['step']} | " + " | ".join(mib(r["peak"].get(c, 0)) for c in CATEGORIES)
              + f" | **{mib(r['peak']['Total'])}** | {r['phase']} |" for r in rows]
    lines += ["", "The same, exact bytes:", "", head.replace("**total peak**", "total peak"), sep]
    lines += [f"| {r['label']} | {r['step']} | " + " | ".join(f"{r['peak'].get(c, 0):,}" for c in CATEGORIES)
              + f" | {r['peak']['Total']:,} |" for r in rows]
    lines += ["", "Gradient check, bytes (max = the largest value during the step):", "",
              "| optimizer | step | max Gradient (MemTracker) | max sum of p.grad (hooks) | held between micro-batches "
              "(of it, projected sums) | largest param grad | bound = largest + held | check |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["layerwise"]:
            bound, ok_tracker, ok_hooks = check(r)
            bound_text = f"{bound:,}"
            verdict = "pass" if ok_tracker and ok_hooks else f"**FAIL** (MemTracker {ok_tracker}, hooks {ok_hooks})"
        else:
            bound_text, verdict = "-", "- (not layer-wise)"
        lines.append(f"| {r['label']} | {r['step']} | {r['max']['Gradient']:,} | {r['hook_grad']:,} "
                     f"| {r['held']:,} ({r['sums']:,}) | {r['largest']:,} | {bound_text} | {verdict} |")
    lines += ["", "Optimizer state after the step, bytes (optimizer.state tensors; MemTracker's Optstate also counts "
              "what is created inside optimizer.step()):", "",
              "| optimizer | step | state tensors (nbytes) | of it, decoder linear weights | of it, embeddings + head "
              "+ norms | storages they keep alive | max Optstate (MemTracker) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = r["state"]
        lines.append(f"| {r['label']} | {r['step']} | {st['linear'] + st['rest']:,} | {st['linear']:,} "
                     f"| {st['rest']:,} | {st['storage']:,} | {r['max']['Optstate']:,} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="steps per optimizer; the last one is reported")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # MemTracker's own post-accumulate-grad hook runs after a layer-wise update has set p.grad to None and warns.
    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}, untied, fp32, attention {model.config._attn_implementation}: "
          f"{n_params:,} parameters{'' if n_params >= 50_000_000 else ' (under 50M)'}; batch {args.batch} x "
          f"{args.seq} tokens; {args.steps} steps per optimizer; torch {torch.__version__}")
    del model
    t0 = time.perf_counter()
    rows = []
    for label, name, accum in CONFIGS:
        results = run_config(args, label, name, accum)
        rows += ([results[0]] if accum > 1 and args.steps > 1 else []) + [results[-1]]
    print()
    print(tables(rows))
    failed = [r["label"] for r in rows if r["layerwise"] and not all(check(r)[1:])]
    print(f"\ngradient check (layer-wise rows): {'FAILED for ' + ', '.join(failed) if failed else 'pass'}")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
