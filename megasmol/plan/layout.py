"""Parallel layouts that fit: every TP / PP / CP / micro-batch combination for a model, a GPU
count and a global batch, with the pre-flight dry-run's memory estimate, ranked by a simple
throughput model whose reasoning is printed.

The throughput model multiplies, for a layout, the penalties the playbook and Megatron-LM's
guidance name: tensor parallelism costs communication in every layer (mild inside a node, heavy
across nodes: TP beyond the GPUs of one node is never proposed); pipeline parallelism idles for
the bubble (PP-1)/(micro-batches+PP-1) of 1F1B; context parallelism adds ring-attention exchanges;
full recomputation redoes the forward (+1/3 of the step); small micro-batches use GEMMs less
well. Data parallelism is taken as free (its all-reduce overlaps with the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megasmol.preflight.dryrun import GB, estimate_memory


@dataclass
class LayoutOption:
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch: int
    micro_batches: int
    recompute: str | None
    memory_gb: float
    efficiency: float
    reasons: list[str] = field(default_factory=list)

    def label(self) -> str:
        rc = f" recompute={self.recompute}" if self.recompute else ""
        return (f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} mbs {self.micro_batch} "
                f"x {self.micro_batches}{rc}")


def _efficiency(tp, pp, cp, micro_batch, micro_batches, recompute, gpus_per_node) -> tuple[float, list[str]]:
    score, reasons = 1.0, []
    if tp > 1:
        cost = 0.04 * (tp.bit_length() - 1)
        score *= 1 - cost
        reasons.append(f"TP{tp} all-reduces in every layer (-{100 * cost:.0f}%)")
    if pp > 1:
        bubble = (pp - 1) / (micro_batches + pp - 1)
        score *= 1 - bubble
        reasons.append(f"PP{pp} bubble {(pp - 1)}/{micro_batches + pp - 1} (-{100 * bubble:.0f}%)")
    if cp > 1:
        cost = 0.05 * (cp.bit_length() - 1)
        score *= 1 - cost
        reasons.append(f"CP{cp} ring exchanges (-{100 * cost:.0f}%)")
    if recompute == "full":
        score *= 0.75
        reasons.append("full recompute redoes the forward (-25%)")
    if micro_batch == 1:
        score *= 0.95
        reasons.append("micro batch 1 runs smaller GEMMs (-5%)")
    if tp * cp > gpus_per_node:
        score *= 0.5
        reasons.append("TP x CP spans nodes (-50%)")
    return score, reasons


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if n % d == 0]


def fitting_layouts(spec, *, gpus: int, global_batch: int, seq_length: int, memory_gb: float,
                    gpus_per_node: int = 8, precision: str = "bf16", distributed_optimizer: bool = True,
                    headroom: float = 0.9) -> list[LayoutOption]:
    """Layouts whose estimate fits in ``headroom`` of ``memory_gb``, best first."""
    options = []
    tp_choices = [t for t in (1, 2, 4, 8) if t <= gpus_per_node and all(
        getattr(spec, f) % t == 0 for f in ("num_attention_heads", "num_kv_heads", "ffn_hidden_size",
                                             "vocab_size"))]
    for tp in tp_choices:
        for pp in _divisors(spec.num_layers, 16):
            for cp in (1, 2, 4, 8):
                if seq_length % (2 * cp) and cp > 1:
                    continue
                if gpus % (tp * pp * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                for micro_batch in (1, 2, 3, 4, 8):
                    if global_batch % (micro_batch * dp):
                        continue
                    micro_batches = global_batch // (micro_batch * dp)
                    for recompute in (None, "full"):
                        estimate = estimate_memory(
                            spec, tp=tp, pp=pp, dp=dp, cp=cp, micro_batch=micro_batch,
                            seq_length=seq_length, num_micro_batches=micro_batches, precision=precision,
                            distributed_optimizer=distributed_optimizer, sequence_parallel=tp > 1,
                            recompute=recompute)
                        used = estimate.total / GB
                        if used > headroom * memory_gb:
                            continue
                        eff, reasons = _efficiency(tp, pp, cp, micro_batch, micro_batches, recompute,
                                                   gpus_per_node)
                        options.append(LayoutOption(tp, pp, cp, dp, micro_batch, micro_batches,
                                                    recompute, used, eff, reasons))
                        break  # no recompute when the layout fits without it
    return sorted(options, key=lambda o: (-o.efficiency, o.memory_gb))


def render(options: list[LayoutOption], memory_gb: float, top: int = 10) -> str:
    if not options:
        return ("no layout fits: raise the GPU count, shorten the sequence, or use a GPU with more "
                "memory")
    lines = [f"{'rank':>4}  {'layout':<40} {'memory':>14} {'rel. speed':>10}  why"]
    for index, option in enumerate(options[:top], 1):
        lines.append(f"{index:>4}  {option.label():<40} {option.memory_gb:>6.1f}/{memory_gb:g} GB "
                     f"{option.efficiency:>10.2f}  " + ("; ".join(option.reasons) or "no penalties"))
    lines.append(f"{len(options)} layout(s) fit; relative speed 1.00 = data parallelism alone")
    return "\n".join(lines)
