"""Pallas kernels for the sparse primitives (GPU via Triton; any platform in interpret mode).

* SpMM: BSR on tensor cores (blocks 16..128), CSR with Sputnik-style row swizzle, N:M (2:4)
  expanded on chip; SDDMM for CSR and BSR patterns. Reached through ``spmm_p``/``sddmm_p`` with
  backend ``"pallas"`` (GPU), ``"pallas-interpret"`` (any platform, slow, for tests) or ``"auto"``
  on GPU; see :mod:`jaxsparse.pallas._lowering` for what applies and the fallbacks.
* :func:`block_sparse_attention`: flash-style attention over the non-empty blocks of a mask.

Importing this module registers the lowerings; it does not need the CPU extension.
"""

from jaxsparse.pallas._attention import (BlockMaskInfo, block_mask_info, block_sparse_attention,
                                         local_block_mask)
from jaxsparse.pallas._lowering import gpu_capability_reason, register, select_sddmm, select_spmm
from jaxsparse.pallas._sddmm import BsrSddmmConfig, CsrSddmmConfig, bsr_sddmm, csr_sddmm
from jaxsparse.pallas._spmm import (BsrSpmmConfig, CsrSpmmConfig, NmSpmmConfig, bsr_spmm,
                                   csr_spmm, nm_spmm)

register()

__all__ = [
    "BlockMaskInfo", "BsrSddmmConfig", "BsrSpmmConfig", "CsrSddmmConfig", "CsrSpmmConfig",
    "NmSpmmConfig", "block_mask_info", "block_sparse_attention", "bsr_sddmm", "bsr_spmm",
    "csr_sddmm", "csr_spmm", "gpu_capability_reason", "local_block_mask", "nm_spmm",
    "select_sddmm", "select_spmm",
]
