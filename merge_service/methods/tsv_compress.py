"""`tsv_compress` (METHODS.md section 6): TSV-C, each task's top singular triplets stored.

No merged model: the artifact keeps, per task and matrix, `U_t[:, :k]`, `σ_t[:k]`, `V_t[:, :k]`
of the unweighted task vector (revert recovers the task model itself, so `w_t` plays no part),
and non-matrix deltas whole.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_service.errors import InvalidInputError, Problem
from merge_service.methods import register
from merge_service.methods.base import MergeMethod, SvdParams, TensorResult, TensorTask
from merge_service.methods.linalg import fraction_floor, numerical_rank, svd


class TsvCompressParams(SvdParams):
    rank_fraction: float | None = Field(
        None, gt=0, le=1,
        description="share of r = min(m, n) kept per task: k = min(floor(rank_fraction · r), "
                    "rank(τ_t)); default 1/T (k ≤ r // T)",
    )


@register
class TsvCompress(MergeMethod[TsvCompressParams]):
    name = "tsv_compress"
    summary = "Store each task's top singular triplets per matrix (TSV-C); revert recovers a task."
    Params = TsvCompressParams
    output_formats = frozenset({"compressed"})
    produces_delta = False
    spaces = frozenset({"full"})
    uses_weights = False

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        first = task.task_vectors[0]
        artifact: dict[str, torch.Tensor] = {}
        task.diagnostics["dense_numel"] = first.numel() * task.num_tasks

        if not self.is_matrix(task):
            nonzero = torch.stack([tv.ne(0).any() for tv in task.task_vectors]).tolist()
            for t, (tv, keep) in enumerate(zip(task.task_vectors, nonzero, strict=True)):
                if keep:  # a task whose delta is exactly zero stores nothing
                    artifact[f"{t}::delta"] = tv.contiguous()
            task.diagnostics["stored_numel"] = sum(x.numel() for x in artifact.values())
            return TensorResult(artifact=artifact)

        m, n = first.shape
        r = min(m, n)
        # 1/T by default, as exact integer division (see METHODS.md section 5 on int(r · (1/T)))
        cap = r // task.num_tasks if p.rank_fraction is None else fraction_floor(p.rank_fraction, r)
        kept: list[int] = []
        for t, tv in enumerate(task.task_vectors):
            if cap == 0:
                kept.append(0)
                continue
            u, sigma, v = svd(tv)
            k = min(cap, numerical_rank(sigma))
            kept.append(k)
            if k > 0:  # rank 0: the delta is exactly zero, nothing is stored
                artifact[f"{t}::U"] = u[:, :k].contiguous()  # m × k
                artifact[f"{t}::S"] = sigma[:k].contiguous()  # k
                artifact[f"{t}::V"] = v[:, :k].contiguous()  # n × k
        task.diagnostics["kept_rank"] = kept
        task.diagnostics["stored_numel"] = sum(x.numel() for x in artifact.values())
        return TensorResult(artifact=artifact)

    @classmethod
    def reconstruct(cls, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """`U diag(σ) Vᵀ` from the parts `U` (m × k), `S` (k), `V` (n × k), or the stored
        `delta`. Any other set of parts is refused, as are parts that do not fit together."""
        found = f"found {', '.join(sorted(parts)) or 'none'}; expected U, S, V or delta"
        unexpected = sorted(parts.keys() - ({"delta"} if "delta" in parts else {"U", "S", "V"}))
        if unexpected:
            raise InvalidInputError(Problem(
                f"compressed artifact has unexpected part(s) {', '.join(unexpected)} ({found})"))
        if "delta" in parts:
            return parts["delta"]
        missing = [key for key in ("U", "S", "V") if key not in parts]
        if missing:
            raise InvalidInputError(Problem(
                f"compressed artifact is missing part(s) {', '.join(missing)} ({found})"))
        u, s, v = parts["U"], parts["S"], parts["V"]
        if u.dim() != 2 or s.dim() != 1 or v.dim() != 2 \
                or not u.shape[1] == s.shape[0] == v.shape[1]:
            raise InvalidInputError(Problem(
                f"compressed artifact parts do not fit together: U {list(u.shape)}, S "
                f"{list(s.shape)}, V {list(v.shape)} (expected U [m, k], S [k], V [n, k])"))
        return (u * s) @ v.mT
