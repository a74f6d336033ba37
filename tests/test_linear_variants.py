"""The linear-attention comparison points (lightning, gdn) and the hybrid GPT stacks built from them.

CPU: the ops' references against direct token-by-token recurrences (fp64, outputs, final states and
gradients); fla-core's recurrent (decode) kernels under the Triton interpreter; the modules against the
transformers implementations of MiniMax-01's lightning layer and Qwen3-Next's Gated DeltaNet; decode
and chunked prefill against prefill, causality, batch independence, the O(1) cache; the missing-extra
error; hybrid GPTs (layer_pattern) that train, save, load and generate.
GPU (@pytest.mark.gpu): fla's chunk kernels (prefill, training) against the references, and the
modules on them. fla's chunk kernels do not run under the Triton interpreter.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsezoo
from sparsezoo import ConfigError, ops
from sparsezoo.models import GPT, GPTConfig, load_model
from sparsezoo.models.train import load_run_config, train
from sparsezoo.ops import fla_kernels
from sparsezoo.variants.lightning import lightning_log_decay

REPO = Path(__file__).resolve().parents[1]
LINEAR = ("lightning", "gdn")
HAS_CUDA = torch.cuda.is_available()
needs_fla = pytest.mark.skipif(not fla_kernels.FLA_INSTALLED, reason="fla-core is not installed")
F64 = dict(atol=1e-10, rtol=1e-10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# -- the oracles: one token at a time ---------------------------------------------------------------
def recurrent_lightning(q, k, v, log_decay, scale, state):
    outs = []
    for t in range(q.shape[2]):
        state = state * log_decay.exp()[:, None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, 2), state


def recurrent_gdn(q, k, v, g, beta, scale, state):
    G = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(G, 1), k.repeat_interleave(G, 1)
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, :, t], state)
        write = beta[:, :, t, None] * (v[:, :, t] - predicted)
        state = state + k[:, :, t, :, None] * write[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, 2), state


def lightning_inputs(B=2, H=3, T=70, K=8, V=6, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    log_decay = -torch.rand(H, generator=g, dtype=torch.float64) - 0.01
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (q, k, v, log_decay, state)]


def gdn_inputs(B=2, Hk=2, H=4, T=70, K=8, V=6, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk, T, K, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, Hk, T, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    decay = F.logsigmoid(torch.randn(B, H, T, generator=g, dtype=dtype) + 2)
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) * 0.1
    return [t.to(device) for t in (q, k, v, decay, beta, state)]


def grads(out_and_state, inputs):
    out, state = out_and_state
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)).sum() + state.square().sum()
    return torch.autograd.grad(loss, inputs)


# -- 1. the references against the recurrences (fp64) ---------------------------------------------------
@pytest.mark.parametrize("T", [1, 63, 64, 150])  # one token, a chunk but one, one chunk, past two chunks
def test_lightning_reference_matches_the_recurrence(T):
    q, k, v, log_decay, state = lightning_inputs(T=T)
    leaves = [t.requires_grad_() for t in (q, k, v, state)]
    ref = ops.lightning_attention(
        q, k, v, log_decay, scale=0.7, initial_state=state, output_final_state=True, backend="reference"
    )
    want = recurrent_lightning(q, k, v, log_decay, 0.7, state)
    torch.testing.assert_close(ref[0], want[0], **F64)
    torch.testing.assert_close(ref[1], want[1], **F64)
    for a, b in zip(grads(ref, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("T", [1, 63, 64, 150])
def test_gdn_reference_matches_the_recurrence(T):
    q, k, v, g, beta, state = gdn_inputs(T=T)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, state)]
    ref = ops.gated_delta_rule(
        q, k, v, g, beta, scale=0.4, initial_state=state, output_final_state=True, backend="reference"
    )
    want = recurrent_gdn(q, k, v, g, beta, 0.4, state)
    torch.testing.assert_close(ref[0], want[0], **F64)
    torch.testing.assert_close(ref[1], want[1], **F64)
    for a, b in zip(grads(ref, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b, **F64)


@settings(max_examples=6)
@given(cuts=st.lists(st.integers(1, 90), min_size=1, max_size=3))
def test_carrying_the_state_across_calls_equals_one_call(cuts):
    """Any split of a sequence into calls, each starting from the last one's final state."""
    q, k, v, log_decay, _ = lightning_inputs(T=100)
    q2, k2, v2, g, beta, _ = gdn_inputs(T=100)
    bounds = sorted({0, 100, *[c for c in cuts if c < 100]})
    whole = (
        ops.lightning_attention(q, k, v, log_decay, output_final_state=True),
        ops.gated_delta_rule(q2, k2, v2, g, beta, output_final_state=True),
    )
    s1 = s2 = None
    parts1, parts2 = [], []
    for a, b in zip(bounds, bounds[1:]):
        o1, s1 = ops.lightning_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], log_decay, initial_state=s1, output_final_state=True
        )
        o2, s2 = ops.gated_delta_rule(
            q2[:, :, a:b],
            k2[:, :, a:b],
            v2[:, :, a:b],
            g[:, :, a:b],
            beta[:, :, a:b],
            initial_state=s2,
            output_final_state=True,
        )
        parts1.append(o1)
        parts2.append(o2)
    torch.testing.assert_close(torch.cat(parts1, 2), whole[0][0], **F64)
    torch.testing.assert_close(s1, whole[0][1], **F64)
    torch.testing.assert_close(torch.cat(parts2, 2), whole[1][0], **F64)
    torch.testing.assert_close(s2, whole[1][1], **F64)


def test_ops_reject_bad_shapes():
    q, k, v, log_decay, state = lightning_inputs(T=5)
    with pytest.raises(ValueError, match="log_decay must be"):
        ops.lightning_attention(q, k, v, log_decay[:2])
    with pytest.raises(ValueError, match="initial_state must be"):
        ops.lightning_attention(q, k, v, log_decay, initial_state=state[:, :, :3])
    q, k, v, g, beta, _ = gdn_inputs(T=5, Hk=3, H=4)
    with pytest.raises(ValueError, match="multiple of q/k's heads"):
        ops.gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, _ = gdn_inputs(T=5)
    with pytest.raises(ValueError, match="beta must be"):
        ops.gated_delta_rule(q, k, v, g, beta[:, :, :4])
    with pytest.raises(ValueError, match="no 'flex' backend"):
        ops.gated_delta_rule(q, k, v, g, beta, backend="flex")


# -- 2. fla-core's kernels ----------------------------------------------------------------------------
@pytest.fixture
def first_autotune_config(monkeypatch):
    """The Triton interpreter cannot time kernels: fla's autotuners run their first config only."""
    from triton.runtime import autotuner

    run = autotuner.Autotuner.run

    def first_config(self, *args, **kwargs):
        configs, self.configs = self.configs, self.configs[:1]
        try:
            return run(self, *args, **kwargs)
        finally:
            self.configs = configs

    if not HAS_CUDA:
        monkeypatch.setattr(autotuner.Autotuner, "run", first_config)


@needs_fla
def test_fla_recurrent_kernels_match_the_references(device, first_autotune_config):
    """The decode path (no gradients, T <= 64): fla's fused_recurrent kernels, fp32 (the interpreter on a CPU)."""
    q, k, v, log_decay, state = lightning_inputs(B=1, H=2, T=12, K=16, V=16, dtype=torch.float32, device=device)
    with ops.track_implementations() as used:
        fast = ops.lightning_attention(
            q, k, v, log_decay, scale=0.5, initial_state=state.float(), output_final_state=True, backend="triton"
        )
    ref = ops.lightning_attention(
        q, k, v, log_decay, scale=0.5, initial_state=state, output_final_state=True, backend="reference"
    )
    assert used == {"lightning_attention": "triton"}
    assert rel_err(fast[0], ref[0]) < 1e-5 and rel_err(fast[1], ref[1]) < 1e-5
    q, k, v, g, beta, state = gdn_inputs(B=1, T=12, K=16, V=16, dtype=torch.float32, device=device)
    with ops.track_implementations() as used:
        fast = ops.gated_delta_rule(
            q, k, v, g, beta, initial_state=state.float(), output_final_state=True, backend="triton"
        )
    ref = ops.gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, backend="reference")
    assert used == {"gated_delta_rule": "triton"}
    assert rel_err(fast[0], ref[0]) < 1e-5 and rel_err(fast[1], ref[1]) < 1e-5


@needs_fla
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's limit, on a CPU")
def test_triton_backend_refuses_what_the_interpreter_cannot_run():
    q, k, v, log_decay, _ = lightning_inputs(T=65, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not run under the Triton interpreter"):
        ops.lightning_attention(q, k, v, log_decay, backend="triton")
    q, k, v, g, beta, _ = gdn_inputs(T=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not run under the Triton interpreter"):
        ops.gated_delta_rule(q.requires_grad_(), k, v, g, beta, backend="triton")  # gradients: the chunk kernel
    with pytest.raises(ValueError, match="fp64"):
        ops.gated_delta_rule(*gdn_inputs(T=5)[:5], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("T", [100, 1000])
def test_fla_chunk_kernels_match_the_references_on_gpu(dtype, tol, T):
    """Prefill and training: fla's chunk kernels, outputs, final states and gradients."""
    q, k, v, log_decay, state = lightning_inputs(B=2, H=4, T=T, K=64, V=64, dtype=dtype, device="cuda")
    q, k, v = (t * 0.25 for t in (q, k, v))
    state = state.float()
    leaves = [t.requires_grad_() for t in (q, k, v, state)]
    with ops.track_implementations() as used:
        fast = ops.lightning_attention(
            q, k, v, log_decay, initial_state=state, output_final_state=True, backend="triton"
        )
    assert used == {"lightning_attention": "triton"}
    ref = ops.lightning_attention(
        *(t.double() for t in (q, k, v)),
        log_decay,
        initial_state=state.double(),
        output_final_state=True,
        backend="reference",
    )
    assert rel_err(fast[0], ref[0]) < tol and rel_err(fast[1], ref[1]) < tol
    for a, b in zip(grads(fast, leaves), grads(ref, leaves)):
        assert rel_err(a, b) < tol
    q, k, v, g, beta, state = gdn_inputs(B=2, Hk=2, H=4, T=T, K=64, V=64, dtype=dtype, device="cuda")
    state = state.float()
    g = g.float()
    refused = fla_kernels.gated_backward_refused()
    if refused:  # Hopper with Triton 3.4-3.7.0: fla computes this backward wrongly, so the op refuses it
        with pytest.raises(ValueError, match="issue 640"):
            ops.gated_delta_rule(q.requires_grad_(), k, v, g, beta, backend="triton")
        q = q.detach()
        leaves = []
    else:
        leaves = [t.requires_grad_() for t in (q, k, v, g, beta, state)]
    with ops.track_implementations() as used:
        fast = ops.gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, backend="triton")
    assert used == {"gated_delta_rule": "triton"}
    ref = ops.gated_delta_rule(
        *(t.double() for t in (q, k, v, g, beta)),
        initial_state=state.double(),
        output_final_state=True,
        backend="reference",
    )
    assert rel_err(fast[0], ref[0]) < tol and rel_err(fast[1], ref[1]) < tol
    for a, b in zip(grads(fast, leaves), grads(ref, leaves)) if leaves else ():
        assert rel_err(a, b) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("name", LINEAR)
def test_modules_on_fla_match_the_reference_on_gpu(name):
    """A bf16 layer: auto picks fla on CUDA; prefill (chunk kernel), chunked prefill and decode (recurrent
    kernel) against the fp64 reference layer with the same weights."""
    torch.manual_seed(0)
    cfg = {"variant": name, "d_model": 256, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64}
    fast = sparsezoo.create_attention(cfg).cuda()
    ref = sparsezoo.create_attention({**cfg, "backend": "reference"}).cuda().double()
    ref.load_state_dict(fast.state_dict())
    fast = fast.bfloat16()
    x = torch.randn(2, 300, 256, device="cuda")
    with torch.no_grad(), ops.track_implementations() as used:
        want = ref(x.double())
        full = fast(x.bfloat16())
        cache = fast.make_cache(2, 300, "cuda")
        parts = [fast(x[:, :200].bfloat16(), cache=cache), fast(x[:, 200:290].bfloat16(), cache=cache)]
        parts += [fast(x[:, t : t + 1].bfloat16(), cache=cache) for t in range(290, 300)]
    assert set(used.values()) == {"triton"}
    assert rel_err(full, want) < 3e-2
    assert rel_err(torch.cat(parts, 1), want) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", LINEAR)
def test_modules_train_under_bf16_autocast_on_gpu(name):
    """The trainer's setting: fp32 weights under CUDA bf16 autocast, forward and backward on fla where it runs (autocast runs
    some reductions in fp32; the kernels need q, k and v in one dtype)."""
    torch.manual_seed(0)
    cfg = {"variant": name, "d_model": 256, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64}
    layer = sparsezoo.create_attention(cfg).cuda()
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), ops.track_implementations() as used:
        out = layer(x)
    out.float().square().mean().backward()
    refused = name == "gdn" and fla_kernels.gated_backward_refused()  # Hopper with Triton < 3.7.1: fla's backward
    assert set(used.values()) == ({"reference"} if refused else {"triton"})  # is wrong there; auto says so
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


# -- 3. the modules: as published, decode, causality, batches, the cache ---------------------------------
def test_lightning_decay_schedule_is_minimax01s():
    """s_h = 2^(-8 (h+1) / H) scaled by 1 - l / (L - 1) (+1e-5): strong decay at the first layer, almost none
    at the last."""
    first, last = lightning_log_decay(8, 0, 8), lightning_log_decay(8, 7, 8)
    torch.testing.assert_close(first, -(2.0 ** -torch.arange(1, 9, dtype=torch.float64)) * (1 + 1e-5))
    assert (last.abs() < 1e-4).all() and (first < last).all()


def copy_minimax_weights(ours, ref, H, D, d):
    W = ref.qkv_proj.weight.view(H, 3, D, d)  # MiniMax-01 projects q, k, v together, per head
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(W[:, i].reshape(H * D, d))
        ours.g_proj.weight.copy_(ref.output_gate.weight)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
        ref.norm.weight.uniform_(0.5, 1.5)
        ours.norm.weight.copy_(ref.norm.weight)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_lightning_is_minimax01s_lightning_layer(layer_index):
    minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    d, H, D, L = 64, 4, 16, 4
    config = minimax.MiniMaxConfig(
        hidden_size=d,
        num_attention_heads=H,
        head_dim=D,
        num_hidden_layers=L,
        block_size=16,
        layer_types=["linear_attention"] * L,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    ref = minimax.MiniMaxLightningAttention(config, layer_index).double()
    ours = sparsezoo.create_attention(
        {
            "variant": "lightning",
            "d_model": d,
            "n_heads": H,
            "n_kv_heads": H,
            "head_dim": D,
            "layer_index": layer_index,
            "n_layers": L,
        }
    ).double()
    copy_minimax_weights(ours, ref, H, D, d)
    x = torch.randn(2, 50, d, dtype=torch.float64)
    out = ref(x, None, None)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours(x), out, atol=1e-6, rtol=1e-6)  # MiniMax keeps its decays in fp32


def test_gdn_is_qwen3_nexts_gated_deltanet(monkeypatch):
    qwen = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn"):
        fn = getattr(qwen, name)  # transformers routes these to fla's kernels when fla is installed:
        monkeypatch.setattr(qwen, name, getattr(fn, "__wrapped__", fn))  # its torch code runs on a CPU
    d, Hk, H, D = 64, 2, 4, 16
    G = H // Hk
    config = qwen.Qwen3NextConfig(
        hidden_size=d,
        linear_num_key_heads=Hk,
        linear_num_value_heads=H,
        linear_key_head_dim=D,
        linear_value_head_dim=D,
        linear_conv_kernel_dim=4,
        num_hidden_layers=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    ref = qwen.Qwen3NextGatedDeltaNet(config, 0)
    ours = sparsezoo.create_attention({"variant": "gdn", "d_model": d, "n_heads": H, "n_kv_heads": Hk, "head_dim": D})
    W = ref.in_proj_qkvz.weight.view(Hk, 2 * D + 2 * G * D, d)  # per key head: q, k, its G values, its G gates
    Wba = ref.in_proj_ba.weight.view(Hk, 2 * G, d)
    with torch.no_grad():
        ours.q_proj.weight.copy_(W[:, :D].reshape(-1, d))
        ours.k_proj.weight.copy_(W[:, D : 2 * D].reshape(-1, d))
        ours.v_proj.weight.copy_(W[:, 2 * D : (2 + G) * D].reshape(-1, d))
        ours.g_proj.weight.copy_(W[:, (2 + G) * D :].reshape(-1, d))
        ours.b_proj.weight.copy_(Wba[:, :G].reshape(-1, d))
        ours.a_proj.weight.copy_(Wba[:, G:].reshape(-1, d))
        ours.conv.weight.copy_(ref.conv1d.weight)
        ours.A_log.copy_(ref.A_log)
        ref.dt_bias.normal_()
        ours.dt_bias.copy_(ref.dt_bias)
        ref.norm.weight.uniform_(0.5, 1.5)
        ours.norm_weight.copy_(ref.norm.weight)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
    x = torch.randn(2, 150, d)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def layer(name, **cfg):
    torch.manual_seed(0)
    base = {"variant": name, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "backend": "reference"}
    return sparsezoo.create_attention({**base, **cfg}).double().eval()


@pytest.mark.parametrize(
    "name, cfg", [("lightning", {}), ("lightning", {"n_kv_heads": 4}), ("gdn", {}), ("gdn", {"conv_size": 6})]
)
def test_decode_and_chunked_prefill_equal_prefill(name, cfg):
    """Chunks shorter than the convolution's taps included: its state spans several calls."""
    mod = layer(name, **cfg)
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    with torch.no_grad():
        full = mod(x)
        cache = mod.make_cache(2, 90)
        parts, start = [], 0
        for step in [70, 2, 1, 3, 1, 1, 2, 10]:
            parts.append(mod(x[:, start : start + step], cache=cache))
            start += step
    torch.testing.assert_close(torch.cat(parts, 1), full, **F64)
    assert cache.pos == 90 and not cache.has("k") and not cache.has("v")  # a state, no per-token K/V
    D, H = 16, 4
    assert tuple(cache.derived("linear_state").shape) == (2, H, D, D)
    if name == "gdn":
        taps = cfg.get("conv_size", 4)
        assert tuple(cache.derived("conv_state").shape) == (2, mod.conv_channels, taps - 1)
    with torch.no_grad(), pytest.raises(ValueError, match="cache overflow"):
        mod(x[:, :1], cache=cache)
    cache.reset()  # a new sequence starts from a zero state
    with torch.no_grad():
        torch.testing.assert_close(mod(x[:, :5], cache=cache), full[:, :5], **F64)


@pytest.mark.parametrize("name", LINEAR)
def test_outputs_are_causal_and_batch_rows_independent(name):
    mod = layer(name)
    x = torch.randn(3, 80, 64, dtype=torch.float64)
    with torch.no_grad():
        out = mod(x)
        later = x.clone()
        later[:, 50:] = torch.randn_like(later[:, 50:])
        torch.testing.assert_close(mod(later)[:, :50], out[:, :50], atol=0, rtol=0)
        other = x.clone()
        other[0] = torch.randn_like(other[0])
        torch.testing.assert_close(mod(other)[1:], out[1:], **F64)
        torch.testing.assert_close(mod(x[1:2]), out[1:2], **F64)


@needs_fla
@pytest.mark.parametrize("name", LINEAR)
def test_decode_on_fla_continues_a_reference_prefill(name, device, first_autotune_config):
    """backend='triton' decodes with fla's recurrent kernels from the state a reference prefill left."""
    ref = layer(name).float().to(device)
    fast = sparsezoo.create_attention({**ref.config.to_dict(), "backend": "triton"}).to(device).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40, 64, device=device)
    with torch.no_grad():
        want = ref(x)
        cache = ref.make_cache(2, 40, device)
        ref(x[:, :36], cache=cache)
        with ops.track_implementations() as used:
            steps = [fast(x[:, t : t + 1], cache=cache) for t in range(36, 40)]
    assert set(used.values()) == {"triton"}
    assert rel_err(torch.cat(steps, 1), want[:, 36:]) < 1e-5


def test_auto_runs_the_reference_on_a_cpu_and_records_it():
    for name in LINEAR:
        with ops.track_implementations() as used:
            sparsezoo.create_attention({"variant": name, "d_model": 64, "n_heads": 2, "n_kv_heads": 1})(
                torch.randn(1, 10, 64)
            )
        assert list(used.values()) == ["reference"], used


def test_without_fla_the_layers_name_the_extra(monkeypatch):
    monkeypatch.setattr(fla_kernels, "FLA_INSTALLED", False)
    for name in LINEAR:
        with pytest.raises(ImportError, match=r"sparsezoo-attn\[linear\]"):
            sparsezoo.create_attention({"variant": name})
        with pytest.raises(ConfigError, match="fla-core is not installed"):
            sparsezoo.make_config({"variant": name, "backend": "triton"})
        mod = sparsezoo.create_attention({"variant": name, "backend": "reference"})  # plain PyTorch runs
        assert mod(torch.randn(1, 5, 256)).shape == (1, 5, 256)


def test_the_transformers_integration_leaves_the_linear_variants_out(monkeypatch):
    """It reuses a model's q/k/v/o and K/V cache, which these layers do not have; with the `hf` extra
    alone (no fla-core), listing its attention functions must still work."""
    pytest.importorskip("transformers")
    from sparsezoo.integrations.transformers import attention_core
    from sparsezoo.integrations.transformers.interface import weightless_variants

    monkeypatch.setattr(fla_kernels, "FLA_INSTALLED", False)
    names = weightless_variants()
    assert "dense" in names and not set(LINEAR) & set(names)
    with pytest.raises(ValueError, match="recurrent state"):
        attention_core(sparsezoo.make_config({"variant": "gdn", "backend": "reference"}))


def test_config_checks():
    with pytest.raises(ConfigError, match=r"layer_index \(4\) must be < n_layers \(4\)"):
        sparsezoo.make_config({"variant": "lightning", "layer_index": 4, "n_layers": 4})
    with pytest.raises(ConfigError, match="conv_size must be > 0"):
        sparsezoo.make_config({"variant": "gdn", "conv_size": 0})
    with pytest.raises(TypeError, match="LayerCache"):
        layer("gdn")(torch.randn(1, 3, 64, dtype=torch.float64), cache=object())


# -- 4. hybrid stacks --------------------------------------------------------------------------------
def test_layer_pattern_builds_the_published_interleaves():
    qwen = GPTConfig(n_layers=8, layer_pattern=["gdn", "gdn", "gdn", "dense"])
    assert qwen.layer_variants() == ["gdn", "gdn", "gdn", "dense"] * 2
    minimax = GPTConfig.from_yaml(REPO / "configs" / "gpt_lightning_hybrid.yaml")
    assert minimax.layer_variants() == ["lightning"] * 7 + ["dense"]
    configs = minimax.attention_configs()
    assert [c.layer_index for c in configs[:7]] == list(range(7)) and {c.n_layers for c in configs[:7]} == {8}
    model = GPT(minimax)
    rates = [-b.attn.log_decay(torch.zeros(())).max().item() for b in model.blocks[:7]]
    assert rates == sorted(rates, reverse=True)  # the decay weakens with depth
    assert GPTConfig(layer_pattern=["lightning", "dense"]).n_layers == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(layer_pattern=["gdn", "dense"], layers=["gdn", "dense"]), "without layers"),
        (dict(layer_pattern=["gdn", "dense"], dense_layers=1), "without layers or dense_layers"),
        (dict(layer_pattern=[]), "at least one layer"),
        (dict(layer_pattern=["gdn", "gdn", "dense"], n_layers=4), "multiple of the layer_pattern"),
        (dict(layer_pattern=["gdn", "nope"]), "unknown attention variant 'nope'"),
        (dict(layer_pattern="gdn"), "layer_pattern must be"),
        (dict(layer_pattern=["lightning"], attention_overrides={"layer_index": 1}), "from the model config"),
    ],
)
def test_bad_layer_patterns_raise(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**bad)


@pytest.mark.parametrize("pattern", [["lightning", "lightning", "lightning", "dense"], ["gdn", "gdn", "gdn", "dense"]])
def test_hybrid_gpt_generates_with_the_cache_as_without(pattern):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=300, d_model=64, n_heads=4, n_kv_heads=2, layer_pattern=pattern)).double().eval()
    idx = torch.stack([torch.randperm(300)[:72] for _ in range(2)])
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 80)
        parts = [model(idx[:, :40], use_cache=True)[0]] + [
            model(idx[:, t : t + 1], use_cache=True)[0] for t in range(40, 72)
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-9, rtol=1e-9)
    assert torch.equal(model.generate(idx[:, :60], 8), model.generate(idx[:, :60], 8, use_cache=False))


@pytest.mark.parametrize("config", ["gpt_lightning_hybrid.yaml", "gpt_gdn_hybrid.yaml"])
def test_hybrid_configs_train_save_and_sample(config, tmp_path):
    run = load_run_config(
        REPO / "configs" / config,
        [
            f"train.out_dir={tmp_path}",
            "train.steps=8",
            "train.batch_size=4",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.progress=false",
            "train.lr=0.01",
            "train.lr_warmup=1",
            "data.seq_len=64",
            "data.task=text",
            f"data.text_path={REPO / 'sparsezoo'}",
        ],
    )
    summary = train(run)
    losses = [h["lm_loss"] for h in summary["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    model, _ = load_model(tmp_path / "checkpoint")
    assert model.config.layer_pattern == run["model"]["layer_pattern"]
    out = model.generate(torch.randint(0, 256, (1, 16)), 8, greedy=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 24)
