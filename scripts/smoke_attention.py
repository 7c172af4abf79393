"""Quick GPU check of the CUDA attention loop against the Triton kernel (run from the repository root).

Four decode cases (CSA 64 heads direct and split, HCA 128 heads, SWA 20 heads split); prints the largest
difference, calc_diff and lse difference per case, and whether a NaN appeared. A hang here (the kernel's
mbarrier pipeline) shows up as a timeout: run it under `timeout` before the test suite.
"""
import sys; sys.path.insert(0, 'tests/attention')
import torch
from _attn_build import make_case, decode_view
from v4kernels.ops import attention as A
from v4kernels.testing import make_generator, calc_diff
for kind, H, sp in [('csa', 64, 1), ('csa', 64, 4), ('hca', 128, 1), ('swa', 20, 2)]:
    g = make_generator('smoke')
    c = make_case(g, kind, [3000, 500], [1, 1], H, wps=64, cps=64, topk=512 if kind == 'csa' else 12, device='cuda')
    d = decode_view(c, 1)
    oc, lc = A.sparse_attn_decode(**d, num_splits=sp, backend='cuda'); torch.cuda.synchronize()
    ot, lt = A.sparse_attn_decode(**d, num_splits=sp, backend='triton')
    print(kind, H, sp, 'maxdiff', (oc.float() - ot.float()).abs().max().item(), 'calc', calc_diff(oc.float(), ot.float()),
          'lse', (lc - lt).abs().max().item(), 'nan', torch.isnan(oc).any().item(), flush=True)
