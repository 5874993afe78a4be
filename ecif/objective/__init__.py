"""The objective ``R`` ECIF differentiates: the contrastive loss over reference batches, the influence
scopes (projection heads, or heads plus the last transformer blocks), the measurements (test
functions) influence is taken on, and the exact removal of a pair (docs/method.md §1–§2, §6)."""
