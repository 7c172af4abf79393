"""Compressor ops: opcheck, fake shapes, bad inputs (typed errors naming the argument), in-place contracts."""
import pytest
import torch

from v4kernels.ops import compressor as ops
from v4kernels.testing import kernel_backends, run_opcheck

from _compressor_inputs import block_table, cache, cu_of, fresh_state, i32, problem, random_state, tokens

PS = 4


def _args(gen, kind="main", ratio=4, lens=(6, 3), starts=(0, 2)):
    pb = problem(kind, ratio, gen)
    kv, sc = tokens(pb, sum(lens), gen)
    skv, ssc = random_state(pb, len(lens) + 1, gen)
    bt = block_table(len(lens), 4, 10, gen)
    cch = cache(pb, 10, PS)
    return pb, dict(kv=kv, score=sc, cu_seqlens=cu_of(lens), start_pos=i32(starts), state_kv=skv, state_score=ssc,
                    ape=pb.ape, norm_weight=pb.w, cos=pb.cos, sin=pb.sin, cache=cch, block_table=bt, page_size=PS,
                    ratio=ratio, kind=kind, state_slots=i32(list(range(len(lens)))))


def _call(a, **over):
    a = {**a, **over}
    ops.compress_kv(a["kv"], a["score"], a["cu_seqlens"], a["start_pos"], a["state_kv"], a["state_score"], a["ape"],
                    a["norm_weight"], a["cos"], a["sin"], a["cache"], a["block_table"], a["page_size"], a["ratio"],
                    a["kind"], state_slots=a["state_slots"], backend="reference")


def _decode(a, positions, **over):
    a = {**a, **over}
    ops.compress_kv_decode(a["kv"], a["score"], positions, a["state_kv"], a["state_score"], a["ape"], a["norm_weight"],
                           a["cos"], a["sin"], a["cache"], a["block_table"], a["page_size"], a["ratio"], a["kind"],
                           state_slots=a["state_slots"], backend="reference")


@pytest.mark.parametrize("kind,ratio", [("main", 4), ("indexer", 4), ("main", 128)])
def test_opcheck(kind, ratio, gen):
    pb, a = _args(gen, kind, ratio, lens=(ratio + 1, 2), starts=(0, ratio - 1))
    s = a["state_slots"]
    run_opcheck(torch.ops.v4kernels.compress_kv.default,
                (a["kv"], a["score"], a["cu_seqlens"], a["start_pos"], s, a["state_kv"], a["state_score"], a["ape"],
                 a["norm_weight"], a["cos"], a["sin"], a["cache"], a["block_table"], PS, ratio, kind))
    run_opcheck(torch.ops.v4kernels.compress_kv_entries.default,
                (a["kv"], a["score"], a["cu_seqlens"], a["start_pos"], s, a["state_kv"], a["state_score"], a["ape"],
                 a["norm_weight"], a["cos"], a["sin"], ratio, kind))
    run_opcheck(torch.ops.v4kernels.compress_kv_decode.default,
                (a["kv"][:2], a["score"][:2], i32([ratio - 1, 5]), s, a["state_kv"], a["state_score"], a["ape"],
                 a["norm_weight"], a["cos"], a["sin"], a["cache"], a["block_table"], PS, ratio, kind))


def test_entries_padding_and_trim(gen):
    pb, a = _args(gen, lens=(9, 1), starts=(0, 3))
    out, seq, pos = ops.compress_kv_entries(a["kv"], a["score"], a["cu_seqlens"], a["start_pos"], a["state_kv"],
                                            a["state_score"], a["ape"], a["norm_weight"], a["cos"], a["sin"], 4, "main",
                                            state_slots=a["state_slots"])
    assert out.shape == (10 // 4 + 2, 512) and out.dtype == torch.bfloat16
    assert seq.tolist() == [0, 0, 1, -1] and pos.tolist() == [0, 1, 0, -1]
    assert (out[3] == 0).all()


def _to(a, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def test_empty_batch_and_no_entries(gen, device):
    pb, a = _args(gen, lens=(2, 1), starts=(0, 5))
    before = a["cache"].clone()
    _call(a)  # no block completes: cache untouched, state updated
    assert torch.equal(a["cache"], before)
    a = _to(a, device)   # the kernels run on the test device (CUDA tensors on a GPU machine)
    for be in ["reference"] + kernel_backends("compress_kv"):
        skv, ssc = fresh_state(pb, 1, device)
        ops.compress_kv(a["kv"][:0], a["score"][:0], cu_of([], device), i32([], device), skv, ssc, a["ape"],
                        a["norm_weight"], a["cos"], a["sin"], a["cache"], a["block_table"][:0], PS, 4, "main",
                        state_slots=i32([], device), backend=be)


def test_bad_dtypes_and_shapes(gen):
    pb, a = _args(gen)
    with pytest.raises(TypeError, match="kv: expected dtype torch.float32"):
        _call(a, kv=a["kv"].bfloat16())
    with pytest.raises(ValueError, match=r"kv: expected shape \(\*, 1024\)"):
        _call(a, kv=a["kv"][:, :512].contiguous())
    with pytest.raises(ValueError, match="score: expected shape"):
        _call(a, score=a["score"][:-1])
    with pytest.raises(ValueError, match="state_kv: expected shape"):
        _call(a, state_kv=a["state_kv"][:, :4].contiguous())
    with pytest.raises(ValueError, match="ape: expected shape"):
        _call(a, ape=a["ape"][:2].contiguous())
    with pytest.raises(ValueError, match="norm_weight: expected shape"):
        _call(a, norm_weight=torch.ones(128))
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype torch.int32"):
        _call(a, cu_seqlens=a["cu_seqlens"].long())
    with pytest.raises(ValueError, match="cu_seqlens: expected shape"):
        _call(a, cu_seqlens=a["cu_seqlens"][:-1])
    with pytest.raises(ValueError, match="cache: expected .* bytes per page"):
        _call(a, cache=cache(problem("indexer", 4, gen), 10, PS))
    with pytest.raises(ValueError, match="block_table: expected shape"):
        _call(a, block_table=a["block_table"][:1])
    with pytest.raises(ValueError, match="kind: expected one of"):
        _call(a, kind="rotate")
    with pytest.raises(ValueError, match="ratio: expected one of"):
        _call(a, ratio=8)
    with pytest.raises(ValueError, match="ratio: the indexer compressor has ratio 4"):
        _call(a, kind="indexer", ratio=128)
    with pytest.raises(ValueError, match="page_size: expected a positive int"):
        _call(a, page_size=0)


def test_bad_index_values(gen):
    pb, a = _args(gen)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 9"):
        _call(a, cu_seqlens=i32([0, 7, 8]))
    with pytest.raises(ValueError, match="start_pos: expected positions >= 0"):
        _call(a, start_pos=i32([0, -2]))
    with pytest.raises(ValueError, match=r"state_slots: expected ids in \[0, 3\)"):
        _call(a, state_slots=i32([0, 3]))
    with pytest.raises(ValueError, match="state_slots: expected distinct slots"):
        _call(a, state_slots=i32([1, 1]))
    bt = a["block_table"].clone()
    bt[0, 0] = 10  # out of range page (10 pages)
    with pytest.raises(ValueError, match=r"block_table: sequence 0, page index 0 \(entry 0\): expected a page in \[0, 10\), got 10"):
        _call(a, block_table=bt)
    bt[0, 0] = -1  # page not allocated
    with pytest.raises(ValueError, match="got -1"):
        _call(a, block_table=bt)
    with pytest.raises(ValueError, match="block_table: sequence 0 writes compressed entry"):
        _call(a, start_pos=i32([4 * 4 * PS, 0]))
    with pytest.raises(ValueError, match="cos: expected a RoPE table covering position"):
        _call(a, cos=a["cos"][:0].contiguous(), sin=a["sin"][:0].contiguous())
    # decode: out-of-range page for an emitting token; padding rows (-1) are ignored
    bt = a["block_table"].clone()
    bt[1, 1] = 99
    with pytest.raises(ValueError, match="block_table: sequence 1, page index 1"):
        _decode(a, i32([2, 4 * PS + 3]), kv=a["kv"][:2], score=a["score"][:2], block_table=bt)
    _decode(a, i32([2, -1]), kv=a["kv"][:2], score=a["score"][:2], block_table=bt)
    with pytest.raises(ValueError, match="positions: expected shape"):
        _decode(a, i32([2]), kv=a["kv"][:2], score=a["score"][:2])


@pytest.mark.parametrize("backend", kernel_backends("compress_kv"))
def test_kernel_masks_bad_pages_without_checks(backend, gen, device, monkeypatch):
    """With the value checks off (as on a GPU), an out-of-range or missing page is skipped, never written."""
    pb, a = _args(gen, lens=(8, 4), starts=(0, 0))
    a = _to(a, device)
    monkeypatch.setattr(ops, "_value_checks", lambda t: False)
    bt = a["block_table"].clone()
    bt[0, 0] = 1 << 20
    bt[1, 0] = -1
    before = a["cache"].clone()
    ops.compress_kv(a["kv"], a["score"], a["cu_seqlens"], a["start_pos"], a["state_kv"], a["state_score"], a["ape"],
                    a["norm_weight"], a["cos"], a["sin"], a["cache"], bt, PS, 4, "main", state_slots=a["state_slots"],
                    backend=backend)
    assert torch.equal(a["cache"], before)
