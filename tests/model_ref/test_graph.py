"""DecodeGraph (model_ref/graph.py) on a CPU: its static-buffer decode step (fixed-width block tables
mirrored from the CacheManager, inputs copied into static buffers, the batch derived from them) gives
the bytes of ``Transformer.decode``, across page and compression-block boundaries and with eager
calls in between; misuse raises. The captured CUDA graph itself runs in test_model_gpu.py."""
import pytest
import torch

from v4kernels.model_ref import config as C
from v4kernels.model_ref.graph import DecodeGraph
from v4kernels.model_ref.model import Transformer
from v4kernels.model_ref.weights import init_weights


@pytest.fixture(scope="module")
def tiny():
    cfg = C.tiny()
    return cfg, init_weights(cfg, seed=0)


def _model(tiny, max_batch_tokens=8192, numerics="reference"):
    cfg, w = tiny
    return Transformer(cfg, w, "cpu", backend="reference", max_seqs=3, max_context=320, page_size=16,
                       max_batch_tokens=max_batch_tokens, numerics=numerics)


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C.tiny().vocab_size, (n,), generator=g).tolist()


def _prefill(m, prompts, chunk):
    for s, p in enumerate(prompts):
        for a in range(0, len(p), chunk):
            m.prefill([s], [p[a:a + chunk]])


@pytest.mark.parametrize("max_batch_tokens", [8192, 32])  # position-addressed window; a ring of 160 rows
def test_static_step_equals_decode_bitwise(tiny, max_batch_tokens):
    """Two sequences (125 and 61 tokens) decode 41 steps: both cross 16-row page boundaries, CSA
    (4) and HCA (128) block ends; every step's logits are identical to Transformer.decode's. An eager
    decode in the middle advances both models; the graph's block tables follow it."""
    prompts = [_prompt(125, 1), _prompt(61, 2)]
    steps = _prompt(41, 3)
    models = [_model(tiny, max_batch_tokens) for _ in range(2)]
    for m in models:
        for s in (0, 1):
            m.new_sequence(s)
        _prefill(m, prompts, min(max_batch_tokens, 125))
    assert models[1].caches.window_ring == (0 if max_batch_tokens == 8192 else 160)
    g = DecodeGraph(models[1], [0, 1])
    assert not g.capture
    for i, t in enumerate(steps):
        toks = [t, (t * 7 + 3) % C.tiny().vocab_size]
        want = models[0].decode([0, 1], toks)
        got = models[1].decode([0, 1], toks) if i == 20 else g.step(toks)
        assert torch.equal(got, want), f"step {i}: max diff {(got - want).abs().max():.3g}"
    assert models[1].caches.length(0) == 125 + len(steps) and models[1].caches.length(1) == 61 + len(steps)


def test_subset_of_sequences(tiny):
    """A graph over one of two live sequences (the other decodes eagerly in between, gaining pages)."""
    models = [_model(tiny) for _ in range(2)]
    for m in models:
        for s in (0, 1):
            m.new_sequence(s)
        m.prefill([0, 1], [_prompt(30, 4), _prompt(14, 5)])
    g = DecodeGraph(models[1], [1])
    for i, t in enumerate(_prompt(20, 6)):
        for m in models:
            m.decode([0], [t])
        want = models[0].decode([1], [t])
        assert torch.equal(g.step([t]), want), f"step {i}"


def test_misuse_raises(tiny):
    m = _model(tiny)
    m.new_sequence(0)
    with pytest.raises(ValueError, match="no tokens yet"):
        DecodeGraph(m, [0])
    m.prefill([0], [_prompt(5, 7)])
    with pytest.raises(ValueError, match="not allocated"):
        DecodeGraph(m, [0, 1])
    with pytest.raises(ValueError, match="distinct"):
        DecodeGraph(m, [0, 0])
    with pytest.raises(ValueError, match="at least one"):
        DecodeGraph(m, [])
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraph(m, [0], capture=True)
    with pytest.raises(TypeError, match="Transformer"):
        DecodeGraph(object(), [0])
    with pytest.raises(TypeError, match="seq_ids"):
        DecodeGraph(m, 0)
    g = DecodeGraph(m, [0])
    with pytest.raises(TypeError, match="tokens"):
        g.step(3)
    with pytest.raises(TypeError, match="tokens"):
        g.step([1.5])
    with pytest.raises(ValueError, match="one token per sequence"):
        g.step([1, 2])
    with pytest.raises(ValueError, match="tokens"):
        g.step([C.tiny().vocab_size])
    assert m.caches.length(0) == 5  # rejected steps reserve nothing
    g.step([3])
    m.release(0)
    m.new_sequence(0)  # same id, new allocation
    m.prefill([0], [_prompt(5, 8)])
    with pytest.raises(RuntimeError, match="released"):
        g.step([3])
    dense = _model(tiny, numerics="dense")
    dense.new_sequence(0)
    dense.prefill([0], [_prompt(5, 7)])
    with pytest.raises(ValueError, match="numerics"):
        DecodeGraph(dense, [0])
