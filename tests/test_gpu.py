"""GPU checks (marker ``gpu``; skipped without CUDA). Run by scripts/gpu_check.sh."""

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.models.random import tiny_model

from .steps import step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _qs(arch, attention, dtype=torch.bfloat16):
    model, tok = tiny_model(arch, dtype=dtype)
    qs = QuietStar.from_base(
        model, tok, QuietStarConfig(thought_len=5, n_true=3, attention=attention)
    ).cuda()
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    return qs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_flex_kernel_matches_dense_path_on_cuda_bf16(arch):
    ids = torch.randint(0, 300, (2, 64), device="cuda")
    res = {}
    for mode in ("sparse", "dense"):  # sparse = FlexAttention on CUDA
        torch.manual_seed(0)
        qs = _qs(arch, mode)
        out = step(qs, ids, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        res[mode] = (qs.mixed_logits(ids).float(), out, qs.mixing_head.net[0].weight.grad.float())
    (la, oa, ga), (lb, ob, gb) = res["sparse"], res["dense"]
    torch.testing.assert_close(la, lb, atol=5e-2, rtol=5e-2)  # bf16 tolerance
    torch.testing.assert_close(oa.base_nll.float(), ob.base_nll.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(oa.mixed_nll.float(), ob.mixed_nll.float(), atol=2e-2, rtol=2e-2)
    assert torch.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99


def test_training_step_with_autocast_on_cuda():
    qs = _qs("llama", "sparse", dtype=torch.float32)
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-3)
    ids = torch.randint(0, 300, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = step(qs, ids, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mixing", ["hidden", "logprob"])
def test_fused_head_matches_the_unfused_path_on_cuda(mixing):
    """fp64 on CUDA: the fused, chunked head against materialised logits, values and gradients."""
    res = {}
    for mode in ("chunked", "off"):
        model, tok = tiny_model("llama", dtype=torch.float64)
        qs = QuietStar.from_base(
            model, tok, QuietStarConfig(thought_len=3, n_true=2, mixing=mixing, fused_ce=mode)
        ).cuda()
        torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
        ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
        out = step(qs, ids, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        res[mode] = (out, {n: p.grad for n, p in qs.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = res["chunked"], res["off"]
    for field in ("loss", "base_nll", "mixed_nll", "policy_loss"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-9, rtol=1e-9)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-8, rtol=1e-7, msg=name)
