"""z-loss: the model's per-token loss equals CE + coeff * logsumexp(logits)^2 (any TP size)."""

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from megasmol.model.gpt import build_model
from megasmol.runtime.distributed import set_seed


def zloss_error(spec, coeff: float = 1e-2) -> float:
    set_seed(3)
    model = build_model(spec.replace(z_loss_coeff=coeff))
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, spec.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    loss = model(ids, positions, None, labels=labels)
    loss.sum().backward()  # the z-loss term is differentiable through the TP all-reduce
    loss = loss.detach()
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            model(ids, positions, None))
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 16)
    expected = ce + coeff * torch.logsumexp(logits, dim=-1).square()
    assert not torch.allclose(expected, ce)  # the z-loss term is not negligible here
    return ((loss - expected).abs().max() / expected.abs().max()).item()
