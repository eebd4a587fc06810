"""Triton kernels and op wrappers (gumbel_topk, soft_merge, token compaction): see the kernels issue."""
