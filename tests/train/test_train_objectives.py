"""The losses against direct float64 computations, and the reference model's gradients against
torch.autograd.gradcheck on a tiny float64 model with LoRA."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.backends import REFERENCE
from engine.batch import pack
from engine.config import ModelConfig
from engine.inputs import TokenizedExample
from engine.model import EncoderModel
from engine.train.data import IGNORE_INDEX
from engine.train.lora import LoRALinear, apply_lora, lora_parameters
from engine.train.objectives import embed, mntp_loss, simcse_loss, supervised_loss


def _cos(u, v):
    return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def _direct_ce(queries, candidates, scale):
    """mean_i [ logsumexp_j(scale cos(q_i, c_j)) - scale cos(q_i, c_i) ], in Python floats (float64)."""
    total = 0.0
    for i, q in enumerate(queries):
        logits = [scale * _cos(q, c) for c in candidates]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[i]
    return total / len(queries)


def test_simcse_loss_matches_a_direct_float64_computation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    expected = _direct_ce(a.tolist(), b.tolist(), 20.0)
    assert simcse_loss(a.double(), b.double(), 20.0).item() == pytest.approx(expected, rel=1e-12)
    assert simcse_loss(a, b, 20.0).item() == pytest.approx(expected, rel=1e-5)  # float32 inputs


@pytest.mark.parametrize("n_neg", [0, 2, 4])
def test_supervised_loss_matches_a_direct_float64_computation(n_neg):
    gen = torch.Generator().manual_seed(n_neg)
    q, p, n = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.randn(n_neg, 6, generator=gen)
    expected = _direct_ce(q.tolist(), p.tolist() + n.tolist(), 50.0)
    got = supervised_loss(q.double(), p.double(), n.double() if n_neg else None, 50.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Gradients


def _rms_norm64(x, weight, eps, offset=0.0, residual=None):
    h = x if residual is None else x + residual
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight), h


def _rotary64(q, k, cos, sin):
    def rotate(x):
        half = x.shape[-1] // 2
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        return torch.cat((x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s), dim=-1)

    return rotate(q), rotate(k)


def _pool64(hidden, plan, normalize=False):
    assert plan.mode == "mean" and plan.weights is None and not normalize
    return torch.stack([hidden[s:e].mean(0) for s, e in zip(plan.starts.tolist(), plan.ends.tolist())])


# The reference ops compute norms, rotary and pooling in float32 by design; for a float64 gradcheck the
# same formulas are kept in float64 here. Attention, activations, LoRA, the objectives and the model's
# wiring are the real ones; test_real_ops_gradients_agree checks the real ops give the same gradients.
FLOAT64_OPS = dataclasses.replace(REFERENCE, name="float64", rms_norm=_rms_norm64, rotary=_rotary64, pool=_pool64)
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=40, hidden_size=8, intermediate_size=12, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=4),
    "qwen2": ModelConfig(family="qwen2", vocab_size=40, hidden_size=8, intermediate_size=12, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=4, qkv_bias=True, tie_word_embeddings=True),
}


def _tiny_model(cfg: ModelConfig, dtype=torch.float64) -> EncoderModel:
    torch.manual_seed(0)
    model = EncoderModel(cfg, with_lm_head=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))  # B starts at zero; make every LoRA gradient non-trivial
    return model.to(dtype)


def _losses():
    mntp_batch = pack([[1, 5, 7, 9, 11, 13], [1, 20, 22, 24]])
    labels = torch.full((10,), IGNORE_INDEX)
    labels[[2, 4, 5, 8]] = torch.tensor([7, 11, 13, 22])
    sentences = [TokenizedExample([1, 3, 4, 5, 6], 1, 5), TokenizedExample([1, 8, 9], 1, 3),
                 TokenizedExample([1, 10, 11, 12], 1, 4)]
    queries = [TokenizedExample([1, 30, 31, 3, 4, 5], 3, 6), TokenizedExample([1, 30, 31, 8, 9], 3, 5)]
    positives = [TokenizedExample([1, 5, 4, 3], 1, 4), TokenizedExample([1, 9, 8], 1, 3)]
    negatives = [TokenizedExample([1, 10, 12, 11], 1, 4)]

    def mntp(model):
        return mntp_loss(model, mntp_batch, labels)

    def simcse(model):
        views = embed(model, sentences + sentences)
        return simcse_loss(views[:3], views[3:], 20.0)

    def supervised(model):
        emb = embed(model, queries + positives + negatives)
        return supervised_loss(emb[:2], emb[2:4], emb[4:], 50.0)

    return {"mntp": mntp, "simcse": simcse, "supervised": supervised}


class _Loss(torch.nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self):
        return self.fn(self.model)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_gradcheck_float64(family, objective):
    model = _tiny_model(CONFIGS[family])
    model.ops = FLOAT64_OPS
    wrapper = _Loss(model, _losses()[objective])
    # Every LoRA factor, plus base weights that only gradients through the whole stack reach.
    names = [n for n, _ in wrapper.named_parameters() if "lora_" in n and ".layers.0." in n]
    names += ["model.embed.weight", "model.norm", "model.layers.0.qkv.base.weight", "model.layers.0.attn_norm"]
    if CONFIGS[family].qkv_bias:
        names.append("model.layers.0.qkv.base.bias")
    if objective == "mntp" and model.lm_head is not None:
        names.append("model.lm_head.weight")
    params = dict(wrapper.named_parameters())
    leaves = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def loss(*tensors):
        return functional_call(wrapper, dict(zip(names, tensors)), ())

    # The full Jacobian for one family; a random projection of it (fast mode) for the other, to save time.
    fast = family != "llama"
    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_real_ops_gradients_agree(objective):
    """The reference ops in float32 (norm, rotary, pooling included) give the float64 gradients."""
    fn = _losses()[objective]

    def grads(model):
        model.zero_grad()
        loss = fn(model)
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1).double() for _, p in sorted(lora_parameters(model, "").items())])

    model64 = _tiny_model(CONFIGS["llama"], torch.float64)
    model64.ops = FLOAT64_OPS
    loss64, g64 = grads(model64)
    loss32, g32 = grads(_tiny_model(CONFIGS["llama"], torch.float32))
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    assert ((g32 - g64).norm() / g64.norm()).item() < 1e-4


@pytest.mark.parametrize("objective", ["mntp", "supervised"])
def test_gradient_checkpointing_gives_the_same_gradients(objective):
    fn = _losses()[objective]
    out = []
    for checkpointing in (False, True):
        model = _tiny_model(CONFIGS["llama"])
        model.gradient_checkpointing = checkpointing
        fn(model).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_lora_on_fused_rows_is_one_update_per_projection():
    """``qkv`` with LoRA equals q/k/v computed separately, each ``W x + alpha/r B A x`` (PEFT's formula)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4 + 2 + 2, bias=True)
    lin = LoRALinear(base, [("q_proj", 4), ("k_proj", 2), ("v_proj", 2)], ["q_proj", "v_proj"], r=2, alpha=3.0, dropout=0.0)
    with torch.no_grad():
        for p in lin.lora_B.values():
            p.normal_()
    x = torch.randn(5, 8)
    w, b = base.weight, base.bias
    q = F.linear(x, w[:4], b[:4]) + 1.5 * x @ lin.lora_A["q_proj"].T @ lin.lora_B["q_proj"].T
    k = F.linear(x, w[4:6], b[4:6])
    v = F.linear(x, w[6:], b[6:]) + 1.5 * x @ lin.lora_A["v_proj"].T @ lin.lora_B["v_proj"].T
    torch.testing.assert_close(lin(x), torch.cat([q, k, v], dim=-1))
    assert set(lin.lora_A) == {"q_proj", "v_proj"} and lin.lora_A["q_proj"].shape == (2, 8)
    assert lin.lora_B["v_proj"].shape == (2, 2)
